"""Sweep pages: the list, the form that creates one, and its comparison (filled by the
browser from /api/sweeps/<id>/comparison/, so the page and the API show the same)."""

import json

from django.contrib.auth.decorators import login_required
from django.core.exceptions import PermissionDenied
from django.db.models import Count, Q
from django.http import Http404
from django.shortcuts import redirect, render
from django.views.decorators.http import require_http_methods

from training import metric_catalog, sweeps
from training.models import TERMINAL_EXPERIMENT_STATUSES, Sweep
from visualization.views import first_form_values, form_choices, form_values

# The sweep form's base settings (one value each); names as in the REST API.
BASE_FIELDS = ("dataset", "network", "num_rounds", "clients_per_round", "min_clients",
               "local_epochs", "batch_size", "learning_rate", "optimizer",
               "aggregation_weighting")  # fmt: skip


def visible_sweeps(user):
    return Sweep.objects.all() if user.is_staff else Sweep.objects.filter(owner=user)


@login_required
def sweep_list(request):
    rows = (
        visible_sweeps(request.user)
        .select_related("owner")
        .annotate(
            total=Count("experiments"),
            ended=Count(
                "experiments", filter=Q(experiments__status__in=TERMINAL_EXPERIMENT_STATUSES)
            ),
        )
        .order_by("-created_at")[:100]
    )
    return render(request, "visualization/sweeps.html", {"sweeps": rows})


def split_values(text: str) -> list:
    """ "0, 1, 2" -> [0, 1, 2]; "iid, dirichlet:0.1" -> ["iid", "dirichlet:0.1"]."""
    values = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        try:
            values.append(json.loads(item))
        except json.JSONDecodeError:
            values.append(item)
    return values


def sweep_from_form(post) -> tuple[dict, dict]:
    """(base settings, grid) of a submitted sweep form; ValueError names a bad input."""
    base = {key: post[key] for key in BASE_FIELDS if post.get(key, "") != ""}
    base["sites"] = post.getlist("sites")
    grid: dict[str, list] = {}
    if post.getlist("strategies"):
        grid["strategy"] = post.getlist("strategies")
    for field, key in (("partition", "partitions"), ("seed", "seeds")):
        values = split_values(post.get(key, ""))
        if values:
            grid[field] = values
    extra = post.get("extra_grid", "").strip()
    if extra:
        try:
            more = json.loads(extra)
        except json.JSONDecodeError as exc:
            raise ValueError(f"extra_grid: not JSON ({exc}).") from exc
        if not isinstance(more, dict):
            raise ValueError('extra_grid: give an object, e.g. {"learning_rate": [0.01, 0.05]}.')
        grid.update(more)
    return base, grid


@login_required
@require_http_methods(["GET", "POST"])
def new_sweep(request):
    """One request, a grid of experiments: strategies x partitions x seeds (x any setting)."""
    if not request.user.has_perm("fedlens.create_sweep"):
        raise PermissionDenied("Your role may not create sweeps: ask an admin for the "
                               "researcher role.")  # fmt: skip
    values, errors = {}, {}
    if request.method == "POST":
        values = {key: request.POST.get(key, "") for key in request.POST}
        values["sites"] = request.POST.getlist("sites")
        values["strategies"] = request.POST.getlist("strategies")
        try:
            base, grid = sweep_from_form(request.POST)
            sweep = sweeps.create_sweep(
                request.user,
                name=request.POST.get("name", "").strip() or "sweep",
                description=request.POST.get("description", ""),
                base_settings=base,
                grid=grid,
                max_running=int(request.POST.get("max_running") or 2),
                target_metric=request.POST.get("target_metric") or None,
                target_value=float(request.POST.get("target_value") or 0.8),
            )
        except sweeps.SettingsError as refused:
            errors = {
                field: sweeps.describe_error(problem) for field, problem in refused.errors.items()
            }
        except ValueError as exc:
            errors = {"form": str(exc)}
        else:
            return redirect("sweep-page", sweep_id=sweep.pk)
    else:
        values = form_values(first_form_values(request.user))
    return render(
        request,
        "visualization/new_sweep.html",
        {"values": values, "errors": errors, **form_choices(request.user)},
    )


@login_required
def sweep_detail(request, sweep_id: int):
    sweep = visible_sweeps(request.user).filter(pk=sweep_id).first()
    if sweep is None:
        raise Http404("No such sweep, or it is not yours.")
    return render(
        request,
        "visualization/sweep.html",
        {"sweep": sweep, "target_lower": metric_catalog.lower_is_better(sweep.target_metric)},
    )
