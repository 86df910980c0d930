"""Whether anything is working on a running experiment, for the banner of its page.

Embedded mode: the experiment's tasks are in the process that sent them, which must be alive
(flproject/embedded_processes.py). Distributed mode: some live worker must consume the
queues its rounds use: asked with one remote-control broadcast (`inspect().active_queues()`,
answered by each worker's main process even while its pool trains), cached for a few
seconds so that page views do not broadcast each time. A real site's agent answers no
broadcast: its heartbeats say whether it is connected.
"""

import logging

from django.conf import settings
from django.core.cache import cache

from flproject import embedded_processes
from flproject.celery import app as celery_app
from training.models import Experiment, ExperimentStatus
from training.queues import AGGREGATION_QUEUE, TRAINING_QUEUE

logger = logging.getLogger(__name__)

CONSUMED_QUEUES_CACHE_KEY = "fedlens:consumed-queues"
CONSUMED_QUEUES_CACHE_SECONDS = 15
INSPECT_TIMEOUT_SECONDS = 1.0


def consumed_queues() -> set[str] | None:
    """The queues that some live worker consumes; None when the broker cannot be asked."""
    cached = cache.get(CONSUMED_QUEUES_CACHE_KEY)
    if cached is not None:
        return set(cached)
    try:
        replies = celery_app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS).active_queues()
    except Exception as exc:  # kombu raises its transport's own errors
        logger.warning("could not ask the workers which queues they consume: %s", exc)
        return None
    queues = {queue["name"] for held in (replies or {}).values() for queue in held}
    cache.set(CONSUMED_QUEUES_CACHE_KEY, sorted(queues), CONSUMED_QUEUES_CACHE_SECONDS)
    return queues


def no_worker_reason(experiment: Experiment) -> str | None:
    """Why nothing works on this running experiment, for people; None when something does
    (or when it is not running)."""
    if experiment.status != ExperimentStatus.RUNNING:
        return None
    if settings.FEDLENS_EMBEDDED:
        if embedded_processes.holder_of(experiment.pk) is None:
            return (
                "No process is running this experiment: the one that ran it stopped "
                "(closed, interrupted or killed). Resume continues it from its last closed "
                "round; `manage.py run_experiment --resume "
                f"{experiment.pk}` does so on the command line."
            )
        return None
    consumed = consumed_queues()
    if consumed is None:
        return "The broker does not answer: no worker can receive this experiment's tasks."
    needed = [AGGREGATION_QUEUE]
    if not experiment.dataset.is_federated:  # simulated sites train on the training queue
        needed.insert(0, TRAINING_QUEUE)
    missing = [queue for queue in needed if queue not in consumed]
    reasons = []
    if missing:
        reasons.append(
            f"No worker is alive on queue {', '.join(missing)}: start one with "
            f"`python -m workers.launch --queues {','.join(missing)}`."
        )
    if experiment.dataset.is_federated:
        offline = sorted(
            site.slug for site in experiment.sites.filter(is_active=True) if not site.is_connected
        )
        if offline:
            reasons.append(
                f"The agents of {', '.join(offline)} are not connected: their operators start "
                "`python -m workers.site run`."
            )
    return " ".join(reasons) or None
