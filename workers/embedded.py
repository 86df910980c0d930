"""The embedded worker: a real Celery worker in a thread of this process.

Used when no REDIS_URL is set: the broker is kombu's in-memory transport, so tasks sent by
this process run in this process, through the same Celery machinery as in a deployment.
The `solo` pool runs one task at a time in its consumer's thread; the `threads` pool stalls
for about two seconds per task on the in-memory transport once its prefetch is full. So the
worker runs FEDLENS_EMBEDDED_CONCURRENCY solo consumers, each in a thread of its own, and
the clients of a round train at once: PyTorch releases the GIL in its kernels, and each
client has FEDLENS_TORCH_THREADS of its own (training/federation.py gives each thread its own
network). A beat thread sends the periodic tasks (the round watchdog) as `celery beat` does
in a deployment.

The tasks of an experiment live in the memory of the process that sent them: each embedded
process records which experiments it drives (flproject/embedded_processes.py), and the
embedded server, as it starts, resumes the experiments that a dead process left running.
"""

import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

from celery import Celery
from celery._state import _set_task_join_will_block
from celery.app import trace
from celery.beat import EmbeddedService
from celery.signals import after_task_publish
from celery.worker import WorkController
from celery.worker import state as worker_state
from django.conf import settings
from django.db import connections

from flproject import embedded_processes
from flproject.celery import app as project_app
from training.models import Experiment, ExperimentStatus, InvalidTransition, Round
from training.queues import (
    AGGREGATE_ROUND_TASK,
    AGGREGATION_QUEUE,
    TRAIN_CLIENT_TASK,
    TRAINING_QUEUE,
)
from training.resume import Resumed, resume_experiment

logger = logging.getLogger(__name__)

READY_TIMEOUT_SECONDS = 30


class EmbeddedWorkController(WorkController):
    """A WorkController that says when its consumer is ready to take tasks."""

    def __init__(self, *args, **kwargs) -> None:
        self.ready = threading.Event()
        super().__init__(*args, **kwargs)

    def on_consumer_ready(self, consumer) -> None:
        super().on_consumer_ready(consumer)
        self.ready.set()


class EmbeddedWorker:
    """Start with `start()`, stop with `stop()`; also a context manager."""

    def __init__(
        self,
        app: Celery = project_app,
        *,
        queues: tuple[str, ...] = (TRAINING_QUEUE, AGGREGATION_QUEUE),
        name: str | None = None,
        beat: bool = True,
        concurrency: int | None = None,
    ) -> None:
        self.app = app
        self.beat = beat
        self.queues = queues
        self.hostname = name or f"embedded@{socket.gethostname()}"
        self.concurrency = concurrency or settings.FEDLENS_EMBEDDED_CONCURRENCY
        self._consumers: list[tuple[EmbeddedWorkController, threading.Thread]] = []
        self._beat = None

    def start(self) -> "EmbeddedWorker":
        # As `celery worker --pool solo` does: tasks see this worker's name and this app,
        # whichever thread runs them.
        trace.setup_worker_optimizations(self.app, self.hostname)
        # Consumers of the same queues under one name: to the ledger and to remote control
        # they are one worker whose pool trains `concurrency` tasks at a time.
        for number in range(1, self.concurrency + 1):
            controller = EmbeddedWorkController(
                app=self.app,
                hostname=self.hostname,
                pool_cls="solo",
                concurrency=1,
                queues=list(self.queues),
                # Gossip, mingle and heartbeats talk to other workers; there are none.
                without_gossip=True,
                without_mingle=True,
                without_heartbeat=True,
                optimization="fair",
            )
            thread = threading.Thread(
                target=controller.start, name=f"fedlens-embedded-worker-{number}", daemon=True
            )
            thread.start()
            self._consumers.append((controller, thread))
        for controller, _ in self._consumers:
            if not controller.ready.wait(READY_TIMEOUT_SECONDS):
                self.stop()
                raise RuntimeError(
                    f"The embedded Celery worker did not start in {READY_TIMEOUT_SECONDS} s."
                )
        # The solo pool marks the whole process as "inside a task", which forbids waiting on
        # results; only the consumer threads run tasks, so the other threads may wait (Celery's
        # own test worker resets the flag the same way).
        _set_task_join_will_block(False)
        if self.beat:
            # The in-memory scheduler: nothing to keep on disk, the schedule is in settings.
            self._beat = EmbeddedService(
                self.app, thread=True, scheduler_cls="celery.beat:Scheduler"
            )
            self._beat.start()
        logger.info(
            "Embedded Celery worker %s consumes %s, %s tasks at a time",
            self.hostname,
            ", ".join(self.queues),
            self.concurrency,
        )
        return self

    def stop(self, *, wait_for_idle: bool = True) -> None:
        """Stop consuming. A consumer between tasks takes no message once stopped, but its
        thread ends only when its poll of the broker times out (2 s in Celery's loop):
        ``wait_for_idle=False``, for a process about to exit, waits only while a task runs."""
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        for controller, _ in self._consumers:
            controller.stop(in_sighandler=False)
        for _, thread in self._consumers:
            if wait_for_idle or worker_state.active_requests:
                thread.join(timeout=10)
        trace.reset_worker_optimizations(self.app)
        self._consumers = []

    def __enter__(self) -> "EmbeddedWorker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


_process_worker: EmbeddedWorker | None = None
_process_worker_lock = threading.Lock()


def start_embedded_worker() -> EmbeddedWorker:
    """The process's one embedded worker, started on first call, after resuming what dead
    embedded processes left running (before its watchdog first looks at their rounds)."""
    global _process_worker
    with _process_worker_lock:
        if _process_worker is None:
            # uvicorn's worker processes import the application inside their event loop,
            # where Django refuses database queries: start from a thread of its own.
            with ThreadPoolExecutor(1, thread_name_prefix="embedded-start") as starter:
                _process_worker = starter.submit(_resume_orphans_and_start).result()
        return _process_worker


def _resume_orphans_and_start() -> EmbeddedWorker:
    try:
        for resumed in resume_orphaned_experiments():
            logger.warning(
                "Resumed experiment %s, left running by a process that died: sent %s again.",
                resumed.experiment.pk,
                resumed.what,
            )
        return EmbeddedWorker().start()
    finally:
        connections.close_all()  # this thread's own connections; it ends here


# --- Which experiments this process drives -------------------------------------------------


@lru_cache(maxsize=4096)
def experiment_of_round(round_id: int) -> int | None:
    return Round.objects.filter(pk=round_id).values_list("experiment_id", flat=True).first()


def hold_experiment_of_published_task(sender=None, body=None, **kwargs) -> None:
    """After this process sent a round's task: the experiment's work is in this process."""
    if sender not in (TRAIN_CLIENT_TASK, AGGREGATE_ROUND_TASK):
        return
    args = body[0] if isinstance(body, tuple | list) and body else []
    round_id = args[1] if sender == TRAIN_CLIENT_TASK else args[0]
    experiment_id = experiment_of_round(round_id)
    if experiment_id is not None:
        embedded_processes.hold(experiment_id)


def track_driven_experiments() -> None:
    """From WorkersConfig.ready() in embedded mode; dispatch_uid makes a second call
    change nothing."""
    after_task_publish.connect(
        hold_experiment_of_published_task,
        weak=False,
        dispatch_uid="workers.embedded.hold_experiment_of_published_task",
    )


def orphaned_experiments() -> set[int]:
    """Running experiments that no live embedded process drives: their process died."""
    running = set(
        Experiment.objects.filter(status=ExperimentStatus.RUNNING).values_list("pk", flat=True)
    )
    if not running:
        return set()  # no need to read the registry
    return running - embedded_processes.held_experiments()


def resume_orphaned_experiments() -> list[Resumed]:
    """Resume every experiment left running by a dead embedded process, in this process.
    One process at a time, so that two servers starting together share them out."""
    resumed = []
    with embedded_processes.exclusive():
        for experiment_id in sorted(orphaned_experiments()):
            try:
                resumed.append(resume_experiment(experiment_id))
            except InvalidTransition:
                continue  # stopped, or taken up by another process, meanwhile
    return resumed
