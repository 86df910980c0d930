"""The one-worker-per-GPU launcher."""

import signal
import subprocess
import sys
import time
import uuid

import pytest
from django.conf import settings

from flproject.celery import app
from tests.conftest import PROJECT_ROOT, service_env, stop_process
from training.queues import site_queue
from workers.launch import WorkerPlan, plan_workers
from workers.tasks import ping


def test_without_a_gpu_one_cpu_worker_is_planned_with_cuda_hidden():
    plans = plan_workers([], "node7")

    assert plans == [WorkerPlan(name="cpu@node7", cuda_visible_devices=None)]
    assert plans[0].environment()["CUDA_VISIBLE_DEVICES"] == ""


def test_each_gpu_gets_its_own_worker_pinned_to_it():
    plans = plan_workers(["3", "5"], "node7")

    assert [(p.name, p.environment()["CUDA_VISIBLE_DEVICES"]) for p in plans] == [
        ("gpu0@node7", "3"),
        ("gpu1@node7", "5"),
    ]


def test_every_worker_runs_one_task_at_a_time_on_the_given_queues():
    command = plan_workers(["0"], "n")[0].command("training,site.st-mary", "INFO")

    assert command[command.index("--queues") + 1] == "training,site.st-mary"
    assert command[command.index("--concurrency") + 1] == "1"
    assert command[command.index("--prefetch-multiplier") + 1] == "1"
    assert command[command.index("--hostname") + 1] == "gpu0@n"


def test_dry_run_prints_the_worker_commands():
    result = subprocess.run(
        [sys.executable, "-m", "workers.launch", "--queues", "training", "--hostname", "n1",
         "--dry-run"],
        cwd=PROJECT_ROOT, env=service_env(CUDA_VISIBLE_DEVICES=""), capture_output=True,
        encoding="utf-8", errors="replace", timeout=120,
    )  # fmt: skip

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("CUDA_VISIBLE_DEVICES=none (CPU) ")
    assert "--hostname cpu@n1" in result.stdout


@pytest.mark.redis
@pytest.mark.worker
@pytest.mark.skipif(settings.FEDLENS_EMBEDDED, reason="needs Redis (CI=true makes it required)")
def test_the_launched_worker_answers_and_stops_with_the_launcher():
    host = f"launch-{uuid.uuid4().hex[:8]}"
    queue = site_queue(host)
    launcher = subprocess.Popen(
        [sys.executable, "-m", "workers.launch", "--queues", queue, "--hostname", host],
        cwd=PROJECT_ROOT, env=service_env(CUDA_VISIBLE_DEVICES=""),
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, encoding="utf-8", errors="replace",
    )  # fmt: skip
    try:
        reply = ping.apply_async(queue=queue).get(timeout=90)
        launcher.send_signal(signal.SIGTERM)
        exit_code = launcher.wait(timeout=60)
    finally:
        stop_process(launcher)

    assert reply["worker"] == f"cpu@{host}"
    assert exit_code == 0
    time.sleep(1)
    assert not app.control.ping(destination=[f"cpu@{host}"], timeout=1)
