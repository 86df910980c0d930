"""What an operator, a load balancer or Kubernetes needs to know about this process.

`/health` reports every part in detail; `/healthz` (liveness) only says that the process
answers, so that a database outage never gets the process restarted; `/readyz` (readiness) says
whether it can serve: database and broker reachable, no migration left to apply.
"""

import logging
import shutil
import time

import psutil
from django.conf import settings
from django.db import DatabaseError, connection
from django.db.migrations.executor import MigrationExecutor
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection

import flproject
from training import recovery

# Below this much free space the model store can no longer take a checkpoint safely.
MIN_FREE_DISK_BYTES = 256 * 1024 * 1024
BROKER_TIMEOUT_SECONDS = 2

logger = logging.getLogger(__name__)


def failure(part: str, exc: Exception) -> dict:
    # The reply names only the kind of error: it is public, and messages carry host names.
    logger.warning("health check of %s failed: %s", part, exc)
    return {"ok": False, "error": type(exc).__name__}


def check_database() -> dict:
    started = time.perf_counter()
    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
            cursor.fetchone()
    except DatabaseError as exc:
        return failure("database", exc)
    return {
        "ok": True,
        "vendor": connection.vendor,
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def check_broker() -> dict:
    started = time.perf_counter()
    url = settings.CELERY_BROKER_URL
    try:
        with Connection(url, connect_timeout=BROKER_TIMEOUT_SECONDS) as broker:
            broker.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT_SECONDS)
    except Exception as exc:  # kombu raises transport-specific errors
        return failure("broker", exc)
    return {
        "ok": True,
        "transport": "memory (embedded)" if settings.FEDLENS_EMBEDDED else "redis",
        "latency_ms": round((time.perf_counter() - started) * 1000, 2),
    }


def check_migrations() -> dict:
    """A process that runs code newer than the database schema must not take requests."""
    try:
        executor = MigrationExecutor(connection)
        plan = executor.migration_plan(executor.loader.graph.leaf_nodes())
    except DatabaseError as exc:
        return failure("migrations", exc)
    return {"ok": not plan, "unapplied": len(plan)}


def check_disk() -> dict:
    usage = shutil.disk_usage(settings.FEDLENS_DATA_DIR)
    return {
        "ok": usage.free >= MIN_FREE_DISK_BYTES,
        "path": str(settings.FEDLENS_DATA_DIR),
        "free_bytes": usage.free,
        "total_bytes": usage.total,
    }


def check_memory() -> dict:
    memory = psutil.virtual_memory()
    return {
        "ok": True,
        "available_bytes": memory.available,
        "total_bytes": memory.total,
        "process_rss_bytes": psutil.Process().memory_info().rss,
    }


def check_rounds() -> dict:
    """Rounds stuck in aggregation past their deadline, which the watchdog should have moved
    on within a minute: the process still serves (ok), but training is degraded."""
    try:
        stuck = recovery.stuck_rounds()
    except DatabaseError as exc:
        return failure("rounds", exc)
    return {"ok": True, "degraded": stuck > 0, "stuck": stuck}


def verdict(checks: dict[str, dict]) -> tuple[dict, int]:
    """The reply's body and status for a set of checks: 503 naming the parts that failed;
    200 "degraded" naming the parts that work but not as they should."""
    failed = [name for name, result in checks.items() if not result["ok"]]
    degraded = [name for name, result in checks.items() if result.get("degraded")]
    status = "fail" if failed else "degraded" if degraded else "ok"
    body = {"status": status, "failed": failed, "degraded": degraded, "checks": checks}
    return body, 503 if failed else 200


@never_cache
@require_GET
def health(request):
    checks = {
        "database": check_database(),
        "broker": check_broker(),
        "disk": check_disk(),
        "memory": check_memory(),
    }
    if checks["database"]["ok"]:  # rounds are known only to a database that answers
        checks["rounds"] = check_rounds()
    body, status = verdict(checks)
    body["version"] = flproject.__version__
    body["mode"] = "embedded" if settings.FEDLENS_EMBEDDED else "distributed"
    return JsonResponse(body, status=status)


@never_cache
@require_GET
def healthz(request):
    return JsonResponse({"status": "ok"})


@never_cache
@require_GET
def readyz(request):
    checks = {"database": check_database(), "broker": check_broker()}
    if checks["database"]["ok"]:  # migrations are known only to a database that answers
        checks["migrations"] = check_migrations()
    body, status = verdict(checks)
    return JsonResponse(body, status=status)
