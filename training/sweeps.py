"""Comparisons as a workflow: run an experiment again with changes, and sweeps.

A clone copies an experiment's settings, applies the changes asked for and stores a new
draft that remembers where it came from. A sweep turns base settings and a grid of values
into one experiment per combination, every one validated before any is stored, queued,
and started a few at a time: up to the sweep's max_running at once, the next queued one
whenever one of them ends.

Who starts the next one is the transaction that ends an experiment (the receiver of
``experiment_ended`` below, inside it). It holds that experiment's lock and takes the
queued one's with SKIP LOCKED, so it never waits on a lock another transaction holds:
two experiments ending at once start two different successors, and a queued experiment a
user is stopping at that moment is passed over rather than waited for.
"""

import itertools
import json
import logging
from types import SimpleNamespace
from typing import Any

from django.db import transaction
from django.db.models import Exists, OuterRef, Q

from training import metric_catalog, services
from training.log_events import log_event
from training.models import (
    Experiment,
    ExperimentApproval,
    ExperimentStatus,
    Sweep,
)

logger = logging.getLogger(__name__)

# One request makes at most this many experiments: a grid is a product and grows fast.
MAX_SWEEP_EXPERIMENTS = 200
# As Sweep.max_running's validators, for callers that do not go through the API.
MAX_RUNNING_LIMIT = 100


class SettingsError(ValueError):
    """Experiment settings were refused; `errors` maps each field to what is wrong."""

    def __init__(self, errors: dict[str, Any]) -> None:
        self.errors = errors
        super().__init__(
            "; ".join(f"{field}: {describe_error(problem)}" for field, problem in errors.items())
        )

    def as_api_errors(self) -> dict[str, Any]:
        """The errors as DRF shows a field's: a list of messages (or nested errors)."""
        return {
            field: problem if isinstance(problem, list | dict) else [str(problem)]
            for field, problem in self.errors.items()
        }


def describe_error(problem: Any) -> str:
    if isinstance(problem, list | tuple):
        return " ".join(describe_error(each) for each in problem)
    if isinstance(problem, dict):
        return "; ".join(f"{key}: {describe_error(value)}" for key, value in problem.items())
    return str(problem)


def setting_names() -> tuple[str, ...]:
    from training.api.serializers import EXPERIMENT_SETTINGS

    return EXPERIMENT_SETTINGS


def experiment_settings(experiment: Experiment) -> dict[str, Any]:
    """An experiment's settings as the REST API takes them (dataset by id, sites by slug)."""
    values = {name: getattr(experiment, name) for name in setting_names()}
    values["dataset"] = experiment.dataset_id
    values["sites"] = sorted(site.slug for site in experiment.sites.all())
    return values


def validated(owner, settings: dict[str, Any], *, clone_of: Experiment | None = None):
    """The API's serializer for `settings`, validated for `owner`; SettingsError if refused."""
    from training.api.serializers import ExperimentSerializer

    context = {"request": SimpleNamespace(user=owner), "clone_of": clone_of}
    serializer = ExperimentSerializer(data=settings, context=context)
    if not serializer.is_valid():
        raise SettingsError(dict(serializer.errors))
    return serializer


def clone_settings(source: Experiment, changes: dict[str, Any]) -> dict[str, Any]:
    """The source's settings with `changes` applied. A change of strategy without
    parameters starts from the new strategy's defaults (the old ones belong to another
    algorithm); a count of clients per round without a fraction replaces the fraction."""
    settings = {**experiment_settings(source), "name": f"{source.name} (again)"}
    if "strategy" in changes and "strategy_params" not in changes:
        settings["strategy_params"] = {}
    if "clients_per_round" in changes and "client_fraction" not in changes:
        settings["client_fraction"] = None
    settings.update(changes)
    return settings


def clone_experiment(source: Experiment, owner, changes: dict[str, Any]) -> Experiment:
    """A new draft of `owner` with the source's settings and `changes`; cloned_from is set."""
    unknown = sorted(set(changes) - set(setting_names()))
    if unknown:
        raise SettingsError(
            {name: "Not an experiment setting that a clone can change." for name in unknown}
        )
    serializer = validated(owner, clone_settings(source, changes), clone_of=source)
    experiment = serializer.save(owner=owner, cloned_from=source)
    log_event(logger, "experiment.cloned", experiment=experiment.pk, source=source.pk)
    return experiment


# --- Sweeps --------------------------------------------------------------------------------


def grid_combinations(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """Every combination of the grid's values, the first field varying slowest."""
    fields = list(grid)
    return [dict(zip(fields, values, strict=True)) for values in itertools.product(*grid.values())]


def describe_combination(combination: dict[str, Any]) -> str:
    return ", ".join(
        f"{field}={json.dumps(value) if isinstance(value, dict | list) else value}"
        for field, value in combination.items()
    )


def check_grid(grid: Any, base_settings: Any) -> None:
    """The grid's shape: experiment settings, each with a non-empty list of values."""
    if not isinstance(base_settings, dict):
        raise SettingsError({"base_settings": "Give an object of experiment settings."})
    if not isinstance(grid, dict) or not grid:
        raise SettingsError(
            {
                "grid": 'Give an object of settings to vary, e.g. {"strategy": ["fedavg", '
                '"fedprox"], "seed": [0, 1, 2]}.'
            }
        )
    variable = set(setting_names()) - {"name", "description"}
    errors = {}
    for field, values in grid.items():
        if field not in variable:
            errors[field] = (
                f"Not an experiment setting a sweep can vary; choose among {sorted(variable)}."
            )
        elif not isinstance(values, list) or not values:
            errors[field] = "Give a non-empty list of values."
    if errors:
        raise SettingsError({"grid": errors})
    count = 1
    for values in grid.values():
        count *= len(values)
    if count > MAX_SWEEP_EXPERIMENTS:
        raise SettingsError(
            {
                "grid": f"The grid makes {count} experiments; at most {MAX_SWEEP_EXPERIMENTS} "
                "per sweep. Vary fewer settings or fewer values."
            }
        )


def create_sweep(
    owner,
    *,
    name: str,
    base_settings: dict[str, Any],
    grid: dict[str, list[Any]],
    max_running: int = 2,
    target_metric: str | None = None,
    target_value: float = 0.8,
    description: str = "",
) -> Sweep:
    """Validate every combination, store them all as queued experiments of a new sweep and
    start the first max_running of them; nothing is stored if any combination is refused.
    Without a target metric, the sweep targets its dataset's task's primary metric."""
    check_grid(grid, base_settings)
    if not 1 <= max_running <= MAX_RUNNING_LIMIT:
        raise SettingsError(
            {"max_running": f"Give how many run at once, from 1 to {MAX_RUNNING_LIMIT}."}
        )
    serializers = []
    for combination in grid_combinations(grid):
        settings = {
            **base_settings,
            **combination,
            "name": f"{name} · {describe_combination(combination)}"[:200],
        }
        try:
            serializers.append((combination, validated(owner, settings)))
        except SettingsError as refused:
            raise SettingsError(
                {
                    "grid": f"The combination {describe_combination(combination)} is refused: "
                    f"{refused}"
                }
            ) from refused
    if not target_metric:
        task = serializers[0][1].validated_data["dataset"].task
        target_metric = metric_catalog.primary_metric(task)
    with transaction.atomic():
        sweep = Sweep.objects.create(
            owner=owner,
            name=name,
            description=description,
            base_settings=base_settings,
            grid=grid,
            max_running=max_running,
            target_metric=target_metric,
            target_value=target_value,
        )
        for _, serializer in serializers:
            experiment = serializer.save(owner=owner, sweep=sweep)
            experiment.transition_to(ExperimentStatus.QUEUED)
        log_event(logger, "sweep.created", sweep=sweep.pk, experiments=len(serializers))
        start_queued_experiments(sweep.pk)
    return sweep


def waiting_for_a_slot(sweep_id: int):
    """A sweep's queued experiments that were never started. A started one that waits for
    its sites' approvals is queued too, but holds a slot: it asked for approvals."""
    asked = ExperimentApproval.objects.filter(experiment=OuterRef("pk"))
    return Experiment.objects.filter(sweep_id=sweep_id, status=ExperimentStatus.QUEUED).exclude(
        Exists(asked)
    )


def holding_a_slot(sweep_id: int) -> int:
    asked = ExperimentApproval.objects.filter(experiment=OuterRef("pk"))
    return (
        Experiment.objects.filter(sweep_id=sweep_id)
        .annotate(asked=Exists(asked))
        .filter(Q(status=ExperimentStatus.RUNNING) | Q(asked=True, status=ExperimentStatus.QUEUED))
        .count()
    )


def start_queued_experiments(sweep_id: int) -> list[int]:
    """Start the sweep's queued experiments, oldest first, while fewer than its max_running
    hold a slot. Runs inside the caller's transaction; returns the ids it started."""
    max_running = Sweep.objects.values_list("max_running", flat=True).get(pk=sweep_id)
    started = []
    while holding_a_slot(sweep_id) < max_running:
        candidate = (
            waiting_for_a_slot(sweep_id).select_for_update(skip_locked=True).order_by("pk").first()
        )
        if candidate is None:
            break
        try:
            with transaction.atomic():
                start_queued(candidate)
        # Whatever keeps this one from starting must not undo the transaction that ended
        # another experiment: it fails alone, with the reason, and the next one is tried.
        except Exception as exc:
            candidate.refresh_from_db()
            services.fail_experiment(candidate, f"It could not start: {exc}")
        else:
            started.append(candidate.pk)
    return started


def start_queued(experiment: Experiment) -> None:
    """What services.start_experiment does for a draft, for a sweep's queued experiment
    (its row locked by the caller): round 1 opens, or it waits for its sites' approvals."""
    services.pick_clients(experiment, 1)
    if experiment.dataset.is_federated:
        services.check_sites_hold_dataset(experiment)
        waiting = services.request_approvals(experiment)
        if waiting:
            log_event(
                logger, "experiment.awaiting_approval", experiment=experiment.pk, sites=waiting
            )
            return
    services.begin_running(experiment)


def start_next_in_sweep(sender, experiment: Experiment, **kwargs) -> None:
    """Receiver of experiment_ended: a slot of its sweep is free."""
    if experiment.sweep_id is not None:
        start_queued_experiments(experiment.sweep_id)
