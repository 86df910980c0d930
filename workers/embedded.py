"""The embedded worker: a real Celery worker in a thread of this process.

Used when no REDIS_URL is set: the broker is kombu's in-memory transport, so tasks sent by
this process run in this process, through the same Celery machinery as in a deployment.
The `solo` pool runs one task at a time in the worker thread; the `threads` pool stalls for
about two seconds per task on the in-memory transport once its prefetch is full. A beat
thread sends the periodic tasks (the round watchdog) as `celery beat` does in a deployment.
"""

import logging
import socket
import threading

from celery import Celery
from celery._state import _set_task_join_will_block
from celery.app import trace
from celery.beat import EmbeddedService
from celery.worker import WorkController

from flproject.celery import app as project_app
from training.queues import AGGREGATION_QUEUE, TRAINING_QUEUE

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
    ) -> None:
        self.app = app
        self.beat = beat
        self.queues = queues
        self.hostname = name or f"embedded@{socket.gethostname()}"
        self._thread: threading.Thread | None = None
        self._controller: EmbeddedWorkController | None = None
        self._beat = None

    def start(self) -> "EmbeddedWorker":
        # As `celery worker --pool solo` does: tasks see this worker's name and this app,
        # whichever thread runs them.
        trace.setup_worker_optimizations(self.app, self.hostname)
        self._controller = EmbeddedWorkController(
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
        self._thread = threading.Thread(
            target=self._controller.start, name="fedlens-embedded-worker", daemon=True
        )
        self._thread.start()
        if not self._controller.ready.wait(READY_TIMEOUT_SECONDS):
            raise RuntimeError(
                f"The embedded Celery worker did not start in {READY_TIMEOUT_SECONDS} s."
            )
        # The solo pool marks the whole process as "inside a task", which forbids waiting on
        # results; only the worker thread runs tasks, so the other threads may wait (Celery's
        # own test worker resets the flag the same way).
        _set_task_join_will_block(False)
        if self.beat:
            # The in-memory scheduler: nothing to keep on disk, the schedule is in settings.
            self._beat = EmbeddedService(
                self.app, thread=True, scheduler_cls="celery.beat:Scheduler"
            )
            self._beat.start()
        logger.info("Embedded Celery worker %s consumes %s", self.hostname, ", ".join(self.queues))
        return self

    def stop(self) -> None:
        if self._beat is not None:
            self._beat.stop()
            self._beat = None
        if self._controller is not None:
            self._controller.stop(in_sighandler=False)
        if self._thread is not None:
            self._thread.join(timeout=10)
        trace.reset_worker_optimizations(self.app)
        self._controller = self._thread = None

    def __enter__(self) -> "EmbeddedWorker":
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()


_process_worker: EmbeddedWorker | None = None
_process_worker_lock = threading.Lock()


def start_embedded_worker() -> EmbeddedWorker:
    """The process's one embedded worker, started on first call."""
    global _process_worker
    with _process_worker_lock:
        if _process_worker is None:
            _process_worker = EmbeddedWorker().start()
        return _process_worker
