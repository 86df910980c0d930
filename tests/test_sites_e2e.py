"""A federation of three hosts on one machine (tests/hosts.py): the server (HTTPS web and
its Celery worker, as an unprivileged user of its own) and hospitals A and B, each in a
network namespace that reaches only the server's public address, each agent running as its
own Unix user with its data in a folder only that user can read.

The sites enrol with one-time tokens, declare their data (metadata only), and train an
experiment through the Site API and their own broker queue; then what each credential may
reach is tried from outside: another site's task, another site's queue, a tampered
upload, a revoked site.
"""

import hashlib
import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
import redis
import requests
from django.contrib.auth import get_user_model
from django.test import Client

from tests import hosts
from tests.factories import api_token
from tests.hosts import VENV_PYTHON, environment_of, program_pid, run_as, run_as_check
from training.fl.data import generate_synthetic_dataset
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Dataset,
    Experiment,
    ExperimentStatus,
    RoundKind,
    RoundStatus,
)

pytestmark = [pytest.mark.e2e, pytest.mark.postgres, pytest.mark.redis, pytest.mark.worker]

three_hosts = hosts.three_hosts
federation_server = hosts.federation_server
SLUGS = {"a": "hospital-a", "b": "hospital-b"}


@pytest.fixture
def federation_server_extra_env(three_hosts):
    server = three_hosts.server
    return {"FEDLENS_SITE_BROKER_URL": f"redis://{server.public_address}:{server.redis_port}/0"}


def agent_home(site) -> Path:
    return site.home / ".fedlens-site"


def agent_env(site) -> dict[str, str]:
    """All an agent is given: where its own folder is. No server setting, no secret."""
    return {"FEDLENS_SITE_HOME": str(agent_home(site)), "PYTHONUNBUFFERED": "1"}


def agent(site, *arguments: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return run_as_check(
        site, [str(VENV_PYTHON), "-m", "workers.site", *arguments], env=agent_env(site),
        namespace=site.namespace, timeout=timeout,
    )  # fmt: skip


def start_agent(site, log: Path) -> subprocess.Popen:
    with log.open("w") as output:
        return run_as(
            site, [str(VENV_PYTHON), "-m", "workers.site", "run", "--loglevel", "INFO"],
            env=agent_env(site), namespace=site.namespace, stdout=output,
            stderr=subprocess.STDOUT,
        )  # fmt: skip


def stop_agent(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


def manage_as_server(server, *arguments: str) -> subprocess.CompletedProcess:
    return run_as_check(
        server.hosts.server, [str(VENV_PYTHON), "manage.py", *arguments], env=server.env
    )


def site_data(site) -> Path:
    """A small synthetic image folder, owned by the site's user, in its private folder."""
    folder = generate_synthetic_dataset(
        site.data_dir / "lesions", sites=1, per_site=24, size=32, seed=ord(site.label)
    )
    for root, folders, files in os.walk(site.data_dir):
        for name in [*folders, *files]:
            os.chown(Path(root) / name, site.uid, site.gid)
    return folder


def credentials_of(site) -> dict:
    return json.loads((agent_home(site) / "credentials.json").read_text())


class Researcher:
    """The API as a researcher's script uses it, over HTTPS with a user token."""

    def __init__(self, server, token: str) -> None:
        self.url, self.session = server.url, requests.Session()
        # Not trust_env: requests lets REQUESTS_CA_BUNDLE override a session's own CA.
        self.session.trust_env, self.session.verify = False, str(server.ca_file)
        self.session.headers["Authorization"] = f"Token {token}"

    def post(self, path: str, body: dict | None = None) -> dict:
        response = self.session.post(self.url + path, json=body or {}, timeout=30)
        assert response.status_code in (200, 201), response.text
        return response.json()

    def start(self, **settings) -> int:
        experiment = self.post("/api/experiments/", settings)
        self.post(f"/api/experiments/{experiment['id']}/start/")
        return experiment["id"]


def wait_until_ended(experiment_id: int, logs: dict[str, Path], server, timeout=240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        experiment = Experiment.objects.get(pk=experiment_id)
        if experiment.is_terminal:
            return
        time.sleep(0.5)
    tails = "\n".join(f"--- {name}\n{path.read_text()[-3000:]}" for name, path in logs.items())
    pytest.fail(f"experiment {experiment_id} still {experiment.status}\n{tails}\n"
                f"{server.log_tails()}")  # fmt: skip


def test_two_hospitals_train_one_model_without_the_central_database(federation_server):
    server, hosts_ = federation_server, federation_server.hosts
    site_a, site_b = hosts_.sites
    admin = get_user_model().objects.create_superuser("admin", password="unused-secret-1")
    researcher = Researcher(server, api_token(admin))

    # Given: the admin enrols both hospitals, whose operators declare their local data.
    for site in (site_a, site_b):
        issued = manage_as_server(server, "enrol_site", "--slug", SLUGS[site.label])
        assert issued.returncode == 0, issued.stderr
        enrolled = agent(
            site, "enroll", "--server", site.server_url, "--token", issued.stdout.strip(),
            "--ca-file", str(site.ca_file),
        )  # fmt: skip
        assert enrolled.returncode == 0, enrolled.stderr
        declared = agent(
            site, "datasets", "add", "--name", "lesions", "--path", str(site_data(site))
        )
        assert declared.returncode == 0, declared.stderr
    dataset = Dataset.objects.get(name="lesions")
    assert dataset.is_federated and dataset.path == ""
    assert sorted(dataset.declarations.values_list("site__slug", flat=True)) == sorted(
        SLUGS.values()
    )

    logs = {label: hosts_.log_dir / f"agent-{label}.log" for label in SLUGS}
    agents = {site.label: start_agent(site, logs[site.label]) for site in (site_a, site_b)}
    try:
        # When: a researcher runs a two-round experiment over both sites.
        first = researcher.start(
            name="two hospitals", dataset=dataset.pk, sites=list(SLUGS.values()),
            num_rounds=2, clients_per_round=2, min_clients=2, local_epochs=1, batch_size=8,
            learning_rate=0.05, seed=0,
        )  # fmt: skip
        wait_until_ended(first, logs, server)

        # Then: it completed with both sites in every round, and the ledger shows who did it.
        experiment = Experiment.objects.get(pk=first)
        assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
        for fl_round in experiment.rounds.all():
            assert fl_round.status == RoundStatus.CLOSED
            updates = fl_round.client_updates.select_related("site")
            assert {(u.site.slug, u.status) for u in updates} == {
                (slug, ClientUpdateStatus.SUCCEEDED) for slug in SLUGS.values()
            }
            if fl_round.kind == RoundKind.TRAIN:  # 24 samples a site, a fifth for validation
                assert fl_round.metrics["clients"]["num_samples"] == 2 * (24 - 5)
                assert sorted(fl_round.federated_evaluation["sites"]) == sorted(SLUGS.values())
        # After the training rounds, each site evaluated every model on its own data.
        cross_site = experiment.rounds.get(kind=RoundKind.EVALUATE)
        for update in cross_site.client_updates.all():
            assert sorted(update.evaluation) == sorted(["global", *SLUGS.values()])
            assert all(metrics["num_samples"] == 5 for metrics in update.evaluation.values())
        dashboard = Client()
        dashboard.force_login(admin)
        page = dashboard.get("/sites/").content.decode()
        for slug in SLUGS.values():
            row = page.split(f'data-site="{slug}"')[1].split("</tr>")[0]
            assert "connected" in row and "lesions (24)" in row

        # The agents hold no database, no model store and no server secret.
        for label, process in agents.items():
            environment = environment_of(program_pid(process))
            assert "DATABASE_URL" not in environment
            assert "FEDLENS_DATA_DIR" not in environment
            assert "DJANGO_SECRET_KEY" not in environment
            assert str(hosts_.server.data_dir) not in json.dumps(environment), label
        # The server's user cannot read either site's data.
        for site in (site_a, site_b):
            listed = run_as_check(hosts_.server, ["ls", str(site.data_dir)], env={})
            assert listed.returncode != 0 and "Permission denied" in listed.stderr

        # A site's credential reaches its own tasks only.
        key_a = credentials_of(site_a)["credential"]
        task_b = ClientUpdate.objects.filter(site__slug=SLUGS["b"]).first()
        as_a = requests.Session()
        as_a.trust_env, as_a.verify = False, str(server.ca_file)
        as_a.headers["Authorization"] = f"Site {key_a}"
        claimed = as_a.post(f"{server.url}/api/site/tasks/{task_b.pk}/claim/",
                            json={"round": task_b.round_id}, timeout=30)  # fmt: skip
        weights = as_a.get(f"{server.url}/api/site/tasks/{task_b.pk}/weights/", timeout=30)
        assert (claimed.status_code, weights.status_code) == (403, 403)

        # A's broker user can read and consume its own queue, never B's.
        broker_a = redis.Redis.from_url(credentials_of(site_a)["broker_url"])
        assert broker_a.llen("site.hospital-a") == 0  # control: its own queue
        for command in (("BRPOP", "site.hospital-b", 1), ("LRANGE", "site.hospital-b", 0, -1)):
            with pytest.raises(redis.exceptions.NoPermissionError):
                broker_a.execute_command(*command)
        broker_a.close()

        # A tampered upload is refused, and that client recorded as failed; the round goes
        # on without it (site A's agent is stopped so that its task waits for this test).
        stop_agent(agents["a"])
        second = researcher.start(
            name="tampered", dataset=dataset.pk, sites=list(SLUGS.values()), num_rounds=1,
            clients_per_round=2, min_clients=1, local_epochs=1, batch_size=8, seed=1,
        )  # fmt: skip
        task_a = ClientUpdate.objects.get(round__experiment=second, site__slug=SLUGS["a"])
        url = f"{server.url}/api/site/tasks/{task_a.pk}"
        assert as_a.post(f"{url}/claim/", json={"round": task_a.round_id}, timeout=30).ok
        body = bytearray(as_a.get(f"{url}/weights/", timeout=30).content)
        declared_sha256 = hashlib.sha256(body).hexdigest()
        body[-1] ^= 0xFF  # changed on the way
        refused = as_a.put(
            f"{url}/update/", data=bytes(body), timeout=30,
            headers={"X-Content-SHA256": declared_sha256,
                     "Content-Type": "application/octet-stream"},
        )  # fmt: skip
        assert refused.status_code == 400 and "SHA-256" in refused.json()["detail"]
        agents["a"] = start_agent(site_a, logs["a"])  # for the cross-site round that follows
        wait_until_ended(second, logs, server)
        outcome = Experiment.objects.get(pk=second)
        assert outcome.status == ExperimentStatus.COMPLETED, outcome.failure_reason
        failed = ClientUpdate.objects.get(pk=task_a.pk)
        assert failed.status == ClientUpdateStatus.FAILED
        assert "Update refused" in failed.error
        trained_b = ClientUpdate.objects.get(
            round__experiment=second, round__kind=RoundKind.TRAIN, site__slug=SLUGS["b"]
        )
        assert trained_b.status == ClientUpdateStatus.SUCCEEDED

        # A revoked site is refused by the API and by the broker.
        revoked = manage_as_server(server, "revoke_site", "--slug", SLUGS["b"])
        assert revoked.returncode == 0, revoked.stderr
        status_b = agent(site_b, "status")
        assert status_b.returncode != 0
        assert "revoked" in status_b.stderr
        with pytest.raises(redis.exceptions.AuthenticationError):
            redis.Redis.from_url(credentials_of(site_b)["broker_url"]).ping()
    finally:
        for process in agents.values():
            stop_agent(process)
