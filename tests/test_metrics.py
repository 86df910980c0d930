"""/metrics and the workers' metrics port: FedLens's series, in Prometheus's text format, with
the values of the ledger, the broker and a real run; and a real Prometheus that scrapes them."""

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from datetime import timedelta

import pytest
import redis
from django.conf import settings
from django.db import connection
from django.utils import timezone
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client.parser import text_string_to_metric_families

from flproject.celery import app
from flproject.observability import metrics
from tests.conftest import (
    PROJECT_ROOT,
    free_port,
    needs_redis,
    new_experiment,
    service_env,
    start_celery_worker,
    stop_process,
    wait_for_worker,
    wait_until_finished,
)
from tests.factories import ClientUpdateFactory, ExperimentFactory, RoundFactory, SiteFactory
from training import services
from training.models import ClientUpdateStatus, ExperimentStatus, RoundStatus

# As PromQL names them; the queue metrics are checked where a broker is measured.
FEDLENS_TYPES = {
    "fedlens_experiments": "gauge",
    "fedlens_rounds_closed_total": "counter",
    "fedlens_round_duration_seconds": "histogram",
    "fedlens_client_task_duration_seconds": "histogram",
    "fedlens_client_failures_total": "counter",
    "fedlens_client_late_total": "counter",
    "fedlens_round_recoveries_total": "counter",
    "fedlens_global_accuracy": "gauge",
    "fedlens_global_auc": "gauge",
    "fedlens_global_loss": "gauge",
    "fedlens_participating_clients": "gauge",
    "fedlens_rounds_overdue": "gauge",
    "fedlens_rounds_stuck": "gauge",
    "fedlens_data_disk_free_bytes": "gauge",
    "fedlens_data_disk_total_bytes": "gauge",
}
PROMETHEUS = "/usr/bin/prometheus"
PRODUCTION_ENV = {
    "DJANGO_SETTINGS_MODULE": "flproject.settings.production",
    "DJANGO_SECRET_KEY": "k3y-" + "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJ" * 2,
    "DJANGO_ALLOWED_HOSTS": "fedlens.example.org",
}


class Scraped:
    """One scrape, parsed: `value(name, **labels)` is a sample's value or None."""

    def __init__(self, text: str) -> None:
        self.types = {}
        self.samples = {}
        for family in text_string_to_metric_families(text):
            # The parser names a counter family without `_total`; PromQL names it with.
            name = f"{family.name}_total" if family.type == "counter" else family.name
            self.types[name] = family.type
            for sample in family.samples:
                self.samples[(sample.name, frozenset(sample.labels.items()))] = sample.value

    def value(self, name: str, **labels: str) -> float | None:
        return self.samples.get((name, frozenset(labels.items())))


def scrape(client, **headers) -> Scraped:
    response = client.get("/metrics", **headers)
    assert response.status_code == 200, response.content
    return Scraped(response.content.decode())


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - local servers
    try:
        with urllib.request.urlopen(request, timeout=5) as response:  # noqa: S310
            return response.status, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.read()


@pytest.fixture
def fresh_queue_collector(monkeypatch):
    """No consumer counts cached by an earlier test's scrape."""
    monkeypatch.setattr(metrics, "QUEUES", metrics.QueueCollector())


@pytest.mark.django_db
def test_every_fedlens_metric_is_exported_with_its_type(client):
    scraped = scrape(client)

    exported = {name: kind for name, kind in scraped.types.items() if name in FEDLENS_TYPES}
    assert exported == FEDLENS_TYPES


@pytest.mark.django_db
def test_experiments_are_counted_by_status_including_the_empty_ones(client):
    for status in ("running", "completed", "completed", "stopped"):
        ExperimentFactory(status=status)

    scraped = scrape(client)

    assert scraped.value("fedlens_experiments", status="completed") == 2
    assert scraped.value("fedlens_experiments", status="running") == 1
    assert scraped.value("fedlens_experiments", status="stopped") == 1
    assert scraped.value("fedlens_experiments", status="failed") == 0


@pytest.mark.django_db
def test_a_running_experiment_reports_its_latest_closed_rounds_held_out_metrics(client):
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING, current_round=3)
    first = {"accuracy": 0.5, "roc_auc": 0.6, "loss": 0.9}
    latest = {"accuracy": 0.75, "roc_auc": 0.8, "loss": 0.45}
    for number, held_out in ((1, first), (2, latest)):
        RoundFactory(
            experiment=experiment,
            number=number,
            status=RoundStatus.CLOSED,
            metrics={"global": held_out},
        )
    current = RoundFactory(experiment=experiment, number=3)
    ClientUpdateFactory.create_batch(2, round=current)
    finished = ExperimentFactory(status=ExperimentStatus.COMPLETED)
    RoundFactory(experiment=finished, status=RoundStatus.CLOSED, metrics={"global": latest})

    scraped = scrape(client)

    running = {"experiment": str(experiment.pk)}
    assert scraped.value("fedlens_global_accuracy", **running) == 0.75
    assert scraped.value("fedlens_global_auc", **running) == 0.8
    assert scraped.value("fedlens_global_loss", **running) == 0.45
    assert scraped.value("fedlens_participating_clients", **running) == 2
    assert scraped.value("fedlens_global_accuracy", experiment=str(finished.pk)) is None


@pytest.mark.django_db
def test_only_open_rounds_past_their_deadline_are_overdue(client):
    past = timezone.now() - timedelta(minutes=5)
    RoundFactory(deadline=past)
    RoundFactory(deadline=past, status=RoundStatus.CLOSED)
    RoundFactory(deadline=timezone.now() + timedelta(minutes=5))

    scraped = scrape(client)

    assert scraped.value("fedlens_rounds_overdue") == 1


@pytest.mark.django_db
def test_the_data_disk_is_measured(client):
    usage = shutil.disk_usage(settings.FEDLENS_DATA_DIR)

    scraped = scrape(client)

    assert scraped.value("fedlens_data_disk_total_bytes") == usage.total
    assert scraped.value("fedlens_data_disk_free_bytes") > 0


def running_client(**round_fields):
    experiment = ExperimentFactory(status=ExperimentStatus.RUNNING, current_round=1)
    fl_round = RoundFactory(experiment=experiment, number=1, **round_fields)
    return ClientUpdateFactory(
        round=fl_round, status=ClientUpdateStatus.RUNNING, started_at=timezone.now()
    )


@pytest.mark.django_db
def test_a_failed_client_task_is_counted_and_timed_for_its_site(
    client, django_capture_on_commit_callbacks
):
    update = running_client()
    site = {"site": update.site.slug}

    with django_capture_on_commit_callbacks(execute=True):
        services.record_client_result(update, error="RuntimeError: out of memory")

    scraped = scrape(client)
    assert scraped.value("fedlens_client_failures_total", **site) == 1
    assert scraped.value("fedlens_client_task_duration_seconds_count", **site) == 1
    assert scraped.value("fedlens_client_late_total", **site) is None


@pytest.mark.django_db
def test_a_client_still_running_at_the_deadline_is_counted_late(
    client, django_capture_on_commit_callbacks
):
    update = running_client(deadline=timezone.now() - timedelta(seconds=1))

    with django_capture_on_commit_callbacks(execute=True):
        services.close_overdue_rounds()

    scraped = scrape(client)
    assert scraped.value("fedlens_client_late_total", site=update.site.slug) == 1


@pytest.mark.django_db
def test_a_late_client_that_reports_afterwards_is_timed_but_not_counted_late_twice(
    client, django_capture_on_commit_callbacks
):
    update = running_client(deadline=timezone.now() - timedelta(seconds=1))
    with django_capture_on_commit_callbacks(execute=True):
        services.close_overdue_rounds()

    with django_capture_on_commit_callbacks(execute=True):
        services.record_client_result(update, error="RuntimeError: too slow anyway")

    scraped = scrape(client)
    site = {"site": update.site.slug}
    assert scraped.value("fedlens_client_late_total", **site) == 1
    assert scraped.value("fedlens_client_failures_total", **site) is None
    assert scraped.value("fedlens_client_task_duration_seconds_count", **site) == 1


@pytest.mark.django_db
def test_nothing_is_counted_when_the_transaction_rolls_back(client):
    update = running_client()

    # The test's own transaction never commits: the failure is not counted.
    services.record_client_result(update, error="RuntimeError: out of memory")

    scraped = scrape(client)
    assert scraped.value("fedlens_client_failures_total", site=update.site.slug) is None


@pytest.mark.django_db
def test_metrics_refuse_a_request_without_the_token_when_one_is_set(client, settings):
    settings.FEDLENS_METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmnop"

    response = client.get("/metrics")

    assert response.status_code == 401
    assert response["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.django_db
def test_metrics_refuse_a_wrong_token(client, settings):
    settings.FEDLENS_METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmnop"

    response = client.get("/metrics", HTTP_AUTHORIZATION="Bearer metrics-token-guessed")

    assert response.status_code == 403


@pytest.mark.django_db
def test_metrics_answer_the_right_token(client, settings):
    settings.FEDLENS_METRICS_TOKEN = "metrics-token-0123456789abcdefghijklmnop"

    scraped = scrape(client, HTTP_AUTHORIZATION=f"Bearer {settings.FEDLENS_METRICS_TOKEN}")

    assert scraped.value("fedlens_rounds_overdue") == 0


@pytest.mark.django_db
def test_metrics_answer_a_host_that_allowed_hosts_does_not_list(client):
    """Prometheus addresses each pod or container by its IP address."""
    response = client.get("/metrics", HTTP_HOST="10.42.0.17:8000")

    assert response.status_code == 200


@pytest.mark.django_db
def test_django_prometheus_counts_requests_and_queries(client):
    client.get("/accounts/login/")

    scraped = scrape(client)

    assert scraped.value("django_http_requests_total_by_method_total", method="GET") >= 1
    assert scraped.value("django_db_execute_total", alias="default", vendor=connection.vendor) >= 1


@pytest.mark.redis
@needs_redis
@pytest.mark.django_db
def test_queue_depth_counts_the_messages_waiting_in_a_site_queue_with_any_priority(
    client, fresh_queue_collector
):
    site = SiteFactory(slug=f"depth-{uuid.uuid4().hex[:8]}")
    broker = redis.Redis.from_url(settings.CELERY_BROKER_URL)
    try:
        for priority in (None, None, 9):
            app.send_task("workers.tasks.ping", queue=site.queue, priority=priority)

        scraped = scrape(client)
    finally:
        broker.delete(site.queue, *(f"{site.queue}{RedisChannel.sep}{step}" for step in (3, 6, 9)))
        broker.close()

    assert scraped.types["fedlens_queue_depth"] == "gauge"
    assert scraped.types["fedlens_queue_consumers"] == "gauge"
    assert scraped.value("fedlens_queue_depth", queue=site.queue) == 3
    assert scraped.value("fedlens_queue_consumers", queue=site.queue) == 0


@pytest.mark.redis
@needs_redis
@pytest.mark.django_db
def test_workers_are_asked_for_their_queues_at_most_once_per_cache_period(
    client, fresh_queue_collector, monkeypatch
):
    asked = []

    def count_consumers():
        asked.append(time.monotonic())
        return {"training": 2}

    monkeypatch.setattr(metrics, "count_consumers", count_consumers)

    first, second = scrape(client), scrape(client)

    assert len(asked) == 1
    assert first.value("fedlens_queue_consumers", queue="training") == 2
    assert second.value("fedlens_queue_consumers", queue="training") == 2


def test_a_short_metrics_token_stops_production_start_up():
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=PROJECT_ROOT,
        env=service_env(**PRODUCTION_ENV, FEDLENS_METRICS_TOKEN="change-me"),
        capture_output=True,
        encoding="utf-8",
        timeout=120,
    )

    assert result.returncode != 0
    assert result.stderr.strip().startswith(
        "FedLens cannot start: FEDLENS_METRICS_TOKEN is too weak"
    )


def test_an_empty_multiprocess_folder_stops_start_up():
    """prometheus-client would take it for the current folder and litter it."""
    result = subprocess.run(
        [sys.executable, "manage.py", "check"],
        cwd=PROJECT_ROOT,
        env=service_env(PROMETHEUS_MULTIPROC_DIR=""),
        capture_output=True,
        encoding="utf-8",
        timeout=120,
    )

    assert result.returncode != 0
    assert "FedLens cannot start: PROMETHEUS_MULTIPROC_DIR is empty" in result.stderr


def test_an_embedded_worker_serves_no_metrics_port(settings):
    """Its metrics are the web server's: the same process."""
    settings.FEDLENS_EMBEDDED = True
    settings.FEDLENS_WORKER_METRICS_PORT = free_port()

    metrics.serve_worker_metrics()

    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", settings.FEDLENS_WORKER_METRICS_PORT), timeout=1)


@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_a_distributed_run_is_counted_by_the_worker_and_reported_by_the_web_server(
    client, lesions_dataset, worker_env, tmp_path, fresh_queue_collector
):
    port = free_port()
    env = {
        **worker_env,
        "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "prometheus"),
        "FEDLENS_WORKER_METRICS_PORT": str(port),
    }
    # A site queue of this test's own as well: the consumers of that one are exactly known.
    own_site = SiteFactory(slug=f"metrics-{uuid.uuid4().hex[:8]}")
    experiment = new_experiment(lesions_dataset, num_rounds=2, clients_per_round=3, min_clients=3)
    name = f"metrics-{uuid.uuid4().hex[:6]}@test"
    worker = start_celery_worker(name, f"training,aggregation,{own_site.queue}", env)
    try:
        wait_for_worker(app, name, worker)
        services.start_experiment(experiment.pk)
        wait_until_finished(experiment)
        status, body = http_get(f"http://127.0.0.1:{port}/metrics")
        web = scrape(client)
    finally:
        stop_process(worker)

    assert experiment.status == ExperimentStatus.COMPLETED, experiment.failure_reason
    assert status == 200
    # Counted in the worker's pool process, served by its main process.
    counted = Scraped(body.decode())
    assert counted.value("fedlens_rounds_closed_total") == 2
    assert counted.value("fedlens_round_duration_seconds_count") == 2
    # Two training rounds and the cross-site round: three tasks a site, two rounds counted
    for site in experiment.sites.all():
        assert counted.value("fedlens_client_task_duration_seconds_count", site=site.slug) == 3
        assert counted.value("fedlens_client_failures_total", site=site.slug) is None
    assert counted.value("fedlens_experiments", status="completed") is None  # the web's part
    assert web.value("fedlens_experiments", status="completed") == 1
    assert web.value("fedlens_queue_consumers", queue=own_site.queue) == 1
    assert web.value("fedlens_queue_depth", queue=own_site.queue) == 0
    # Other test runs on the same Redis may have workers of their own on the shared queues.
    assert web.value("fedlens_queue_consumers", queue="training") >= 1
    assert web.value("fedlens_queue_consumers", queue="aggregation") >= 1


def prometheus_binary() -> str:
    if os.path.exists(PROMETHEUS):
        return PROMETHEUS
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI=true but {PROMETHEUS} is missing: apt-get install prometheus")
    pytest.skip(f"{PROMETHEUS} is missing (apt-get install prometheus)")


def wait_for(condition, what: str, process: subprocess.Popen, timeout: float = 90):
    """The first true result of `condition()`; `what` (a string or a function giving one)
    explains a time-out."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            result = condition()
        except OSError:
            result = None
        if result:
            return result
        assert process.poll() is None, f"the process exited\n{process.stdout.read()}"
        assert time.monotonic() < deadline, what() if callable(what) else what
        time.sleep(0.5)


def first_target(prometheus_url: str) -> dict | None:
    status, body = http_get(f"{prometheus_url}/api/v1/targets")
    targets = json.loads(body)["data"]["activeTargets"] if status == 200 else []
    return targets[0] if targets else None


def query(prometheus_url: str, promql: str) -> list[dict]:
    status, body = http_get(f"{prometheus_url}/api/v1/query?query={urllib.parse.quote(promql)}")
    return json.loads(body)["data"]["result"] if status == 200 else []


def test_a_real_prometheus_scrapes_the_production_web_server_with_its_token(tmp_path):
    """As deployed: production settings, two uvicorn workers with PROMETHEUS_MULTIPROC_DIR,
    the bearer token from a file, and the target addressed by IP as service discovery does."""
    binary = prometheus_binary()
    token = "prometheus-test-token-0123456789abcdefghijklmnop"
    env = service_env(
        **PRODUCTION_ENV,
        FEDLENS_METRICS_TOKEN=token,
        PROMETHEUS_MULTIPROC_DIR=str(tmp_path / "prometheus-multiproc"),
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path / "data"),
    )
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput"],
        cwd=PROJECT_ROOT, env=env, check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    web_port, prometheus_port = free_port(), free_port()
    (tmp_path / "metrics-token").write_text(token)
    (tmp_path / "prometheus.yml").write_text(
        json.dumps(
            {
                "global": {"scrape_interval": "1s", "scrape_timeout": "1s"},
                "scrape_configs": [
                    {
                        "job_name": "fedlens-web",
                        "metrics_path": "/metrics",
                        "authorization": {"credentials_file": str(tmp_path / "metrics-token")},
                        "static_configs": [{"targets": [f"127.0.0.1:{web_port}"]}],
                    }
                ],
            }
        )
    )
    web = subprocess.Popen(
        [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(web_port),
         "--workers", "2"],
        cwd=PROJECT_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        encoding="utf-8", errors="replace",
    )  # fmt: skip
    prometheus = subprocess.Popen(
        [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
         f"--storage.tsdb.path={tmp_path / 'tsdb'}",
         f"--web.listen-address=127.0.0.1:{prometheus_port}"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
    )  # fmt: skip
    prometheus_url = f"http://127.0.0.1:{prometheus_port}"
    try:
        wait_for(
            lambda: http_get(f"http://127.0.0.1:{web_port}/healthz")[0] == 200,
            "the web server does not answer",
            web,
        )
        target = wait_for(
            lambda: (
                (target := first_target(prometheus_url)) and target["health"] == "up" and target
            ),
            lambda: f"the target is not up: {first_target(prometheus_url)}",
            prometheus,
        )
        experiments = wait_for(
            lambda: query(prometheus_url, 'fedlens_experiments{status="draft"}'),
            "Prometheus has no FedLens series",
            prometheus,
        )
        disk = query(prometheus_url, "fedlens_data_disk_total_bytes")
        requests = query(prometheus_url, "django_http_requests_before_middlewares_total")
        unauthorized = http_get(f"http://127.0.0.1:{web_port}/metrics")[0]
    finally:
        stop_process(prometheus)
        stop_process(web)

    assert target["labels"]["job"] == "fedlens-web"
    assert float(experiments[0]["value"][1]) == 0
    assert float(disk[0]["value"][1]) > 0
    assert float(requests[0]["value"][1]) >= 1
    assert unauthorized == 401
