"""The comparison workflow on the command line, embedded (no services): `manage.py sweep` runs
a grid to its end a few experiments at a time and prints the comparison; `run_experiment
--clone` runs one again with changes; the research options reach the experiment."""

import itertools
import json
import sqlite3
import subprocess
import sys

import pytest
from django.core.management import call_command
from django.core.management.base import CommandError

from tests.conftest import PROJECT_ROOT, service_env
from tests.factories import UserFactory
from training.fl.data import generate_synthetic_dataset
from training.models import Experiment

pytestmark = pytest.mark.e2e


def manage(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "manage.py", *args],
        cwd=PROJECT_ROOT, env=env, capture_output=True, encoding="utf-8", timeout=600,
    )  # fmt: skip


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """An embedded project with a registered 3-site dataset `lesions`: (env, ledger path)."""
    root = tmp_path_factory.mktemp("sweep-cli")
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(root),
    )
    dataset_dir = root / "datasets" / "lesions"
    for step in (
        ("migrate", "--noinput"),
        ("bootstrap_admin",),
        ("make_synthetic_dataset", "--out", str(dataset_dir), "--sites", "3", "--per-site", "30",
         "--size", "32"),
        ("register_dataset", "--name", "lesions", "--path", str(dataset_dir)),
    ):  # fmt: skip
        result = manage(*step, env=env)
        assert result.returncode == 0, result.stderr
    return env, root / "fedlens.sqlite3"


def rows(ledger, query: str, *params) -> list[tuple]:
    with sqlite3.connect(ledger) as database:
        return database.execute(query, params).fetchall()


def test_a_sweep_runs_its_grid_one_at_a_time_and_prints_the_comparison(project):
    env, ledger = project

    result = manage(
        "sweep", "--dataset", "lesions", "--clients", "3", "--rounds", "2", "--batch-size", "16",
        "--name", "cli sweep", "--vary", "partition=iid,dirichlet:0.5", "--vary", "seed=0,1",
        "--max-running", "1", "--target-value", "0.01", env=env,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr[-3000:]
    experiments = rows(
        ledger,
        "SELECT e.partition, e.seed, e.status, e.started_at, e.finished_at FROM "
        "training_experiment e JOIN training_sweep s ON e.sweep_id = s.id "
        "WHERE s.name = 'cli sweep' ORDER BY e.id",
    )
    assert [(p, s) for p, s, *_ in experiments] == [
        ("iid", 0), ("iid", 1), ("dirichlet:0.5", 0), ("dirichlet:0.5", 1),
    ]  # fmt: skip
    assert {status for _, _, status, *_ in experiments} == {"completed"}
    # One at a time: each started after the one before it had finished.
    for before, after in itertools.pairwise(experiments):
        assert after[3] >= before[4]
    table = result.stdout.splitlines()
    header = next(line for line in table if line.startswith("group"))
    assert "accuracy" in header and "rounds to accuracy 0.01" in header
    group_rows = [line for line in table if line.startswith("partition=")]
    assert [line.split("  ")[0] for line in group_rows] == [
        "partition=iid", "partition=dirichlet:0.5",
    ]  # fmt: skip
    assert all("±" in line and "(2/2)" in line for line in group_rows)


def test_run_experiment_clone_runs_again_with_the_options_given_changed(project, tmp_path):
    env, ledger = project
    first = manage(
        "run_experiment", "--dataset", "lesions", "--clients", "3", "--rounds", "1",
        "--clients-fraction", "0.6", "--weighting", "uniform", "--lr", "0.02", "--seed", "5",
        "--name", "original", env=env,
    )  # fmt: skip
    assert first.returncode == 0, first.stderr[-3000:]
    (source_id,) = rows(ledger, "SELECT id FROM training_experiment WHERE name = 'original'")[0]

    again = manage(
        "run_experiment", "--clone", str(source_id), "--seed", "6",
        "--json", str(tmp_path / "again.json"), env=env,
    )  # fmt: skip

    assert again.returncode == 0, again.stderr[-3000:]
    summary = json.loads((tmp_path / "again.json").read_text())
    copy = rows(
        ledger,
        "SELECT cloned_from_id, seed, learning_rate, client_fraction, aggregation_weighting, "
        "clients_per_round, min_clients FROM training_experiment WHERE id = ?",
        summary["experiment"],
    )[0]
    assert copy == (source_id, 6, 0.02, 0.6, "uniform", 2, 2)  # ceil(0.6 x 3)
    assert summary["status"] == "completed"
    assert summary["configuration"]["cloned_from"] == source_id
    assert [len(r["clients"]) for r in summary["rounds"] if r["number"] == 1] == [2]


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("options", "named"),
    [
        (("--strategy", "fedmagic"), "strategy"),
        (("--strategy-params", '{"not_a_parameter": 1}'), "not_a_parameter"),
        (("--clients-fraction", "1.5"), "client_fraction"),
        (("--dp-noise", "1.0"), "dp_clip"),
        (("--local-dp-noise", "1.0"), "local_dp_clip"),
        (("--clone", "999999"), "No experiment 999999"),
    ],
)
def test_run_experiment_refuses_bad_research_options_naming_them(dataset_root, options, named):
    UserFactory(username="admin", is_superuser=True, is_staff=True)
    path = generate_synthetic_dataset(dataset_root / "set", sites=1, per_site=4, size=32)
    call_command("register_dataset", "--name", "set", "--path", str(path))

    with pytest.raises(CommandError, match=named):
        call_command("run_experiment", "--dataset", "set", *options)
    assert not Experiment.objects.exists()


@pytest.mark.django_db
def test_sweep_refuses_a_vary_without_values():
    with pytest.raises(CommandError, match="write FIELD=V1,V2"):
        call_command("sweep", "--dataset", "x", "--vary", "seed")
