"""FedLens's Prometheus metrics, and how each process serves them.

Two kinds of metric:

* Events are counters and histograms of prometheus-client (rounds closed, how long a round and
  a client's training task took, clients that failed or were late). They count the ledger's
  signals (training/signals.py), connected in ObservabilityConfig.ready(), once the sender's
  transaction commits: mostly in Celery pool processes, in the web process for an embedded
  worker.
* State is read when Prometheus scrapes, by collectors (experiments by status, the latest
  held-out metrics and clients of running experiments, overdue rounds, queue depths and
  consumers, the data disk), so nothing has to keep it up to date and a restart loses none.

Where they are served:

* The web server's /metrics (`metrics_view`): django-prometheus's request and database metrics,
  the web processes' events, and the state. Every web replica reports the same state, so
  dashboards aggregate FedLens gauges with max, and counters with sum.
* A worker's own HTTP port, FEDLENS_WORKER_METRICS_PORT (e.g. 9808): the events of its pool
  processes, served from the worker's main process once it is ready (`serve_worker_metrics`),
  never the state, which would otherwise be reported once more per worker.

Processes: with PROMETHEUS_MULTIPROC_DIR set, prometheus-client keeps every process's values
in files of that folder, and a scrape sums them: one /metrics covers all uvicorn workers, one
worker port all pool processes, and all Celery workers of a container that share the folder
(`python -m workers.launch` runs one per GPU; the first to bind the port serves them all). Give
each container a folder of its own that starts empty (a tmpfs or an emptyDir); FedLens never
empties it, as one worker cannot tell its siblings' files from a dead process's, and files left
by an earlier run are summed in too (counters then carry on from where they were). Without the
folder each process counts for itself: right for a single process (runserver, one uvicorn, the
embedded worker, `--pool solo`), blind to the counts of prefork pool processes.
"""

import hmac
import logging
import os
import threading
import time
from collections.abc import Iterable, Iterator

import redis
from django.conf import settings
from django.db import DatabaseError, transaction
from django.db.models import Count, F, OuterRef, Q, Subquery
from django.http import HttpResponse
from django.utils import timezone
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu.transport.redis import Channel as RedisChannel
from prometheus_client import REGISTRY, CollectorRegistry, Counter, Histogram, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.exposition import choose_encoder
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.process_collector import ProcessCollector
from prometheus_client.registry import Collector

from flproject.celery import app as celery_app
from flproject.health import check_disk
from training import recovery, signals
from training.models import (
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    ExperimentStatus,
    Round,
    RoundKind,
    RoundStatus,
    Site,
)
from training.queues import AGGREGATION_QUEUE, TRAINING_QUEUE, site_queue

logger = logging.getLogger(__name__)

# A round lasts seconds on the synthetic demo and hours across real sites; a client's task is
# bounded by FEDLENS_TASK_TIME_LIMIT (an hour by default).
ROUND_DURATION_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400)
CLIENT_TASK_BUCKETS = (0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)
# Asking the workers which queues they consume waits for every reply until the time-out, so the
# answer is kept for a while to keep scrapes cheap.
CONSUMERS_TIMEOUT_SECONDS = 1.0
CONSUMERS_CACHE_SECONDS = 15.0
BROKER_TIMEOUT_SECONDS = 1.0

# --- Events -------------------------------------------------------------------------------------
ROUNDS_CLOSED = Counter("fedlens_rounds_closed_total", "Federated rounds aggregated and closed.")
ROUND_DURATION = Histogram(
    "fedlens_round_duration_seconds",
    "Wall time of a round, from its opening to its closing.",
    buckets=ROUND_DURATION_BUCKETS,
)
CLIENT_TASK_DURATION = Histogram(
    "fedlens_client_task_duration_seconds",
    "Duration of a client's task (local training, or the cross-site round's evaluation), "
    "from its start to its recorded result.",
    ["site"],
    buckets=CLIENT_TASK_BUCKETS,
)
CLIENT_FAILURES = Counter(
    "fedlens_client_failures_total", "Client training tasks that failed.", ["site"]
)
# Counted by the watchdog (workers/tasks.py), in the worker that runs Celery beat's task.
ROUND_RECOVERIES = Counter(
    "fedlens_round_recoveries_total",
    "Lost work of a round sent again by the watchdog: a client task that a dead worker or "
    "the broker lost (lost=client_task), or an aggregation (lost=aggregation).",
    ["lost"],
)
for lost in ("client_task", "aggregation"):  # exported at 0, so that increase() sees the first
    ROUND_RECOVERIES.labels(lost=lost)
CLIENT_LATE = Counter(
    "fedlens_client_late_total",
    "Clients that had not reported when their round closed.",
    ["site"],
)


# Receivers of the ledger's signals. Counted once the transaction commits, so that a
# rolled-back change never counts.
def count_round_closed(sender, *, fl_round: Round, **kwargs) -> None:
    if fl_round.kind != RoundKind.TRAIN:  # the cross-site round aggregates nothing
        return
    duration_seconds = fl_round.metrics["wall_seconds"]

    def record() -> None:
        ROUNDS_CLOSED.inc()
        ROUND_DURATION.observe(duration_seconds)

    transaction.on_commit(record)


def observe_client_task(sender, *, site_slug: str, duration_seconds: float, **kwargs) -> None:
    transaction.on_commit(
        lambda: CLIENT_TASK_DURATION.labels(site=site_slug).observe(duration_seconds)
    )


def count_client_failure(sender, *, client_update: ClientUpdate, **kwargs) -> None:
    if client_update.status == ClientUpdateStatus.FAILED:
        site = client_update.site.slug
        transaction.on_commit(lambda: CLIENT_FAILURES.labels(site=site).inc())


def count_client_late(sender, *, client_update: ClientUpdate, **kwargs) -> None:
    site = client_update.site.slug
    transaction.on_commit(lambda: CLIENT_LATE.labels(site=site).inc())


def connect_to_the_ledger() -> None:
    """From ObservabilityConfig.ready(); dispatch_uid makes a second call change nothing."""
    for signal, counter in (
        (signals.round_closed, count_round_closed),
        (signals.client_task_ended, observe_client_task),
        (signals.client_reported, count_client_failure),
        (signals.client_late, count_client_late),
    ):
        signal.connect(counter, dispatch_uid=f"flproject.observability.metrics.{counter.__name__}")


# --- State, read at scrape time -----------------------------------------------------------------
def experiments_by_status() -> Metric:
    family = GaugeMetricFamily("fedlens_experiments", "Experiments by status.", labels=["status"])
    counts = dict(Experiment.objects.order_by().values_list("status").annotate(Count("pk")))
    for status in ExperimentStatus.values:
        family.add_metric([status], counts.get(status, 0))
    return family


def running_experiments() -> list[Metric]:
    """Clients of the current round, and held-out metrics of the latest closed round."""
    participating = GaugeMetricFamily(
        "fedlens_participating_clients",
        "Clients in the current round of each running experiment.",
        labels=["experiment"],
    )
    # Keyed by the name of the metric in a round's "global" (held-out) metrics.
    held_out = {
        "accuracy": GaugeMetricFamily(
            "fedlens_global_accuracy",
            "Held-out accuracy of the latest closed round of each running experiment.",
            labels=["experiment"],
        ),
        "roc_auc": GaugeMetricFamily(
            "fedlens_global_auc",
            "Held-out ROC AUC of the latest closed round of each running experiment.",
            labels=["experiment"],
        ),
        "loss": GaugeMetricFamily(
            "fedlens_global_loss",
            "Held-out loss of the latest closed round of each running experiment.",
            labels=["experiment"],
        ),
    }
    latest_closed_round = (
        Round.objects.filter(experiment=OuterRef("pk"), status=RoundStatus.CLOSED)
        .order_by("-number")
        .values("pk")[:1]
    )
    running = Experiment.objects.filter(status=ExperimentStatus.RUNNING).annotate(
        clients=Count("rounds__client_updates", filter=Q(rounds__number=F("current_round"))),
        latest_closed_round=Subquery(latest_closed_round),
    )
    closed_round_ids = []
    for experiment_id, clients, round_id in running.values_list(
        "pk", "clients", "latest_closed_round"
    ):
        participating.add_metric([str(experiment_id)], clients)
        if round_id is not None:
            closed_round_ids.append(round_id)
    closed_rounds = Round.objects.filter(pk__in=closed_round_ids)
    for experiment_id, metrics in closed_rounds.values_list("experiment_id", "metrics"):
        # No held-out set gives no "global" metrics; one class present gives no AUC.
        evaluation = metrics.get("global") or {}
        for key, family in held_out.items():
            if evaluation.get(key) is not None:
                family.add_metric([str(experiment_id)], evaluation[key])
    return [participating, *held_out.values()]


def overdue_rounds() -> Metric:
    return GaugeMetricFamily(
        "fedlens_rounds_overdue",
        "Open rounds past their deadline (the watchdog should close them).",
        value=Round.objects.filter(status=RoundStatus.OPEN, deadline__lt=timezone.now()).count(),
    )


def stuck_rounds() -> Metric:
    return GaugeMetricFamily(
        "fedlens_rounds_stuck",
        "Rounds still aggregating past their aggregation deadline (the watchdog sends a "
        "lost aggregation again within a minute: it is not running, or not succeeding).",
        value=recovery.stuck_rounds(),
    )


class LedgerCollector(Collector):
    """Experiments, rounds and held-out metrics, from the database."""

    def collect(self) -> list[Metric]:
        try:
            return [
                experiments_by_status(),
                *running_experiments(),
                overdue_rounds(),
                stuck_rounds(),
            ]
        except DatabaseError as exc:
            # The rest of the scrape is still worth having; /readyz reports the database.
            logger.warning("metrics: the ledger could not be read: %s", exc)
            return []


class DiskCollector(Collector):
    """Free and total space of FEDLENS_DATA_DIR (the model store, uploads, datasets)."""

    def collect(self) -> list[Metric]:
        disk = check_disk()
        return [
            GaugeMetricFamily(
                "fedlens_data_disk_free_bytes",
                "Free bytes on the file system of FEDLENS_DATA_DIR.",
                value=disk["free_bytes"],
            ),
            GaugeMetricFamily(
                "fedlens_data_disk_total_bytes",
                "Size in bytes of the file system of FEDLENS_DATA_DIR.",
                value=disk["total_bytes"],
            ),
        ]


def routed_queues() -> list[str]:
    """The queues FedLens sends work to: training, aggregation and each active site's."""
    slugs = Site.objects.filter(is_active=True).order_by("slug").values_list("slug", flat=True)
    return [TRAINING_QUEUE, AGGREGATION_QUEUE, *(site_queue(slug) for slug in slugs)]


def queue_depths(queues: Iterable[str]) -> dict[str, int]:
    """Messages waiting in each queue of the Redis broker.

    kombu's Redis transport keeps a queue as a list named after it, and the messages sent with
    a priority in one more list per priority step, named `<queue><sep><step>`.
    """
    lists = {
        queue: [
            queue,
            *(f"{queue}{RedisChannel.sep}{step}" for step in RedisChannel.priority_steps if step),
        ]
        for queue in queues
    }
    broker = redis.Redis.from_url(
        settings.CELERY_BROKER_URL,
        socket_timeout=BROKER_TIMEOUT_SECONDS,
        socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
    )
    with broker, broker.pipeline(transaction=False) as pipeline:
        for names in lists.values():
            for name in names:
                pipeline.llen(name)
        lengths = iter(pipeline.execute())
    return {queue: sum(next(lengths) for _ in names) for queue, names in lists.items()}


def count_consumers() -> dict[str, int]:
    """Workers consuming each queue, as the workers themselves answer."""
    replies = celery_app.control.inspect(timeout=CONSUMERS_TIMEOUT_SECONDS).active_queues() or {}
    consumers: dict[str, int] = {}
    for queues in replies.values():
        for queue in queues:
            consumers[queue["name"]] = consumers.get(queue["name"], 0) + 1
    return consumers


class QueueCollector(Collector):
    """Depth and consumers of each routed queue; nothing in embedded mode, whose in-memory
    queues live in the web process and are consumed by its own thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._consumers: dict[str, int] = {}
        self._consumers_expire_at = 0.0

    def consumers(self) -> dict[str, int]:
        with self._lock:
            if time.monotonic() >= self._consumers_expire_at:
                self._consumers = count_consumers()
                self._consumers_expire_at = time.monotonic() + CONSUMERS_CACHE_SECONDS
            return self._consumers

    def collect(self) -> list[Metric]:
        if settings.FEDLENS_EMBEDDED:
            return []
        try:
            queues = routed_queues()
            depths = queue_depths(queues)
        except (DatabaseError, redis.RedisError) as exc:
            logger.warning("metrics: the queues could not be measured: %s", exc)
            return []
        depth = GaugeMetricFamily(
            "fedlens_queue_depth", "Messages waiting in each Celery queue.", labels=["queue"]
        )
        for queue in queues:
            depth.add_metric([queue], depths[queue])
        try:
            consumers = self.consumers()
        except Exception as exc:  # kombu raises transport-specific errors
            logger.warning("metrics: the workers could not be asked for their queues: %s", exc)
            return [depth]
        consuming = GaugeMetricFamily(
            "fedlens_queue_consumers", "Workers consuming each Celery queue.", labels=["queue"]
        )
        for queue in queues:
            consuming.add_metric([queue], consumers.get(queue, 0))
        return [depth, consuming]


LEDGER = LedgerCollector()
DISK = DiskCollector()
QUEUES = QueueCollector()


# --- Exposition ---------------------------------------------------------------------------------
def multiprocess_dir() -> str:
    # prometheus-client itself decides at import, from the environment, where values are kept.
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR", "")


def process_metrics() -> Collector:
    """This process's metrics, or with PROMETHEUS_MULTIPROC_DIR the sum over every process
    writing to that folder (plus memory and CPU of the process that answers)."""
    if not multiprocess_dir():
        return REGISTRY
    registry = CollectorRegistry()
    MultiProcessCollector(registry)
    ProcessCollector(registry=registry)
    return registry


class Scrape(Collector):
    """What one scrape of /metrics returns: several collectors, one after the other."""

    def __init__(self, *collectors: Collector) -> None:
        self.collectors = collectors

    def collect(self) -> Iterator[Metric]:
        for collector in self.collectors:
            yield from collector.collect()


def refusal(request) -> HttpResponse | None:
    """None when the request may read the metrics; otherwise the reply that refuses it."""
    expected = settings.FEDLENS_METRICS_TOKEN
    if not expected:
        return None
    scheme, _, given = request.headers.get("Authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not given.strip():
        response = HttpResponse("Bearer token required.\n", status=401, content_type="text/plain")
        response["WWW-Authenticate"] = 'Bearer realm="metrics"'
        return response
    if not hmac.compare_digest(given.strip().encode(), expected.encode()):
        return HttpResponse("Wrong token.\n", status=403, content_type="text/plain")
    return None


@never_cache
@require_GET
def metrics_view(request):
    refused = refusal(request)
    if refused is not None:
        return refused
    encode, content_type = choose_encoder(request.headers.get("Accept", ""))
    body = encode(Scrape(process_metrics(), LEDGER, QUEUES, DISK))
    return HttpResponse(body, content_type=content_type)


def serve_worker_metrics() -> None:
    """Serve the pool processes' event metrics on FEDLENS_WORKER_METRICS_PORT, from a thread of
    a `celery worker`'s main process; the embedded worker's are on the web server's /metrics."""
    port = settings.FEDLENS_WORKER_METRICS_PORT
    if not port or settings.FEDLENS_EMBEDDED:
        return
    if not multiprocess_dir():
        logger.warning(
            "PROMETHEUS_MULTIPROC_DIR is not set: port %s serves only this process's metrics, "
            "not those of its pool processes",
            port,
        )
    try:
        start_http_server(port, registry=process_metrics())
    except OSError as exc:
        # Expected with a shared folder: the first worker of the container to bind serves all.
        level = logging.INFO if multiprocess_dir() else logging.WARNING
        logger.log(level, "worker metrics not served from here, port %s: %s", port, exc)
        return
    logger.info("worker metrics served on port %s", port)
