"""Many simulated clients in Redis mode: round time, queries per client task, the dashboard.

    .venv/bin/python benchmarks/scale.py [--clients 50,200] [--rounds 20] [--workers 2]

For each client count it runs one experiment of a tiny network (cnn-small on 32x32 images,
about eight samples per client, one local step) with that many simulated clients in every
round, through the distributed set-up: a PostgreSQL database of its own, a Redis server of
its own (started here on a free port; ``BENCH_REDIS_URL`` uses another instead, whose db it
empties), and ``--workers`` real ``celery worker`` processes (prefork, one process each, as
one per GPU would be). The work is so small that the platform's own costs dominate.

Each worker counts the SQL statements that every task sends through Django (an execute
wrapper on its connection, installed when its process starts) and writes them down per
task. The table gives a round's wall time (from its opening to the next one's; the first
round, which reads the images, and the last, which has no next one, left out), the platform
time per client task (wall time of all rounds over the tasks run, as two workers share
them), the queries per client task and per aggregation, and the WebSocket snapshot a
browser receives on connecting to the finished experiment: the time to read it from the
ledger and encode it as JSON (median of five) and its size.
"""

import argparse
import itertools
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
POSTGRES_ADMIN_URL = os.environ.get("BENCH_POSTGRES_URL", "postgres://postgres@127.0.0.1:5432")
# Under the project, as round_overhead.py explains: file creation in this /tmp is slow.
DATA_ROOT = PROJECT_ROOT / "data"
TRAIN_TASK = "workers.tasks.train_client"
AGGREGATE_TASK = "workers.tasks.aggregate_round"


def child_env(data_dir: Path, database: str, redis_url: str) -> dict[str, str]:
    # Debug off, as in production: Django's debug cursor would log every query.
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "flproject.settings.local",
        "DJANGO_DEBUG": "false",
        "FEDLENS_DATA_DIR": str(data_dir),
        "PYTHONPATH": str(PROJECT_ROOT),
        "LOG_LEVEL": "WARNING",
        "DATABASE_URL": f"{POSTGRES_ADMIN_URL}/{database}",
        "REDIS_URL": redis_url,
    }
    return env


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_redis() -> tuple[subprocess.Popen | None, str]:
    """A Redis server for this run alone, unless BENCH_REDIS_URL names one."""
    if "BENCH_REDIS_URL" in os.environ:
        import redis

        redis.Redis.from_url(os.environ["BENCH_REDIS_URL"]).flushdb()
        return None, os.environ["BENCH_REDIS_URL"]
    port = free_port()
    server = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
    )
    return server, f"redis://127.0.0.1:{port}/0"


def worker(name: str, queries_dir: str) -> None:
    """A `celery worker` that writes down how many queries each of its tasks sent."""
    from celery.signals import task_postrun, task_prerun, worker_process_init

    from flproject.celery import app

    counted = {"queries": 0}

    def count_query(execute, sql, params, many, context):
        counted["queries"] += 1
        return execute(sql, params, many, context)

    @worker_process_init.connect(weak=False)
    def install_counter(**kwargs) -> None:
        from django.db import connection

        connection.execute_wrappers.append(count_query)

    @task_prerun.connect(weak=False)
    def reset(**kwargs) -> None:
        counted["queries"] = 0

    @task_postrun.connect(weak=False)
    def record(task=None, **kwargs) -> None:
        path = Path(queries_dir) / f"{name}-{os.getpid()}.jsonl"
        with path.open("a") as handle:
            entry = {"task": task.name, "args": kwargs.get("args"), "queries": counted["queries"]}
            handle.write(json.dumps(entry) + "\n")

    app.worker_main(
        [
            "worker",
            "--pool",
            "prefork",
            "--concurrency",
            "1",
            "--queues",
            "training,aggregation",
            "--hostname",
            name,
            "--loglevel",
            "WARNING",
            "--without-gossip",
            "--without-mingle",
        ]
    )


def run_experiment(count: int, rounds: int) -> dict:
    """Inside the configured process: one experiment of `count` clients; its timings."""
    import django

    django.setup()
    from django.conf import settings
    from django.contrib.auth import get_user_model
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from flproject.celery import app
    from training import services
    from training.fl.data import generate_synthetic_dataset
    from training.models import Dataset, RoundKind
    from training.runner import create_experiment, simulated_sites
    from visualization.snapshot import experiment_snapshot, visible_experiment

    users = get_user_model().objects
    owner = users.filter(username="bench").first() or users.create_superuser(
        "bench", password=uuid.uuid4().hex
    )
    root = settings.FEDLENS_DATASET_ROOTS[0] / f"tiny-{count}"
    # 8 samples per client, whatever their number, plus the 20 % held out for evaluation.
    generate_synthetic_dataset(root, sites=1, per_site=count * 10, size=32)
    dataset = Dataset.objects.create(
        name=f"tiny-{count}",
        owner=owner,
        storage_format="folder",
        num_classes=2,
        image_shape=[32, 32],
        path=str(root),
    )
    deadline = time.monotonic() + 120
    while not app.control.ping(timeout=1):
        if time.monotonic() > deadline:
            raise SystemExit("The benchmark's Celery workers did not start within 120 s.")
    experiment = create_experiment(
        owner,
        {
            "name": f"scale-{count}",
            "dataset": dataset.pk,
            "sites": [site.slug for site in simulated_sites(count)],
            "num_rounds": rounds,
            "clients_per_round": count,
            "min_clients": count,
            "local_epochs": 1,
            "batch_size": 16,
            "learning_rate": 0.05,
        },
    )
    services.start_experiment(experiment.pk)
    # Until the training rounds are over: the cross-site round that follows has each site
    # evaluate every site's model (its work grows as the square of the sites), so it is
    # left out; the snapshot below is taken while it runs.
    while True:
        experiment.refresh_from_db()
        if experiment.is_terminal or experiment.current_round > rounds:
            break
        time.sleep(0.5)
    ordered = list(experiment.rounds.order_by("number"))
    walls = [
        (later.opened_at - earlier.opened_at).total_seconds()
        for earlier, later in itertools.pairwise(ordered[1:])
    ]
    trained = [fl_round for fl_round in ordered if fl_round.kind == RoundKind.TRAIN]
    total = (ordered[-1].opened_at - experiment.started_at).total_seconds()
    tasks = sum(fl_round.client_updates.count() for fl_round in trained)
    training = sum(
        update.metrics.get("train_seconds", 0.0)
        for fl_round in trained
        for update in fl_round.client_updates.all()
    )
    evaluating = [
        update.pk
        for fl_round in ordered
        if fl_round.kind == RoundKind.EVALUATE
        for update in fl_round.client_updates.all()
    ]
    timings, sizes = [], []
    for _ in range(5):
        started = time.perf_counter()
        with CaptureQueriesContext(connection) as snapshot_queries:
            snapshot = experiment_snapshot(visible_experiment(owner, experiment.pk))
        encoded = json.dumps(snapshot)
        timings.append(time.perf_counter() - started)
        sizes.append(len(encoded.encode()))
    return {
        "clients": count,
        "status": experiment.status,
        "rounds": len(trained),
        "evaluate_updates": evaluating,
        "round_wall_s": statistics.mean(walls),
        "experiment_s": total,
        "tasks": tasks,
        "training_s": training,
        "snapshot_ms": 1000 * statistics.median(timings),
        "snapshot_kb": sizes[-1] / 1024,
        "snapshot_queries": len(snapshot_queries),
        "snapshot_rows": len(snapshot["client_updates"]),
    }


def query_counts(queries_dir: Path, left_out: set[int]) -> dict[str, list[int]]:
    """Queries per task, by task name; client tasks of the updates `left_out` not counted."""
    counts: dict[str, list[int]] = {}
    for path in queries_dir.glob("*.jsonl"):
        for line in path.read_text().splitlines():
            entry = json.loads(line)
            if entry["task"] == TRAIN_TASK and entry["args"][0] in left_out:
                continue
            counts.setdefault(entry["task"], []).append(entry["queries"])
    return counts


def run_size(
    count: int, rounds: int, workers: int, redis_url: str, database: str, data_dir: Path
) -> dict:
    queries_dir = data_dir / f"queries-{count}"
    queries_dir.mkdir()
    env = child_env(data_dir, database, redis_url)
    started = [
        subprocess.Popen(
            [
                sys.executable,
                __file__,
                "--worker",
                f"scale{index}@local",
                "--queries-dir",
                str(queries_dir),
            ],
            cwd=PROJECT_ROOT,
            env=env,
        )
        for index in range(workers)
    ]
    try:
        result = subprocess.run(
            [sys.executable, __file__, "--child", str(count), "--rounds", str(rounds)],
            cwd=PROJECT_ROOT,
            env=env,
            check=True,
            capture_output=True,
            text=True,
        )
    finally:
        for process in started:
            process.terminate()
        for process in started:
            process.wait(60)
    row = json.loads(result.stdout.strip().splitlines()[-1])
    counts = query_counts(queries_dir, set(row["evaluate_updates"]))
    row["train_queries"] = counts.get(TRAIN_TASK, [])
    row["aggregate_queries"] = counts.get(AGGREGATE_TASK, [])
    return row


def spread(values: list[int]) -> str:
    """Median, mean and largest of a list of counts."""
    if not values:
        return "n/a"
    return f"{statistics.median(values):g} / {statistics.mean(values):.1f} / {max(values)}"


def print_table(rows: list[dict], workers: int) -> None:
    print(f"Scale: simulated clients in Redis mode, {workers} worker processes, tiny network")
    print(
        f"{'clients':>7} {'rounds':>6} {'round wall s':>12} {'platform ms/task':>16} "
        f"{'queries/client task':>19} {'queries/aggregation':>19} {'snapshot ms':>11} "
        f"{'snapshot KB':>11} {'snapshot rows':>13}"
    )
    for row in rows:
        # The workers share the tasks: the platform's time per task is the wall time of
        # the training rounds, less the local training each worker did, over the tasks.
        platform = 1000 * (row["experiment_s"] - row["training_s"] / workers) / row["tasks"]
        print(
            f"{row['clients']:>7} {row['rounds']:>6} {row['round_wall_s']:>12.2f} "
            f"{platform:>16.1f} {spread(row['train_queries']):>19} "
            f"{spread(row['aggregate_queries']):>19} {row['snapshot_ms']:>11.0f} "
            f"{row['snapshot_kb']:>11.1f} {row['snapshot_rows']:>13}"
        )
    print(
        "queries: median / mean / largest number of SQL statements a task sent (a worker's "
        "first task of a round reads what it then caches; the last closes the round). "
        "snapshot: read from the ledger and JSON-encoded for a browser joining the "
        "experiment after its training rounds (median of five, while the cross-site round "
        "runs)."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="50,200")
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--queries-dir", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.queries_dir)
        return
    if args.child:
        print(json.dumps(run_experiment(args.child, args.rounds)))
        return
    import psycopg2

    DATA_ROOT.mkdir(exist_ok=True)
    database = f"fedlens_scale_{uuid.uuid4().hex[:8]}"
    admin = psycopg2.connect(f"{POSTGRES_ADMIN_URL}/postgres")
    admin.autocommit = True
    admin.cursor().execute(f"CREATE DATABASE {database}")
    redis_server, redis_url = start_redis()
    rows = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-scale-", dir=DATA_ROOT) as directory:
            data_dir = Path(directory)
            subprocess.run(
                [sys.executable, "manage.py", "migrate", "-v0"],
                cwd=PROJECT_ROOT,
                env=child_env(data_dir, database, redis_url),
                check=True,
            )
            for count in (int(value) for value in args.clients.split(",")):
                rows.append(
                    run_size(count, args.rounds, args.workers, redis_url, database, data_dir)
                )
    finally:
        admin.cursor().execute(f"DROP DATABASE {database} WITH (FORCE)")
        admin.close()
        if redis_server is not None:
            redis_server.terminate()
            redis_server.wait(30)
    print_table(rows, args.workers)


if __name__ == "__main__":
    main()
