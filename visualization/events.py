"""Federated events for the browser, sent to the experiment's channel-layer group.

Workers and requests publish after their transaction commits, so a browser never hears of
a change that was rolled back; a browser that missed events rebuilds from the snapshot.
"""

import logging

from asgiref.sync import async_to_sync
from channels.layers import get_channel_layer
from django.db import transaction

from training.api.serializers import (
    CheckpointSummarySerializer,
    ClientUpdateSerializer,
    ExperimentSummarySerializer,
    RoundSerializer,
)
from training.models import ClientUpdate, ClientUpdateStatus, Experiment, Round

logger = logging.getLogger(__name__)

# The consumer's handler for these messages is ExperimentConsumer.experiment_event.
MESSAGE_TYPE = "experiment.event"


def experiment_group(experiment_id: int) -> str:
    return f"experiment.{experiment_id}"


def publish(experiment_id: int, event: dict) -> None:
    """Send `event` to every browser watching the experiment; never fails the caller."""
    try:
        async_to_sync(get_channel_layer().group_send)(
            experiment_group(experiment_id), {"type": MESSAGE_TYPE, "event": event}
        )
    except Exception:  # the ledger is the truth; a lost event is repaired by the snapshot
        logger.exception("could not publish %s for experiment %s", event["type"], experiment_id)


def publish_after_commit(experiment_id: int, event_type: str, **payload) -> None:
    event = {"type": event_type, "experiment": experiment_id, **payload}
    transaction.on_commit(lambda: publish(experiment_id, event))


def round_opened(fl_round: Round, updates: list[ClientUpdate]) -> None:
    publish_after_commit(
        fl_round.experiment_id,
        "round.opened",
        round=RoundSerializer(fl_round).data,
        client_updates=ClientUpdateSerializer(updates, many=True).data,
    )


def round_closed(fl_round: Round) -> None:
    publish_after_commit(
        fl_round.experiment_id,
        "round.closed",
        round=RoundSerializer(fl_round).data,
        checkpoint=CheckpointSummarySerializer(fl_round.checkpoint).data,
    )


def client_changed(update: ClientUpdate) -> None:
    """client.started, client.finished or client.failed (failed and late clients)."""
    event_type = {
        ClientUpdateStatus.RUNNING: "client.started",
        ClientUpdateStatus.SUCCEEDED: "client.finished",
    }.get(update.status, "client.failed")
    publish_after_commit(
        update.round.experiment_id, event_type, client_update=ClientUpdateSerializer(update).data
    )


def experiment_ended(experiment: Experiment) -> None:
    """experiment.finished, experiment.failed or experiment.stopped."""
    event_type = {"completed": "experiment.finished"}.get(
        experiment.status, f"experiment.{experiment.status}"
    )
    publish_after_commit(
        experiment.pk, event_type, experiment=ExperimentSummarySerializer(experiment).data
    )
