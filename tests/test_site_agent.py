"""The site agent (`python -m workers.site`): its folder, its CLI, the dataset metadata it
declares, the weights download and the local approval check.

The server side is a small Site API of the test's own, over real HTTP in a thread (the
server's Site API and the federation end to end are tested elsewhere).
"""

import csv
import hashlib
import json
import re
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import PROJECT_ROOT
from training.fl.client import ClientTask, DataSpec, NetworkSpec
from training.fl.data import generate_synthetic_dataset, load_dataset
from training.fl.local import TrainConfig
from training.fl.networks import build_network
from training.fl.weights import load_weights, weights_to_bytes
from workers.site.__main__ import main
from workers.site.api import SiteApi, SiteApiError
from workers.site.describe import dataset_metadata
from workers.site.home import Credentials, SiteAgentError, SiteHome
from workers.site.worker import approval_refusal, run_site_task


# --- a Site API of the test's own ------------------------------------------------------------
@dataclass
class FakeSiteApi:
    """What the agent's requests reached, and what the server answers."""

    weights: bytes = b""
    # The round's strategy payload, and the models an evaluate task names, by label.
    payload: bytes = b""
    models: dict[str, bytes] = field(default_factory=dict)
    # Bytes of the weights served before the connection drops, on the first download only.
    drop_after: int | None = None
    send_etag: bool = True
    task: dict[str, Any] | None = None
    claim_status: int = 200
    requests: list[tuple[str, str, dict[str, str], bytes]] = field(default_factory=list)
    datasets: dict[str, Any] = field(default_factory=dict)

    def paths(self, method: str) -> list[str]:
        return [path for seen, path, _, _ in self.requests if seen == method]

    def body_of(self, method: str, suffix: str) -> Any:
        [body] = [b for m, p, _, b in self.requests if m == method and p.endswith(suffix)]
        return json.loads(body) if body[:1] in (b"{", b"[") else body


def handler_for(api: FakeSiteApi) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def answer(self, status: int, body: Any = None, headers: dict | None = None) -> None:
            data = b"" if body is None else json.dumps(body).encode()
            self.send_response(status)
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            if body is not None:
                self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def handle_any(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            path = self.path.removeprefix("/api/site/")
            api.requests.append((self.command, path, dict(self.headers), body))
            if path != "enrol/" and self.headers.get("Authorization") != "Site secret-1":
                return self.answer(401, {"detail": "Invalid site credential."})
            route = (self.command, re.sub(r"\d+", "N", path))
            if route == ("POST", "enrol/"):
                if json.loads(body)["token"] != "good-token":
                    return self.answer(400, {"token": ["This token has expired."]})
                return self.answer(201, {
                    "site": {"slug": "st-mary", "name": "St Mary"}, "credential": "secret-1",
                    "broker_url": "redis://site.st-mary:pw@127.0.0.1:1/0", "queue": "site.st-mary",
                })  # fmt: skip
            if route == ("PUT", "datasets/lesions/"):
                api.datasets["lesions"] = json.loads(body)
                return self.answer(201, api.datasets["lesions"])
            if route == ("GET", "me/"):
                return self.answer(200, {
                    "slug": "st-mary", "name": "St Mary", "queue": "site.st-mary",
                    "requires_approval": False, "datasets": [{"name": n} for n in api.datasets],
                })  # fmt: skip
            if route == ("POST", "tasks/N/claim/"):
                return self.answer(api.claim_status, api.task or {"detail": "closed"})
            if route == ("GET", "tasks/N/weights/"):
                return self.send_weights(api.weights)
            if route == ("GET", "tasks/N/payload/"):
                return self.send_weights(api.payload)
            label = re.fullmatch(r"tasks/\d+/models/([^/]+)/", path)
            if label and self.command in ("HEAD", "GET") and label.group(1) in api.models:
                return self.send_weights(api.models[label.group(1)])
            if route == ("PUT", "tasks/N/update/"):
                if hashlib.sha256(body).hexdigest() != self.headers["X-Content-SHA256"]:
                    return self.answer(400, {"detail": "SHA-256 mismatch"})
                return self.answer(201, {})
            if route in {("POST", "tasks/N/result/"), ("POST", "tasks/N/failure/")}:
                return self.answer(200, {"recorded": True})
            if route in {("POST", "heartbeat/"), ("POST", "approvals/N/")}:
                return self.answer(200, {})
            return self.answer(404, {"detail": "Not found."})

        def send_weights(self, data: bytes) -> None:
            start = 0
            digest = hashlib.sha256(data).hexdigest()
            headers = {"Accept-Ranges": "bytes", "X-Content-SHA256": digest}
            if api.send_etag:
                headers["ETag"] = f'"{digest}"'
            requested = re.fullmatch(r"bytes=(\d+)-", self.headers.get("Range", ""))
            if requested:
                start = int(requested.group(1))
                if start >= len(data):
                    return self.answer(416, {"detail": "range"})
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
            self.send_response(206 if requested else 200)
            for name, value in headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(data) - start))
            self.end_headers()
            if self.command == "HEAD":
                return
            if api.drop_after is not None:
                cut, api.drop_after = api.drop_after, None
                self.wfile.write(data[start:cut])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(2)  # the connection drops mid-body
                return
            self.wfile.write(data[start:])

        do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = handle_any

    return Handler


@pytest.fixture
def site_api() -> Iterator[tuple[FakeSiteApi, str]]:
    api = FakeSiteApi()
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler_for(api))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield api, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def home(tmp_path, monkeypatch) -> SiteHome:
    path = tmp_path / "agent-home"
    monkeypatch.setenv("FEDLENS_SITE_HOME", str(path))
    return SiteHome(path)


@pytest.fixture(scope="module")
def lesions(tmp_path_factory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("hospital-data") / "lesions", sites=2, per_site=6, size=32
    )


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def enrolled_home(home: SiteHome, server: str) -> SiteHome:
    home.save_credentials(
        Credentials(
            server=server, credential="secret-1", broker_url="redis://unused", queue="site.st-mary",
            slug="st-mary", name="St Mary",
        )
    )  # fmt: skip
    return home


# --- the agent's folder and the CLI ---------------------------------------------------------
def test_enrolment_and_datasets_are_kept_in_private_files_of_a_private_folder(
    home, site_api, lesions, capsys
):
    _, server = site_api

    assert main(["enroll", "--server", server, "--token", "good-token"]) == 0
    assert main(["datasets", "add", "--name", "lesions", "--path", str(lesions)]) == 0

    assert mode(home.path) == 0o700
    assert mode(home.credentials_file) == 0o600
    assert mode(home.datasets_file) == 0o600
    assert home.credentials().credential == "secret-1"
    assert home.datasets() == {"lesions": {"path": str(lesions.resolve()), "format": "folder"}}
    assert not [p for p in home.path.iterdir() if p.name.startswith(".")]  # no temporary left


def test_enroll_refuses_plain_http_to_another_host_before_sending_anything(home, capsys):
    code = main(["enroll", "--server", "http://fedlens.example.org", "--token", "good-token"])

    error = capsys.readouterr().err
    assert code == 1
    assert "credentials would cross the network in clear" in error
    assert error.count("\n") == 1 and "Traceback" not in error
    assert not home.credentials_file.exists()


def test_an_expired_token_is_one_sentence_and_no_credentials(home, site_api, capsys):
    _, server = site_api

    code = main(["enroll", "--server", server, "--token", "old-token"])

    error = capsys.readouterr().err
    assert code == 1
    assert "This token has expired" in error and "Traceback" not in error
    assert not home.credentials_file.exists()


def test_an_unreachable_server_is_one_sentence(home, capsys):
    enrolled_home(home, "http://127.0.0.1:9")  # the discard port: nothing listens

    code = main(["status"])

    error = capsys.readouterr().err
    assert code == 1
    assert error.startswith("error: cannot reach the server at http://127.0.0.1:9")
    assert "Traceback" not in error


def test_a_rejected_credential_says_to_enrol_again(home, site_api, capsys):
    _, server = site_api
    enrolled_home(home, server)
    home.save_credentials(
        Credentials(**{**json.loads(home.credentials_file.read_text()), "credential": "revoked"})
    )

    code = main(["status"])

    assert code == 1
    assert "refused this site's credential" in capsys.readouterr().err


def test_a_netrc_entry_does_not_replace_the_site_credential(home, site_api, tmp_path, monkeypatch):
    _, server = site_api
    netrc = tmp_path / "netrc"
    netrc.write_text("machine 127.0.0.1 login someone password other\n")
    netrc.chmod(0o600)
    monkeypatch.setenv("NETRC", str(netrc))
    enrolled_home(home, server)

    assert main(["status"]) == 0


def test_status_fails_when_a_declared_dataset_can_no_longer_be_read(
    home, site_api, lesions, capsys
):
    api, server = site_api
    enrolled_home(home, server)
    api.datasets["lesions"] = {}
    home.save_datasets({"lesions": {"path": str(lesions), "format": "folder"}})
    assert main(["status"]) == 0

    home.save_datasets({"lesions": {"path": str(lesions / "moved"), "format": "folder"}})

    assert main(["status"]) == 1
    assert "lesions: " in capsys.readouterr().out


# --- dataset metadata -----------------------------------------------------------------------
def test_dataset_metadata_counts_the_classes_and_measures_the_images(lesions):
    with open(lesions / "labels.csv", newline="") as handle:
        labels = [int(row["label"]) for row in csv.DictReader(handle)]

    metadata = dataset_metadata(load_dataset(lesions), class_names=["healthy", "lesion"])

    assert metadata["num_samples"] == len(labels) == 12
    assert metadata["num_classes"] == 2
    assert metadata["class_names"] == ["healthy", "lesion"]
    assert metadata["counts_per_class"] == [labels.count(0), labels.count(1)]
    assert metadata["channels"] == 1
    assert metadata["image_shape"] == [32, 32]
    assert metadata["storage_format"] == "folder"
    spacings = metadata["statistics"]["spacings"]
    assert sum(entry["count"] for entry in spacings) == 12
    assert metadata["spacing"] == spacings[0]["spacing"]
    assert metadata["statistics"]["num_sampled"] == 12
    assert metadata["statistics"]["std"] > 0
    assert sum(metadata["statistics"]["histogram"]["fractions"]) == pytest.approx(0.98, abs=0.03)


def test_dataset_metadata_never_contains_the_path_or_file_names(lesions):
    metadata = dataset_metadata(load_dataset(lesions))

    sent = json.dumps(metadata)
    assert str(lesions) not in sent
    assert lesions.name not in sent
    assert "img-" not in sent and ".nii" not in sent


def test_datasets_add_sends_the_metadata_and_not_the_path(home, site_api, lesions):
    api, server = site_api
    enrolled_home(home, server)

    assert main(["datasets", "add", "--name", "lesions", "--path", str(lesions)]) == 0

    sent = api.body_of("PUT", "datasets/lesions/")
    assert sent["num_samples"] == 12
    assert str(lesions) not in json.dumps(sent)


def test_more_labels_than_class_names_is_refused(lesions):
    with pytest.raises(SiteAgentError, match="one name per class"):
        dataset_metadata(load_dataset(lesions), class_names=["only-one"])


# --- the round's weights --------------------------------------------------------------------
def some_weights() -> bytes:
    model = build_network("cnn-small", in_channels=1, num_classes=2, seed=0)
    return weights_to_bytes(model.state_dict())


def test_a_dropped_weights_download_resumes_where_it_stopped(home, site_api):
    api, server = site_api
    api.weights = some_weights()
    api.drop_after = len(api.weights) // 3
    sha256 = hashlib.sha256(api.weights).hexdigest()

    path = SiteApi(server, "secret-1").download_weights(17, sha256, home.weights_cache)

    assert path.read_bytes() == api.weights
    ranges = [headers.get("Range") for m, p, headers, _ in api.requests if p.endswith("weights/")]
    assert ranges == [None, f"bytes={len(api.weights) // 3}-"]


def test_weights_of_another_hash_are_refused_and_not_kept(home, site_api):
    api, server = site_api
    api.weights = some_weights()
    expected = hashlib.sha256(b"the weights the task names").hexdigest()

    with pytest.raises(SiteApiError, match="task expects"):
        SiteApi(server, "secret-1").download_weights(17, expected, home.weights_cache)

    assert not list(home.weights_cache.glob("*.safetensors*"))


def test_corrupted_weights_are_refused_after_download(home, site_api):
    # No ETag to compare with: the SHA-256 of the bytes received decides.
    api, server = site_api
    api.weights = some_weights()
    expected = hashlib.sha256(api.weights).hexdigest()
    api.weights = api.weights[:-1] + bytes([api.weights[-1] ^ 1])
    api.send_etag = False

    with pytest.raises(SiteApiError, match="were discarded"):
        SiteApi(server, "secret-1").download_weights(17, expected, home.weights_cache)

    assert not list(home.weights_cache.glob("*.safetensors*"))


def test_a_cached_round_is_downloaded_once_and_older_rounds_are_dropped(home, site_api):
    api, server = site_api
    client = SiteApi(server, "secret-1")
    paths = []
    for seed in range(4):
        api.weights = weights_to_bytes(
            build_network("cnn-small", in_channels=1, num_classes=2, seed=seed).state_dict()
        )
        sha256 = hashlib.sha256(api.weights).hexdigest()
        paths.append(client.download_weights(seed, sha256, home.weights_cache))
        paths.append(client.download_weights(seed + 100, sha256, home.weights_cache))

    assert len(api.paths("GET")) == 4
    assert sorted(home.weights_cache.glob("*.safetensors")) == sorted(set(paths[-4:]))


# --- a task, end to end over HTTP -----------------------------------------------------------
def task_description(
    experiment: int, weights: bytes, dataset: str = "lesions", **change: Any
) -> dict:
    return ClientTask(**{
        "client_update": 41, "round_id": 9, "round_number": 1, "experiment": experiment,
        "site": "st-mary", "kind": "train",
        "network": NetworkSpec(name="cnn-small", in_channels=1, num_classes=2, spatial_dims=2),
        "data": DataSpec(name=dataset, num_classes=2, class_names=[], channels=1,
                         image_shape=[16, 16], validation_fraction=0.25),
        "train": TrainConfig(epochs=1, batch_size=4, lr=0.01), "start_epoch": 0, "options": {},
        "weights_sha256": hashlib.sha256(weights).hexdigest(), **change,
    }).to_json()  # fmt: skip


def test_approval_is_needed_only_while_required_and_a_refusal_always_holds():
    approved = {"decisions": {"5": {"decision": "approve"}}}
    refused = {"decisions": {"6": {"decision": "refuse", "reason": "no consent"}}}

    assert approval_refusal({"requires_approval": False, "decisions": {}}, 5) is None
    assert approval_refusal({"requires_approval": True, **approved}, 5) is None
    assert (
        approval_refusal({"requires_approval": True, **approved}, 7)
        == "experiment 7 is not approved by this site's operator"
    )
    assert "no consent" in approval_refusal({"requires_approval": False, **refused}, 6)


def test_an_unapproved_experiment_is_reported_as_failed_without_touching_data(home, site_api):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.task = task_description(experiment=8, weights=api.weights)
    # Declared at a path that does not exist: opening it would fail otherwise.
    home.save_datasets({"lesions": {"path": str(home.path / "absent"), "format": "folder"}})
    assert main(["approvals", "require", "on"]) == 0

    outcome = run_site_task(home, 41, 9, "gpu0@test")

    assert outcome == "refused"
    assert api.body_of("POST", "tasks/41/failure/") == {
        "error": "experiment 8 is not approved by this site's operator"
    }
    assert not [p for p in api.paths("GET") if p.endswith("weights/")]


def test_a_task_on_a_dataset_not_declared_here_says_how_to_declare_it(home, site_api):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.task = task_description(experiment=8, weights=api.weights, dataset="chest")

    assert run_site_task(home, 41, 9, "gpu0@test") == "failed"

    assert api.body_of("POST", "tasks/41/failure/")["error"] == (
        "this site has no dataset named chest; declare it with "
        "`python -m workers.site datasets add`"
    )


def test_a_task_closed_on_the_server_is_dropped(home, site_api):
    api, server = site_api
    enrolled_home(home, server)
    api.claim_status = 409

    assert run_site_task(home, 41, 9, "gpu0@test") == "dropped"
    assert api.paths("POST") == ["tasks/41/claim/"]


def test_an_approved_task_trains_on_local_data_and_uploads_its_update(home, site_api, lesions):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.task = task_description(experiment=8, weights=api.weights)
    home.save_datasets({"lesions": {"path": str(lesions), "format": "folder"}})
    home.save_approvals({"requires_approval": True, "decisions": {"8": {"decision": "approve"}}})

    assert run_site_task(home, 41, 9, "gpu0@test") == "counted"

    claim = api.body_of("POST", "tasks/41/claim/")
    update = api.body_of("PUT", "tasks/41/update/")
    result = api.body_of("POST", "tasks/41/result/")
    assert claim == {"round": 9, "worker": "gpu0@test"}
    assert set(load_weights(update)) == set(load_weights(api.weights))
    assert update != api.weights
    # A quarter of the 12 samples is kept for validation, where the starting model is
    # evaluated before training.
    assert result["num_samples"] == 9
    assert set(result["metrics"]) >= {"loss", "accuracy", "update_norm"}
    assert result["evaluation"]["num_samples"] == 3


def test_a_payload_of_another_hash_is_refused_and_not_kept(home, site_api):
    api, server = site_api
    api.payload = weights_to_bytes({"0.weight": torch.ones(3)})
    expected = hashlib.sha256(b"the payload the task names").hexdigest()

    with pytest.raises(SiteApiError, match="task expects"):
        SiteApi(server, "secret-1").download_payload(17, expected, home.weights_cache)

    assert not list(home.weights_cache.glob("*.safetensors*"))


def test_a_scaffold_task_fetches_the_payload_and_keeps_its_control_variate_privately(
    home, site_api, lesions
):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.payload = weights_to_bytes(
        {name: torch.zeros_like(t) for name, t in load_weights(api.weights).items()
         if t.is_floating_point()}
    )  # fmt: skip
    api.task = task_description(
        experiment=8, weights=api.weights, options={"scaffold": True},
        payload_sha256=hashlib.sha256(api.payload).hexdigest(),
    )  # fmt: skip
    home.save_datasets({"lesions": {"path": str(lesions), "format": "folder"}})

    assert run_site_task(home, 41, 9, "gpu0@test") == "counted"

    assert "tasks/41/payload/" in api.paths("GET")
    kept = home.path / "state" / "8" / "scaffold_control.safetensors"
    assert mode(kept) == 0o600 and mode(kept.parent) == 0o700 and mode(kept.parent.parent) == 0o700
    assert load_weights(kept).keys() == load_weights(api.payload).keys()
    assert api.body_of("POST", "tasks/41/result/")["extras"] == {
        "local_steps": 3, "learning_rate": 0.01
    }  # fmt: skip


def test_an_evaluate_task_fetches_each_model_and_reports_one_evaluation_each(
    home, site_api, lesions
):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.models = {"global": api.weights, "st-anne": weights_to_bytes(
        build_network("cnn-small", in_channels=1, num_classes=2, seed=9).state_dict())}  # fmt: skip
    api.task = task_description(
        experiment=8, weights=api.weights, kind="evaluate",
        options={"models": ["global", "st-anne"]},
    )  # fmt: skip
    home.save_datasets({"lesions": {"path": str(lesions), "format": "folder"}})

    assert run_site_task(home, 41, 9, "gpu0@test") == "counted"

    result = api.body_of("POST", "tasks/41/result/")
    assert set(result["evaluation"]) == {"global", "st-anne"}
    assert result["num_samples"] == result["evaluation"]["global"]["num_samples"] == 3
    assert result["evaluation"]["global"] != result["evaluation"]["st-anne"]
    assert not api.paths("PUT")  # no weights leave the site
    # The global model's hash is the task's own; another site's is asked first.
    assert [p for m, p, _, _ in api.requests if m == "HEAD"] == ["tasks/41/models/st-anne/"]


def test_an_evaluate_task_refuses_a_global_model_other_than_the_tasks(home, site_api, lesions):
    api, server = site_api
    enrolled_home(home, server)
    api.weights = some_weights()
    api.models = {"global": weights_to_bytes(
        build_network("cnn-small", in_channels=1, num_classes=2, seed=9).state_dict())}  # fmt: skip
    api.task = task_description(
        experiment=8, weights=api.weights, kind="evaluate", options={"models": ["global"]}
    )
    home.save_datasets({"lesions": {"path": str(lesions), "format": "folder"}})

    assert run_site_task(home, 41, 9, "gpu0@test") == "counted"  # the failure was recorded

    assert "task expects" in api.body_of("POST", "tasks/41/failure/")["error"]
    assert not [p for m, p, _, _ in api.requests if m == "POST" and p.endswith("result/")]


# --- no Django at a hospital -----------------------------------------------------------------
def test_the_agent_imports_no_django_and_no_server_module():
    code = (
        "import sys\n"
        "sys.modules['django'] = None  # any import of Django fails\n"
        "import workers.site.__main__, workers.site.worker, workers.site.describe\n"
        "loaded = [m for m in sys.modules if m.startswith(('flproject', 'training.models',\n"
        "          'training.services', 'visualization'))]\n"
        "sys.exit(f'imported {loaded}' if loaded else 0)\n"
    )

    result = subprocess.run(
        [sys.executable, "-c", code], cwd=PROJECT_ROOT, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr


def test_the_cli_prints_its_usage():
    result = subprocess.run(
        [sys.executable, "-m", "workers.site", "--help"], cwd=PROJECT_ROOT, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip

    assert result.returncode == 0
    for command in ("enroll", "datasets", "approvals", "run", "status", "rotate"):
        assert command in result.stdout
