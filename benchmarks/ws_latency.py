"""Event latency to browsers: publication in a worker process to receipt by every subscriber.

    .venv/bin/python benchmarks/ws_latency.py [--subscribers 50] [--events 200] [--rate 20]

A real FedLens server (uvicorn, the ASGI app) runs in distributed mode: PostgreSQL and the
Redis channel layer. The subscribers connect to ws/experiments/<id>/ with a token and wait
for their snapshot. A separate process, standing in for a Celery worker, publishes events
with the function the tasks use (visualization.events.publish), each carrying its send time.
An event's latency is the time until the last subscriber has it; the table gives the
median and 95th percentile over events, and the same over single deliveries.
"""

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
REDIS_URL = os.environ.get("BENCH_REDIS_URL", "redis://127.0.0.1:6379/14")

SETUP = """
from tests.factories import ExperimentFactory, UserFactory, api_token
owner = UserFactory(username="bench")
print(ExperimentFactory(owner=owner).pk, api_token(owner))
"""

PUBLISH = """
import sys, time
import django
django.setup()
from visualization.events import publish
experiment, count, rate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
time.sleep(1)
for sequence in range(count):
    publish(experiment, {"type": "bench", "sequence": sequence, "sent": time.time()})
    time.sleep(1 / rate)
"""


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


async def subscribe(url: str, token: str, ready: asyncio.Event, ready_count: list[int],
                    subscribers: int, events: int,
                    receipts: dict[int, list[float]]) -> None:  # fmt: skip
    import websockets

    # The token goes in the handshake's subprotocols, never in the URL (visualization/auth.py).
    subprotocols = ["fedlens.token", token]
    async with websockets.connect(url, max_size=None, subprotocols=subprotocols) as socket:
        snapshot = json.loads(await socket.recv())
        if snapshot["type"] != "snapshot":
            raise RuntimeError(f"expected the snapshot first, got {snapshot}")
        ready_count[0] += 1
        if ready_count[0] == subscribers:
            ready.set()
        received = 0
        while received < events:
            message = json.loads(await socket.recv())
            if message.get("type") != "bench":
                continue
            receipts.setdefault(message["sequence"], []).append(time.time() - message["sent"])
            received += 1


async def measure(url: str, token: str, subscribers: int, events: int, publisher_command: list[str],
                  env: dict[str, str]) -> dict[int, list[float]]:  # fmt: skip
    ready, ready_count, receipts = asyncio.Event(), [0], {}
    tasks = [asyncio.create_task(subscribe(url, token, ready, ready_count, subscribers, events,
                                           receipts))
             for _ in range(subscribers)]  # fmt: skip
    await asyncio.wait_for(ready.wait(), timeout=60)
    publisher = await asyncio.create_subprocess_exec(*publisher_command, cwd=PROJECT_ROOT, env=env)
    await asyncio.wait_for(asyncio.gather(*tasks), timeout=events * 2 + 60)
    await publisher.wait()
    return receipts


def main() -> None:
    import psycopg2
    import redis

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=50)
    parser.add_argument("--events", type=int, default=200)
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    args = parser.parse_args()

    database = f"fedlens_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(f"{POSTGRES_ADMIN_URL}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {database}")
    redis.Redis.from_url(REDIS_URL).flushdb()
    server = None
    try:
        with tempfile.TemporaryDirectory(prefix="fedlens-bench-ws-") as data_dir:
            env = {**os.environ, "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
                   "DATABASE_URL": f"{POSTGRES_ADMIN_URL}/{database}", "REDIS_URL": REDIS_URL,
                   "FEDLENS_DATA_DIR": data_dir, "PYTHONPATH": str(PROJECT_ROOT),
                   "LOG_LEVEL": "WARNING"}  # fmt: skip
            run = {"cwd": PROJECT_ROOT, "env": env, "check": True, "capture_output": True,
                   "text": True}  # fmt: skip
            subprocess.run([sys.executable, "manage.py", "migrate", "-v0"], **run)
            experiment, token = subprocess.run(
                [sys.executable, "manage.py", "shell", "--no-imports", "-c", SETUP], **run
            ).stdout.split()
            port = 18000 + os.getpid() % 1000
            server = subprocess.Popen(
                [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port",
                 str(port), "--log-level", "warning"],
                cwd=PROJECT_ROOT, env=env,
            )  # fmt: skip
            time.sleep(4)
            url = f"ws://127.0.0.1:{port}/ws/experiments/{experiment}/"
            publisher = [sys.executable, "-c", PUBLISH, experiment, str(args.events),
                         str(args.rate)]  # fmt: skip
            receipts = asyncio.run(
                measure(url, token, args.subscribers, args.events, publisher, env)
            )
    finally:
        if server is not None:
            server.terminate()
            server.wait(30)
        admin.cursor().execute(f"DROP DATABASE {database} WITH (FORCE)")
        admin.close()
        redis.Redis.from_url(REDIS_URL).flushdb()

    to_all = [max(latencies) * 1000 for latencies in receipts.values()]
    single = [latency * 1000 for latencies in receipts.values() for latency in latencies]
    print(f"WebSocket event latency: {args.subscribers} subscribers, {args.events} events at "
          f"{args.rate:g}/s, Redis channel layer, one uvicorn process")  # fmt: skip
    print(f"{'measure':<36} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for label, values in (("publication -> every subscriber", to_all),
                          ("publication -> one subscriber", single)):  # fmt: skip
        print(f"{label:<36} {statistics.median(values):>8.1f} {percentile(values, 0.95):>8.1f} "
              f"{max(values):>8.1f}")  # fmt: skip


if __name__ == "__main__":
    main()
