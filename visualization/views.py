"""Dashboard pages. They render the frame; the live data comes over the WebSocket
(ws/experiments/<id>/) and the REST API, so a page and a script see the same thing."""

from types import SimpleNamespace

from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.db.models import Prefetch
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from training import services
from training.api.serializers import ExperimentSerializer
from training.fl.networks import available_networks
from training.fl.strategies import available_strategies
from training.models import (
    Checkpoint,
    Dataset,
    Experiment,
    ExperimentApproval,
    InvalidTransition,
    Optimizer,
    Round,
    RoundStatus,
    Site,
    SiteDataset,
)

SPARKLINE_WIDTH, SPARKLINE_HEIGHT = 120, 28
# The experiment form's single-valued inputs (sites is a list); names as in the REST API.
FORM_FIELDS = ("name", "description", "dataset", "network", "strategy", "partition",
               "num_rounds", "clients_per_round", "min_clients", "local_epochs", "batch_size",
               "learning_rate", "optimizer", "seed", "round_timeout_seconds")  # fmt: skip


def accuracy_of(metrics: dict) -> float | None:
    source = metrics.get("global") or metrics.get("clients") or {}
    value = source.get("accuracy")
    return float(value) if isinstance(value, int | float) else None


def sparkline_points(values: list[float]) -> str:
    """SVG polyline points for accuracies in [0, 1], drawn left to right."""
    if len(values) < 2:
        return ""
    step = SPARKLINE_WIDTH / (len(values) - 1)
    return " ".join(
        f"{index * step:.1f},{(1 - value) * SPARKLINE_HEIGHT:.1f}"
        for index, value in enumerate(values)
    )


@login_required
def home(request):
    closed_rounds = Round.objects.filter(status=RoundStatus.CLOSED).only(
        "experiment_id", "number", "metrics"
    )
    best = Checkpoint.objects.filter(is_best=True).only("experiment_id", "metrics")
    experiments = (
        Experiment.objects.visible_to(request.user)
        .select_related("dataset", "owner")
        .prefetch_related(
            Prefetch("rounds", queryset=closed_rounds, to_attr="closed_rounds"),
            Prefetch("checkpoints", queryset=best, to_attr="best_checkpoints"),
        )
        .order_by("-created_at")[:100]
    )
    rows = []
    for experiment in experiments:
        accuracies = [
            value
            for value in (accuracy_of(r.metrics) for r in experiment.closed_rounds)
            if value is not None
        ]
        best_checkpoint = experiment.best_checkpoints[0] if experiment.best_checkpoints else None
        rows.append(
            {
                "experiment": experiment,
                "progress": round(100 * len(experiment.closed_rounds) / experiment.num_rounds),
                "best_accuracy": accuracy_of(best_checkpoint.metrics) if best_checkpoint else None,
                "sparkline": sparkline_points(accuracies),
            }
        )
    return render(
        request,
        "visualization/home.html",
        {"rows": rows, "sparkline_size": (SPARKLINE_WIDTH, SPARKLINE_HEIGHT)},
    )


def form_choices(user) -> dict:
    return {
        "datasets": Dataset.objects.visible_to(user).order_by("name"),
        "sites": Site.objects.filter(is_active=True).order_by("name"),
        "networks": available_networks(),
        "strategies": available_strategies(),
        "optimizers": Optimizer.choices,
    }


@login_required
@require_http_methods(["GET", "POST"])
def new_experiment(request):
    """Create (and optionally start) an experiment, validated exactly as the REST API does."""
    values, errors = {}, {}
    if request.method == "POST":
        values = {key: request.POST.get(key, "") for key in FORM_FIELDS}
        values["sites"] = request.POST.getlist("sites")
        serializer = ExperimentSerializer(
            data={key: value for key, value in values.items() if value not in ("", None)},
            context={"request": SimpleNamespace(user=request.user)},
        )
        if serializer.is_valid():
            experiment = serializer.save(owner=request.user)
            if request.POST.get("start"):
                try:
                    services.start_experiment(experiment.pk)
                except InvalidTransition as exc:
                    messages.error(request, str(exc))
            return redirect("experiment-page", experiment_id=experiment.pk)
        errors = {
            field: " ".join(map(str, problems)) for field, problems in serializer.errors.items()
        }
    return render(
        request,
        "visualization/new_experiment.html",
        {"values": values, "errors": errors, **form_choices(request.user)},
    )


@login_required
def experiment_detail(request, experiment_id: int):
    experiment = (
        Experiment.objects.visible_to(request.user)
        .select_related("dataset", "owner")
        .filter(pk=experiment_id)
        .first()
    )
    if experiment is None:
        raise Http404("No such experiment, or it is not shared with you.")
    may_change = request.user.is_staff or experiment.owner_id == request.user.pk
    return render(
        request,
        "visualization/experiment.html",
        {"experiment": experiment, "may_change": may_change},
    )


@login_required
def compare(request):
    """Curves of several experiments overlaid; ?experiment=<id> once per experiment."""
    visible = Experiment.objects.visible_to(request.user).select_related("dataset")
    chosen_ids = [int(value) for value in request.GET.getlist("experiment") if value.isdigit()]
    chosen = list(visible.filter(pk__in=chosen_ids).order_by("pk"))
    return render(
        request,
        "visualization/compare.html",
        {"chosen": chosen, "candidates": visible.order_by("-created_at")[:100]},
    )


@login_required
def site_list(request):
    """The consortium's sites: which are connected, what they run on, what data they
    declared, and their operators' decisions on the experiments this user can see."""
    sites = Site.objects.prefetch_related(
        Prefetch(
            "declared_datasets",
            queryset=SiteDataset.objects.select_related("dataset").order_by("dataset__name"),
        )
    ).order_by("name")
    approvals = (
        ExperimentApproval.objects.filter(
            experiment__in=Experiment.objects.visible_to(request.user)
        )
        .select_related("experiment", "site")
        .order_by("-requested_at")[:200]
    )
    return render(
        request,
        "visualization/sites.html",
        {"sites": sites, "approvals": approvals},
    )
