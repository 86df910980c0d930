"""Start one Celery worker process per visible GPU, or one CPU worker when there is none.

    python -m workers.launch --queues training,site.st-mary

Each GPU worker sees only its own GPU (CUDA_VISIBLE_DEVICES), runs one task at a time and
is named gpu<N>@<host>, so Flower and the ledger show which GPU trained what. The launcher
stays in the foreground, passes SIGTERM/SIGINT on to its workers (a warm shutdown: running
tasks finish) and restarts a worker that dies.
"""

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

from training.queues import TRAINING_QUEUE

RESTART_DELAY_SECONDS = 5
DEFAULT_APP = "flproject"


@dataclass(frozen=True)
class WorkerPlan:
    name: str
    cuda_visible_devices: str | None  # None: a CPU worker, CUDA hidden

    def command(
        self, queues: str, loglevel: str, *, app: str = DEFAULT_APP, options: Sequence[str] = ()
    ) -> list[str]:
        """The worker's command line; ``app`` is the Celery app (the site agent has its own)
        and ``options`` more `celery worker` options."""
        return [
            sys.executable, "-m", "celery", "-A", app, "worker",
            "--queues", queues,
            "--hostname", self.name,
            "--pool", "prefork",
            "--concurrency", "1",
            "--prefetch-multiplier", "1",
            "--loglevel", loglevel,
            *options,
        ]  # fmt: skip

    def environment(self) -> dict[str, str]:
        env = dict(os.environ)
        # An empty CUDA_VISIBLE_DEVICES hides every GPU from a CPU worker.
        env["CUDA_VISIBLE_DEVICES"] = self.cuda_visible_devices or ""
        return env


def visible_gpu_ids() -> list[str]:
    """The GPUs this launcher may hand out, as CUDA_VISIBLE_DEVICES names them."""
    import torch

    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    inherited = os.environ.get("CUDA_VISIBLE_DEVICES")
    if inherited:
        # Already restricted (e.g. by Kubernetes): hand out exactly those devices.
        return [device.strip() for device in inherited.split(",") if device.strip()][:count]
    return [str(index) for index in range(count)]


def plan_workers(gpu_ids: list[str], host: str) -> list[WorkerPlan]:
    if not gpu_ids:
        return [WorkerPlan(name=f"cpu@{host}", cuda_visible_devices=None)]
    return [
        WorkerPlan(name=f"gpu{index}@{host}", cuda_visible_devices=device)
        for index, device in enumerate(gpu_ids)
    ]


class Supervisor:
    def __init__(
        self,
        plans: list[WorkerPlan],
        queues: str,
        loglevel: str,
        *,
        app: str = DEFAULT_APP,
        options: Sequence[str] = (),
    ) -> None:
        self.plans, self.queues, self.loglevel = plans, queues, loglevel
        self.app, self.options = app, tuple(options)
        self.processes: dict[WorkerPlan, subprocess.Popen] = {}
        self.stopping = False

    def spawn(self, plan: WorkerPlan) -> None:
        self.processes[plan] = subprocess.Popen(  # noqa: S603 - our own interpreter and args
            plan.command(self.queues, self.loglevel, app=self.app, options=self.options),
            env=plan.environment(),
        )
        print(f"started {plan.name} (pid {self.processes[plan].pid})", flush=True)

    def stop(self, signum, _frame) -> None:
        self.stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signum)

    def run(self) -> int:
        signal.signal(signal.SIGTERM, self.stop)
        signal.signal(signal.SIGINT, self.stop)
        for plan in self.plans:
            self.spawn(plan)
        while True:
            for plan, process in list(self.processes.items()):
                code = process.poll()
                if code is None or self.stopping:
                    continue
                print(f"{plan.name} exited with {code}; restarting", file=sys.stderr, flush=True)
                time.sleep(RESTART_DELAY_SECONDS)
                if not self.stopping:
                    self.spawn(plan)
            if self.stopping and all(p.poll() is not None for p in self.processes.values()):
                return 0
            time.sleep(0.5)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--queues", default=TRAINING_QUEUE, help="comma-separated Celery queues")
    parser.add_argument("--hostname", default=os.uname().nodename, help="the node's name")
    parser.add_argument("--loglevel", default=os.environ.get("LOG_LEVEL", "INFO"))
    parser.add_argument("--dry-run", action="store_true", help="print the worker commands and exit")
    args = parser.parse_args(argv)
    plans = plan_workers(visible_gpu_ids(), args.hostname)
    if args.dry_run:
        for plan in plans:
            devices = plan.cuda_visible_devices or "none (CPU)"
            command = " ".join(plan.command(args.queues, args.loglevel))
            print(f"CUDA_VISIBLE_DEVICES={devices} {command}")
        return 0
    return Supervisor(plans, args.queues, args.loglevel).run()


if __name__ == "__main__":
    sys.exit(main())
