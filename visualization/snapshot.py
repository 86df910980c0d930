"""What a browser receives first: the experiment and everything recorded for it so far."""

from training import metric_catalog
from training.api.serializers import (
    CheckpointSummarySerializer,
    ClientUpdateSerializer,
    ExperimentSerializer,
    RoundSerializer,
)
from training.differential_privacy import uses_client_level_dp
from training.models import Checkpoint, ClientUpdate, Experiment, Round


def visible_experiment(user, experiment_id: int) -> Experiment | None:
    return (
        Experiment.objects.visible_to(user)
        .select_related("owner", "dataset")
        .prefetch_related("members", "sites")
        .filter(pk=experiment_id)
        .first()
    )


def privacy_summary(experiment: Experiment, rounds) -> dict | None:
    """The experiment's client-level DP settings and the ε spent after each closed round
    (for the page's ε curve); None when its rounds add no noise."""
    if not uses_client_level_dp(experiment):
        return None
    return {
        "clip": experiment.dp_clip,
        "noise_multiplier": experiment.dp_noise,
        "delta": experiment.dp_delta,
        "noise_at": experiment.dp_at,
        "epsilon": [
            {"round": fl_round.number, "epsilon": fl_round.epsilon}
            for fl_round in rounds
            if fl_round.epsilon is not None
        ],
    }


def experiment_snapshot(experiment: Experiment) -> dict:
    rounds = Round.objects.filter(experiment=experiment).select_related("checkpoint")
    updates = ClientUpdate.objects.filter(round__experiment=experiment).select_related(
        "round", "site"
    )
    checkpoints = Checkpoint.objects.filter(experiment=experiment).select_related("round")
    return {
        "type": "snapshot",
        "experiment": ExperimentSerializer(experiment).data,
        "class_names": experiment.dataset.class_names,
        # What to draw and how: the task's metrics from the catalogue (names, labels, ...).
        "metric_catalog": metric_catalog.catalogue_json(experiment.task),
        "rounds": RoundSerializer(rounds, many=True).data,
        "client_updates": ClientUpdateSerializer(updates, many=True).data,
        "checkpoints": CheckpointSummarySerializer(checkpoints, many=True).data,
        "privacy": privacy_summary(experiment, rounds),
    }
