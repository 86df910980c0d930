"""Work that the ledger's signals (training/signals.py) queue for the server's workers."""

from django.db import transaction

from training import services, signals, tracking
from training.models import Experiment
from training.queues import AGGREGATION_QUEUE, EXPORT_TO_TRACKING_TASK


def export_ended_experiment_to_tracking(sender, *, experiment: Experiment, **kwargs) -> None:
    """Close the MLflow run of an experiment that ended: stopped, failed, or completed (most
    complete when their cross-site round closes, after the last aggregation exported its
    round). A task, queued once the ledger's transaction commits, so that a slow or absent
    MLflow never holds a request or a lock."""
    if not tracking.tracking_uri():
        return
    experiment_id = experiment.pk
    transaction.on_commit(
        lambda: services.send_task(
            EXPORT_TO_TRACKING_TASK, args=[experiment_id], queue=AGGREGATION_QUEUE
        )
    )


def connect_to_the_ledger() -> None:
    """From WorkersConfig.ready(); dispatch_uid makes a second call change nothing."""
    signals.experiment_ended.connect(
        export_ended_experiment_to_tracking,
        dispatch_uid="workers.receivers.export_ended_experiment_to_tracking",
    )
