"""Which embedded processes are alive, and which experiments each of them drives.

In embedded mode an experiment's tasks wait in the memory of the process that sent them
(kombu's in-memory transport): when that process dies (Ctrl-C, SIGKILL, a crash), they are
gone, and the experiment stays `running` with nobody to finish it. To tell such an orphan
from an experiment that another live process is driving, each embedded process keeps one
small JSON file under FEDLENS_DATA_DIR/embedded-processes/: its host, its pid, its start
time (a recycled pid belongs to a process started later) and the experiments whose tasks
it sent. A file whose process is gone is stale and removed by whoever reads it.

No database row: the registry must not need the very ledger whose experiments it
describes to be writable, and a file per process cannot be left half-updated by a crash
of another process.
"""

import fcntl
import json
import logging
import os
import socket
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil
from django.conf import settings

logger = logging.getLogger(__name__)

FOLDER_NAME = "embedded-processes"
# psutil's create_time is read from /proc with a resolution of a clock tick.
START_TIME_TOLERANCE_SECONDS = 1.0


@dataclass(frozen=True)
class EmbeddedProcess:
    hostname: str
    pid: int
    started: float
    experiments: frozenset[int]

    def is_alive(self) -> bool:
        """A process of another host cannot be checked from here: it counts as alive, so
        that nothing it drives is taken from it."""
        if self.hostname != socket.gethostname():
            return True
        try:
            started = psutil.Process(self.pid).create_time()
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False
        return abs(started - self.started) < START_TIME_TOLERANCE_SECONDS

    def describe(self) -> str:
        return f"process {self.pid} on {self.hostname}"


def registry_folder() -> Path:
    return Path(settings.FEDLENS_DATA_DIR) / FOLDER_NAME


def _own_file() -> Path:
    return registry_folder() / f"{socket.gethostname()}-{os.getpid()}.json"


_held: set[int] = set()
_held_lock = threading.Lock()


def hold(experiment_id: int) -> None:
    """Record that this process drives `experiment_id` (its tasks are in this process)."""
    with _held_lock:
        if experiment_id in _held:
            return
        _held.add(experiment_id)
        entry = {
            "hostname": socket.gethostname(),
            "pid": os.getpid(),
            "started": psutil.Process().create_time(),
            "experiments": sorted(_held),
        }
        own = _own_file()
        own.parent.mkdir(parents=True, exist_ok=True)
        # Written whole and renamed: a reader never sees half a file.
        partial = own.with_suffix(".partial")
        partial.write_text(json.dumps(entry))
        partial.replace(own)


def release_all() -> None:
    """A clean exit: this process drives nothing any more."""
    with _held_lock:
        _held.clear()
        _own_file().unlink(missing_ok=True)


def _read(path: Path) -> EmbeddedProcess | None:
    try:
        entry = json.loads(path.read_text())
        return EmbeddedProcess(
            hostname=str(entry["hostname"]),
            pid=int(entry["pid"]),
            started=float(entry["started"]),
            experiments=frozenset(int(each) for each in entry["experiments"]),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None  # removed meanwhile, or not ours


def live_processes() -> list[EmbeddedProcess]:
    """The registered processes that are still alive; stale files are removed."""
    folder = registry_folder()
    if not folder.is_dir():
        return []
    alive = []
    for path in sorted(folder.glob("*.json")):
        process = _read(path)
        if process is None:
            continue
        if process.is_alive():
            alive.append(process)
        else:
            path.unlink(missing_ok=True)
    return alive


def holder_of(experiment_id: int) -> EmbeddedProcess | None:
    """The live embedded process that drives the experiment, if any."""
    return next((p for p in live_processes() if experiment_id in p.experiments), None)


def held_experiments() -> set[int]:
    """Every experiment that some live embedded process drives."""
    return {each for process in live_processes() for each in process.experiments}


@contextmanager
def exclusive() -> Iterator[None]:
    """Between processes: only one at a time looks for orphans and takes them over, so that
    two servers starting together do not both resume the same experiment."""
    folder = registry_folder()
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)
