"""What a browser receives first: the experiment and everything recorded for it so far."""

from collections import defaultdict

from django.db.models import Count

from training import faults, metric_catalog
from training.api.serializers import (
    CHECKPOINT_SUMMARY_COLUMNS,
    CLIENT_UPDATE_COLUMNS,
    CheckpointSummarySerializer,
    ClientUpdateSerializer,
    ExperimentSerializer,
    RoundSerializer,
)
from training.differential_privacy import uses_client_level_dp
from training.models import Checkpoint, ClientUpdate, Experiment, Round

# The most client update rows a snapshot carries (see client_update_rows).
SNAPSHOT_CLIENT_UPDATES = 500


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


def client_update_rows(experiment: Experiment) -> tuple[list[dict], dict]:
    """The client updates a snapshot carries, and each round's clients counted by status.

    An experiment of many clients would otherwise send every row it ever recorded (200
    clients x 20 rounds: 4000 rows, megabytes): past SNAPSHOT_CLIENT_UPDATES rows, only the
    newest rounds' rows go (whole rounds, newest first, as many as fit; of a round too large
    for that, its first rows) with the failures of earlier rounds, and the counts speak for
    the rounds before them.
    """
    counted = (
        ClientUpdate.objects.filter(round__experiment=experiment)
        .values_list("round__number", "status")
        .annotate(count=Count("pk"))
    )
    clients: dict[int, dict[str, int]] = defaultdict(dict)
    for number, status, count in counted:
        clients[number][status] = count
    updates = (
        ClientUpdate.objects.filter(round__experiment=experiment)
        .select_related("round", "site")
        .only(*CLIENT_UPDATE_COLUMNS)
    )
    total, from_round = 0, None
    for number in sorted(clients, reverse=True):
        total += sum(clients[number].values())
        if total > SNAPSHOT_CLIENT_UPDATES:
            break
        from_round = number
    else:  # every row fits
        return ClientUpdateSerializer(updates, many=True).data, {
            "clients_per_round": summary_rows(clients),
            "client_updates_from_round": None,
        }
    if from_round is None:  # the newest round alone has too many: its first rows
        from_round = max(clients)
    newest = updates.filter(round__number__gte=from_round).order_by("round__number", "pk")
    # The failures of earlier rounds too, for the page's failures table (as many again).
    failed = updates.filter(round__number__lt=from_round, status__in=faults.UNSUCCESSFUL)
    rows = [
        *newest[:SNAPSHOT_CLIENT_UPDATES],
        *failed.order_by("-round__number", "pk")[:SNAPSHOT_CLIENT_UPDATES],
    ]
    return ClientUpdateSerializer(rows, many=True).data, {
        "clients_per_round": summary_rows(clients),
        "client_updates_from_round": from_round,
        # What the rows sent cannot tell: the sites that never contributed, from all rows.
        "lost_sites_warning": faults.lost_sites_warning(experiment),
    }


def summary_rows(clients: dict[int, dict[str, int]]) -> list[dict]:
    return [{"round": number, **clients[number]} for number in sorted(clients)]


def without_older_site_evaluations(rounds: list[dict], from_round: int | None) -> list[dict]:
    """Rounds before `from_round` keep their federated evaluation's weighted mean but not
    each site's entry, which, like the client rows, would grow with the sites."""
    if from_round is None:
        return rounds
    for fl_round in rounds:
        evaluation = fl_round.get("federated_evaluation") or {}
        if fl_round["number"] < from_round and "sites" in evaluation:
            fl_round["federated_evaluation"] = {"weighted": evaluation.get("weighted")}
    return rounds


def experiment_snapshot(experiment: Experiment) -> dict:
    rounds = Round.objects.filter(experiment=experiment).select_related("checkpoint")
    rows, summary = client_update_rows(experiment)
    checkpoints = (
        Checkpoint.objects.filter(experiment=experiment)
        .select_related("round")
        .only(*CHECKPOINT_SUMMARY_COLUMNS)
    )
    return {
        "type": "snapshot",
        "experiment": ExperimentSerializer(experiment).data,
        "class_names": experiment.dataset.class_names,
        # What to draw and how: the task's metrics from the catalogue (names, labels, ...).
        "metric_catalog": metric_catalog.catalogue_json(experiment.task),
        "rounds": without_older_site_evaluations(
            RoundSerializer(rounds, many=True).data, summary["client_updates_from_round"]
        ),
        "client_updates": rows,
        # Each round's clients by status; rows of the rounds before client_updates_from_round
        # (None: of every round) are not in client_updates.
        **summary,
        "checkpoints": CheckpointSummarySerializer(checkpoints, many=True).data,
        "privacy": privacy_summary(experiment, rounds),
    }
