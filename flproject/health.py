"""`/health`: what an operator or a load balancer needs to know about this process."""

import logging
import shutil
import time

import psutil
from django.conf import settings
from django.db import DatabaseError, connection
from django.http import JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_GET
from kombu import Connection

import flproject

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


@never_cache
@require_GET
def health(request):
    checks = {
        "database": check_database(),
        "broker": check_broker(),
        "disk": check_disk(),
        "memory": check_memory(),
    }
    failed = [name for name, result in checks.items() if not result["ok"]]
    body = {
        "status": "fail" if failed else "ok",
        "version": flproject.__version__,
        "mode": "embedded" if settings.FEDLENS_EMBEDDED else "distributed",
        "failed": failed,
        "checks": checks,
    }
    return JsonResponse(body, status=503 if failed else 200)
