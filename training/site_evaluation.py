"""Evaluation where the data is, as the ledger records it.

Each site evaluates the round's starting global model on its own validation split before
it trains (ClientUpdate.evaluation). When round r closes, those evaluations of round
r-1's global model become round r-1's federated evaluation (round 1's are of the initial
model, kept on the initial checkpoint). After the last training round, a cross-site round
(Round.kind "evaluate") asks every site to evaluate the final global model and each
site's last local model; its "global" entries are the last training round's federated
evaluation, and the whole is the cross-site matrix.

The functions that write run in training/services.py's transactions, under the
experiment's lock.
"""

from typing import Any

from training.fl.evaluation import cross_site_matrix, weighted_metrics
from training.models import (
    Checkpoint,
    ClientUpdate,
    ClientUpdateStatus,
    Experiment,
    Round,
    RoundKind,
)

# The label of the final global model among a cross-site round's models; the others are
# site slugs (that site's last local model).
GLOBAL_MODEL = "global"
# Strategies whose clients keep some layers at the site: their "global" model is
# evaluated at each site with that site's own layers (personalized).
PERSONALIZED_STRATEGIES = frozenset({"fedbn"})


def federated_evaluation(by_site: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """What Round.federated_evaluation holds: each site's metrics and their weighted mean."""
    return {"sites": by_site, "weighted": weighted_metrics(by_site)}


def file_starting_model_evaluations(fl_round: Round) -> Round | None:
    """File the evaluations of a closing training round's starting model where they belong:
    under the round before (returned, to announce), or on the initial checkpoint for round
    1 (None returned). Nothing is written when no client reported one."""
    reported = (
        ClientUpdate.objects.filter(round=fl_round)
        .exclude(evaluation={})
        .values_list("site__slug", "evaluation")
    )
    by_site = {slug: evaluation for slug, evaluation in reported if isinstance(evaluation, dict)}
    if not by_site:
        return None
    filed = federated_evaluation(dict(sorted(by_site.items())))
    if fl_round.number == 1:
        initial = Checkpoint.objects.get(experiment_id=fl_round.experiment_id, round__isnull=True)
        initial.metrics = {**initial.metrics, "federated_evaluation": filed}
        initial.save(update_fields=["metrics"])
        return None
    previous = Round.objects.select_related("checkpoint").get(
        experiment_id=fl_round.experiment_id, number=fl_round.number - 1
    )
    previous.federated_evaluation = filed
    previous.save(update_fields=["federated_evaluation"])
    return previous


def evaluation_models(experiment_id: int) -> list[str]:
    """The models of the cross-site round: the global one, then the last local model of
    each site that trained successfully, by slug."""
    slugs = (
        ClientUpdate.objects.filter(
            round__experiment_id=experiment_id,
            round__kind=RoundKind.TRAIN,
            status=ClientUpdateStatus.SUCCEEDED,
        )
        .exclude(update_file="")
        .order_by("site__slug")
        .values_list("site__slug", flat=True)
        .distinct()
    )
    return [GLOBAL_MODEL, *slugs]


def cross_site_round(experiment: Experiment) -> Round | None:
    return experiment.rounds.filter(kind=RoundKind.EVALUATE).first()


def reported_evaluations(fl_round: Round) -> dict[str, dict[str, Any] | None]:
    """Site slug to what it reported in a cross-site round (None unless it succeeded)."""
    updates = ClientUpdate.objects.filter(round=fl_round).values_list(
        "site__slug", "status", "evaluation"
    )
    return {
        slug: evaluation
        if status == ClientUpdateStatus.SUCCEEDED and isinstance(evaluation, dict)
        else None
        for slug, status, evaluation in updates
    }


def file_final_model_evaluations(fl_round: Round) -> Round | None:
    """File what the sites of a closing cross-site round reported of the final global
    model as the last training round's federated evaluation; that round is returned (to
    announce), or None when no site reported one."""
    by_site = {
        slug: reported[GLOBAL_MODEL]
        for slug, reported in sorted(reported_evaluations(fl_round).items())
        if reported is not None and isinstance(reported.get(GLOBAL_MODEL), dict)
    }
    if not by_site:
        return None
    last = Round.objects.select_related("checkpoint").get(
        experiment_id=fl_round.experiment_id, number=fl_round.number - 1
    )
    last.federated_evaluation = federated_evaluation(by_site)
    last.save(update_fields=["federated_evaluation"])
    return last


def cross_site_results(experiment: Experiment) -> dict[str, Any] | None:
    """The cross-site evaluation as recorded so far (None before its round opened):
    `models` (rows), `sites` (columns), `cells[model][site]` (that site's metrics of that
    model, None where it has none), `weighted` (per model, over the sites), the round's
    number and status, `personalized` (the global model was evaluated with each site's own
    local layers), and each site's task status and error."""
    fl_round = cross_site_round(experiment)
    if fl_round is None:
        return None
    models = fl_round.metrics.get("models") or [GLOBAL_MODEL]
    updates = list(
        ClientUpdate.objects.filter(round=fl_round).values_list("site__slug", "status", "error")
    )
    return {
        "round": fl_round.number,
        "status": fl_round.status,
        "personalized": experiment.strategy in PERSONALIZED_STRATEGIES,
        **cross_site_matrix(models, reported_evaluations(fl_round)),
        "clients": {slug: {"status": status, "error": error} for slug, status, error in updates},
    }
