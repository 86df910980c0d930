"""A colour MedMNIST file end to end: registered through the API of a running server with
3 channels, then trained on by `run_experiment` on the embedded default."""

import json
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import PROJECT_ROOT, free_port, service_env, stop_process

pytestmark = pytest.mark.e2e

# Two classes that differ in hue only: the same luma (0.299 R + 0.587 G + 0.114 B), so a
# model that saw the images collapsed to grey could not tell them apart.
REDDISH = (200.0, 80.0, 100.0)
GREENISH = (40.0, 162.0, 100.0)


def write_colour_medmnist(path: Path, seed: int = 0) -> Path:
    luma = np.array([0.299, 0.587, 0.114])
    assert abs(luma @ REDDISH - luma @ GREENISH) < 0.5
    rng = np.random.default_rng(seed)
    arrays = {}
    for split, count in (("train", 150), ("val", 30), ("test", 60)):
        labels = rng.integers(0, 2, count)
        colours = np.where(labels[:, None] == 1, GREENISH, REDDISH)
        noise = rng.normal(0, 25, (count, 28, 28, 3))
        pixels = np.clip(colours[:, None, None, :] + noise, 0, 255).astype(np.uint8)
        arrays[f"{split}_images"] = pixels  # N x H x W x 3, as MedMNIST stores colour
        arrays[f"{split}_labels"] = labels.reshape(-1, 1)  # N x 1, as MedMNIST does
    np.savez_compressed(path, **arrays)
    return path


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, encoding="utf-8", timeout=600,
    )  # fmt: skip


def request(url: str, *, token: str | None, body: dict | None = None) -> tuple[int, dict]:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Token {token}"
    call = urllib.request.Request(url, data=data, headers=headers)  # noqa: S310 - local server
    try:
        with urllib.request.urlopen(call, timeout=30) as response:  # noqa: S310
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def register_through_the_api(env: dict[str, str], password: str, payload: dict) -> dict:
    """Sign in as the administrator on a running server and register ``payload``."""
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace",
    )  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"{base}/health", timeout=5).close()  # noqa: S310
                break
            except OSError:
                assert server.poll() is None, server.stdout.read()
                assert time.monotonic() < deadline, "the server did not answer within 60 s"
                time.sleep(0.3)
        credentials = {"username": "admin", "password": password}
        status, signed_in = request(f"{base}/api/auth/token/", token=None, body=credentials)
        assert status == 200, signed_in
        token = signed_in["token"]
        status, created = request(f"{base}/api/datasets/", token=token, body=payload)
        assert status == 201, created
        status, shown = request(f"{base}/api/datasets/{created['id']}/", token=token)
        assert status == 200, shown
        return shown
    finally:
        stop_process(server)


def test_an_rgb_medmnist_file_registered_with_3_channels_trains_on_every_client(tmp_path):
    # Given a project on the embedded default with its administrator, and a colour .npz file
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
    )
    migrated = manage("migrate", "--noinput", env=env)
    assert migrated.returncode == 0, migrated.stderr
    admin = manage("bootstrap_admin", env=env)
    assert admin.returncode == 0, admin.stderr
    password = re.search(r"with password (\S+) ", admin.stdout).group(1)
    (tmp_path / "datasets").mkdir()
    path = write_colour_medmnist(tmp_path / "datasets" / "hues.npz")

    # When it is registered through the API with 3 channels and the default normalization
    shown = register_through_the_api(
        env,
        password,
        {
            "name": "hues",
            "storage_format": "npz",
            "modality": "OT",
            "num_classes": 2,
            "class_names": ["reddish", "greenish"],
            "channels": 3,
            "image_shape": [28, 28],
            "path": str(path),
        },
    )
    # and an experiment runs on it
    result = manage(
        "run_experiment", "--dataset", "hues", "--clients", "3", "--rounds", "3",
        "--local-epochs", "2", "--batch-size", "16", "--lr", "0.05", "--partition", "iid",
        "--seed", "0", "--json", str(tmp_path / "summary.json"), env=env,
    )  # fmt: skip

    # Then the dataset kept its 3 channels, every client of every round succeeded, and
    # the global model, which sees colour, tells the two hues apart on the test split
    assert (shown["channels"], shown["normalization"]) == (3, "")
    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed"
    assert len(summary["rounds"]) == 3
    for fl_round in summary["rounds"]:
        assert [client["status"] for client in fl_round["clients"]] == ["succeeded"] * 3
        assert 0.0 <= fl_round["global"]["accuracy"] <= 1.0
    assert summary["rounds"][-1]["global"]["accuracy"] >= 0.9
