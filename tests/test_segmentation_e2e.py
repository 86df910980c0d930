"""Segmentation and volumes end to end through the CLI on the embedded default: the
synthetic sets generated, registered and trained by `run_experiment` to completion."""

import json

import pytest

from tests.conftest import manage

pytestmark = pytest.mark.e2e


def register_synthetic(env, folder, name: str, *options: str) -> str:
    """Generate a synthetic set with ``options``, register it as ``name``; returns the
    registration's message."""
    made = manage("make_synthetic_dataset", "--out", str(folder), *options, env=env)
    assert made.returncode == 0, made.stderr
    registered = manage("register_dataset", "--name", name, "--path", str(folder), env=env)
    assert registered.returncode == 0, registered.stderr
    return registered.stdout


def test_a_2d_segmentation_experiment_reports_dice_every_round(embedded_env, tmp_path):
    env = embedded_env
    registered = register_synthetic(
        env, tmp_path / "datasets" / "organs", "organs",
        "--task", "segmentation", "--dims", "2", "--sites", "3", "--per-site", "6",
        "--size", "32",
    )  # fmt: skip
    assert "'organs' (segmentation): 3 classes" in registered

    result = manage(
        "run_experiment", "--dataset", "organs", "--clients", "3", "--partition", "site",
        "--rounds", "2", "--batch-size", "4", "--lr", "0.01", "--optimizer", "adam",
        "--seed", "0", "--json", str(tmp_path / "summary.json"), env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    # Progress bars only: no library warnings (MONAI's, kombu's) between them.
    assert "warning" not in result.stderr.lower(), result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed", summary["failure_reason"]
    assert summary["configuration"]["network"] == "unet"  # a segmentation set's default
    assert [r["number"] for r in summary["rounds"]] == [1, 2]
    for fl_round in summary["rounds"]:
        assert [c["status"] for c in fl_round["clients"]] == ["succeeded"] * 3
        assert all(0.0 <= c["metrics"]["dice"] <= 1.0 for c in fl_round["clients"])
        metrics = fl_round["global"]
        assert 0.0 <= metrics["dice"] <= 1.0
        assert len(metrics["dice_per_class"]) == 2  # organ, lesion
        assert metrics["hd95"] >= 0.0
        assert "accuracy" not in metrics
        sites = fl_round["federated_evaluation"]["sites"]
        assert sorted(sites) == ["sim-1", "sim-2", "sim-3"]
        assert all(0.0 <= site["dice"] <= 1.0 for site in sites.values())
    assert summary["cross_site"]["status"] == "closed"
    header = next(line for line in result.stdout.splitlines() if line.startswith("round"))
    assert "dice" in header.split() and "accuracy" not in header.split()


def test_a_3d_classification_dataset_trains_through_the_cli(embedded_env, tmp_path):
    env = embedded_env
    registered = register_synthetic(
        env, tmp_path / "datasets" / "volumes", "volumes",
        "--dims", "3", "--sites", "2", "--per-site", "8", "--size", "32", "--depth", "16",
    )  # fmt: skip
    assert "images [16, 32, 32]" in registered

    result = manage(
        "run_experiment", "--dataset", "volumes", "--network", "cnn3d-small", "--clients", "2",
        "--partition", "site", "--rounds", "2", "--batch-size", "4", "--seed", "0",
        "--json", str(tmp_path / "summary.json"), env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["status"] == "completed", summary["failure_reason"]
    for fl_round in summary["rounds"]:
        assert [c["status"] for c in fl_round["clients"]] == ["succeeded"] * 2
        assert 0.0 <= fl_round["global"]["accuracy"] <= 1.0
        assert fl_round["global"]["num_samples"] > 0
