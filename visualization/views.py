"""Dashboard pages. They render the frame; the live data comes over the WebSocket
(ws/experiments/<id>/) and the REST API, so a page and a script see the same thing."""

from django.conf import settings
from django.contrib import messages
from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Prefetch
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from training import audit, comparison, faults, metric_catalog, services, sweeps
from training.models import (
    AggregationWeighting,
    Checkpoint,
    Dataset,
    Experiment,
    ExperimentApproval,
    InvalidTransition,
    NoiseLocation,
    Optimizer,
    Round,
    RoundKind,
    RoundStatus,
    Site,
    SiteDataset,
)
from training.resume import resume_refusal
from visualization import worker_status

SPARKLINE_WIDTH, SPARKLINE_HEIGHT = 120, 28
# The experiment form's single-valued inputs (sites is a list); names as in the REST API.
FORM_FIELDS = ("name", "description", "dataset", "network", "strategy", "partition",
               "num_rounds", "clients_per_round", "client_fraction", "min_clients",
               "aggregation_weighting", "local_epochs", "batch_size", "learning_rate",
               "optimizer", "seed", "round_timeout_seconds", "dp_clip", "dp_noise", "dp_delta",
               "dp_at", "local_dp_noise", "local_dp_clip")  # fmt: skip
# Settings whose empty input means "none" (null), not "the default".
NULLABLE_FIELDS = ("client_fraction", "dp_clip", "local_dp_noise", "local_dp_clip")
# The form's strategy parameter inputs are named "strategy_params.<parameter>".
PARAMETER_PREFIX = "strategy_params."


def primary_score(metrics: dict, task: str) -> float | None:
    """The task's primary metric (accuracy, Dice) of a round or checkpoint: held-out, else
    the clients' mean."""
    source = metrics.get("global") or metrics.get("clients") or {}
    value = source.get(metric_catalog.primary_metric(task))
    return float(value) if isinstance(value, int | float) else None


def sparkline_points(values: list[float]) -> str:
    """SVG polyline points for scores in [0, 1] (accuracy, Dice), drawn left to right."""
    if len(values) < 2:
        return ""
    step = SPARKLINE_WIDTH / (len(values) - 1)
    return " ".join(
        f"{index * step:.1f},{(1 - value) * SPARKLINE_HEIGHT:.1f}"
        for index, value in enumerate(values)
    )


@login_required
def home(request):
    closed_rounds = Round.objects.filter(status=RoundStatus.CLOSED, kind=RoundKind.TRAIN).only(
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
        task = experiment.task
        scores = [
            value
            for value in (primary_score(r.metrics, task) for r in experiment.closed_rounds)
            if value is not None
        ]
        best_checkpoint = experiment.best_checkpoints[0] if experiment.best_checkpoints else None
        rows.append(
            {
                "experiment": experiment,
                "progress": round(100 * len(experiment.closed_rounds) / experiment.num_rounds),
                "best_score": primary_score(best_checkpoint.metrics, task)
                if best_checkpoint
                else None,
                "score_label": metric_catalog.get_metric(metric_catalog.primary_metric(task)).label,
                "sparkline": sparkline_points(scores),
            }
        )
    return render(
        request,
        "visualization/home.html",
        {"rows": rows, "sparkline_size": (SPARKLINE_WIDTH, SPARKLINE_HEIGHT)},
    )


def form_choices(user, clone_of: Experiment | None = None) -> dict:
    # The engine's catalogues load PyTorch: imported by the pages that show them.
    from training.fl.networks import available_networks, network_task
    from training.fl.strategies import available_strategies, describe_strategies

    datasets = Dataset.objects.visible_to(user)
    if clone_of is not None:  # a clone may keep its source's dataset (see clone_experiment)
        datasets = datasets | Dataset.objects.filter(pk=clone_of.dataset_id)
    datasets = list(datasets.order_by("name"))
    for dataset in datasets:  # the form's script switches to it when the task changes
        dataset.suggested_network = suggested_network(dataset)
    return {
        "datasets": datasets,
        "sites": Site.objects.filter(is_active=True).order_by("name"),
        "networks": [{"name": name, "task": network_task(name)} for name in available_networks()],
        "strategies": available_strategies(),
        "strategy_descriptions": describe_strategies(),
        "optimizers": Optimizer.choices,
        "weightings": AggregationWeighting.choices,
        "noise_locations": NoiseLocation.choices,
    }


def suggested_network(dataset: Dataset) -> str:
    from training.fl.networks import suggested_network as suggested

    return suggested(dataset.task, len(dataset.image_shape or []) or 2)


def first_form_values(user) -> dict:
    """What a new form shows, so that submitting it as it is works: the user's most recent
    dataset, a network for its task, FedAvg, every site that can train on it chosen, all of
    them in each round, and a minimum of clients that those sites can meet."""
    datasets = Dataset.objects.visible_to(user)
    dataset = (
        datasets.filter(owner=user).order_by("-created_at", "-pk").first()
        or datasets.order_by("-created_at", "-pk").first()
    )
    sites = Site.objects.filter(is_active=True).order_by("name")
    if dataset is not None and dataset.is_federated:
        sites = sites.filter(declared_datasets__dataset=dataset)
    slugs = list(sites.values_list("slug", flat=True))
    return {
        "dataset": dataset.pk if dataset is not None else None,
        "network": suggested_network(dataset) if dataset is not None else "cnn-small",
        "strategy": "fedavg",
        "sites": slugs,
        "clients_per_round": max(len(slugs), 1),
        "min_clients": 1,
    }


def strategy_params_from_form(post, strategy: str) -> dict:
    """The chosen strategy's parameter inputs as numbers (as typed when not a number, so
    that the validation names it); an empty input takes the parameter's default."""
    from training.fl.strategies import describe_strategies

    types = {
        parameter["name"]: parameter["type"]
        for description in describe_strategies()
        if description["name"] == strategy
        for parameter in description["parameters"]
    }
    params = {}
    for key, text in post.items():
        name = key.removeprefix(PARAMETER_PREFIX)
        if not key.startswith(PARAMETER_PREFIX) or name not in types or text.strip() == "":
            continue
        try:
            params[name] = int(text) if types[name] == "int" else float(text)
        except ValueError:
            params[name] = text
    return params


def settings_from_form(post) -> dict:
    """The experiment settings of a submitted form, as the REST API takes them."""
    values = {key: post.get(key, "") for key in FORM_FIELDS}
    settings = {
        key: (None if value == "" else value)
        for key, value in values.items()
        if value != "" or key in NULLABLE_FIELDS
    }
    settings["sites"] = post.getlist("sites")
    settings["strategy_params"] = strategy_params_from_form(post, values["strategy"])
    return settings


def clone_source(user, experiment_id: str | None) -> Experiment | None:
    if not experiment_id or not str(experiment_id).isdigit():
        return None
    return Experiment.objects.visible_to(user).filter(pk=int(experiment_id)).first()


@login_required
@require_http_methods(["GET", "POST"])
def new_experiment(request):
    """Create (and optionally start) an experiment, validated exactly as the REST API does.
    ?clone=<id> fills the form with that experiment's settings ("run again with changes")."""
    if not request.user.has_perm("fedlens.create_experiment"):
        raise PermissionDenied("Your role may not create experiments: ask an admin for the "
                               "researcher role.")  # fmt: skip
    source = clone_source(request.user, request.POST.get("cloned_from") or request.GET.get("clone"))
    values, errors = {}, {}
    if request.method == "POST":
        settings = settings_from_form(request.POST)
        values = {**settings, "cloned_from": source.pk if source else ""}
        try:
            if source is not None:
                experiment = sweeps.clone_experiment(source, request.user, settings)
            else:
                experiment = sweeps.validated(request.user, settings).save(owner=request.user)
        except sweeps.SettingsError as refused:
            errors = {
                field: sweeps.describe_error(problem) for field, problem in refused.errors.items()
            }
        else:
            if request.POST.get("start"):
                try:
                    services.start_experiment(experiment.pk)
                except InvalidTransition as exc:
                    messages.error(request, str(exc))
                else:
                    audit.record(experiment, "start", actor=request.user)
            return redirect("experiment-page", experiment_id=experiment.pk)
    elif source is not None:
        values = {**sweeps.clone_settings(source, {}), "cloned_from": source.pk}
    else:
        values = first_form_values(request.user)
    return render(
        request,
        "visualization/new_experiment.html",
        {
            "values": form_values(values),
            "strategy_params": values.get("strategy_params") or {},
            "errors": errors,
            "clone_of": source,
            **form_choices(request.user, source),
        },
    )


def form_values(values: dict) -> dict:
    """Settings as the form's inputs show them: text, empty for none."""
    shown = {key: "" if value is None else str(value) for key, value in values.items()}
    shown["sites"] = values.get("sites") or []
    return shown


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
    # Resume shows where it applies: an embedded experiment whose process died (in
    # distributed mode the watchdog sends lost work again by itself).
    may_resume = (
        settings.FEDLENS_EMBEDDED
        and request.user.has_perm("fedlens.start_experiment", experiment)
        and resume_refusal(experiment) is None
    )
    catalogue = metric_catalog.catalogue_json(experiment.task)
    scalar = [catalogue["metrics"][name] for name in catalogue["scalar"]]
    return render(
        request,
        "visualization/experiment.html",
        {
            "experiment": experiment,
            "may_change": may_change,
            "may_resume": may_resume,
            "no_worker": worker_status.no_worker_reason(experiment),
            "metric_catalog": catalogue,
            "primary_label": catalogue["metrics"][catalogue["primary"]]["label"],
            "table_metrics": scalar,
            "cross_site_metrics": scalar,
            # Rendered with the page, then kept up to date by the live stream.
            "client_failures": faults.client_failures(experiment),
            "lost_sites_warning": faults.lost_sites_warning(experiment),
        },
    )


@login_required
def compare(request):
    """Curves of several experiments overlaid; ?experiment=<id> once per experiment."""
    visible = Experiment.objects.visible_to(request.user).select_related("dataset")
    chosen_ids = [int(value) for value in request.GET.getlist("experiment") if value.isdigit()]
    chosen = list(visible.filter(pk__in=chosen_ids).order_by("pk"))
    summary = comparison.experiments_comparison(chosen) if chosen else None
    rows = [
        {
            "experiment": group["experiments"][0],
            "final": [comparison.format_statistic(group["final"][m]) for m in summary["metrics"]],
            "rounds_to_target": comparison.format_rounds_to_target(group["rounds_to_target"]),
        }
        for group in (summary["groups"] if summary else [])
    ]
    return render(
        request,
        "visualization/compare.html",
        {
            "chosen": chosen,
            "candidates": visible.order_by("-created_at")[:100],
            "summary": summary,
            "rows": rows,
            # The curves drawn: each compared metric's definition, from the catalogue.
            "curve_metrics": [
                metric_catalog.get_metric(name).as_json()
                for name in (summary["metrics"] if summary else [])
                if name in metric_catalog.METRICS
            ],
        },
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
