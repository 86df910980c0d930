"""Run a federated experiment on simulated sites to its end, with progress and a summary."""

import argparse
import json
import time
from pathlib import Path
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from flproject.celery import app as celery_app
from training import audit, faults, services, site_evaluation, sweeps
from training.models import (
    AggregationWeighting,
    Dataset,
    Experiment,
    ExperimentStatus,
    InvalidTransition,
    NoiseLocation,
    Optimizer,
    Task,
)
from training.queues import AGGREGATION_QUEUE, TRAINING_QUEUE
from training.resume import resume_experiment
from training.runner import (
    ExperimentInputError,
    create_experiment,
    default_owner,
    format_cross_site,
    format_table,
    quiet_task_logs,
    round_row,
    simulated_sites,
    summarize,
    watch_experiment,
)
from training.sampling import clients_in_round
from workers.embedded import EmbeddedWorker

WORKER_PING_SECONDS = 3

# Option (as argparse names it) -> experiment setting (as the REST API names it).
OPTION_SETTINGS = {
    "name": "name",
    "network": "network",
    "strategy": "strategy",
    "strategy_params": "strategy_params",
    "partition": "partition",
    "rounds": "num_rounds",
    "clients_per_round": "clients_per_round",
    "clients_fraction": "client_fraction",
    "min_clients": "min_clients",
    "weighting": "aggregation_weighting",
    "local_epochs": "local_epochs",
    "batch_size": "batch_size",
    "lr": "learning_rate",
    "optimizer": "optimizer",
    "seed": "seed",
    "round_timeout": "round_timeout_seconds",
    "dp_clip": "dp_clip",
    "dp_noise": "dp_noise",
    "dp_delta": "dp_delta",
    "dp_at": "dp_at",
    "local_dp_noise": "local_dp_noise",
    "local_dp_clip": "local_dp_clip",
    "patch_size": "patch_size",
}
# A new experiment's settings where no option is given (a clone keeps its source's).
DEFAULTS = {"clients": 4, "rounds": 5, "local_epochs": 1, "batch_size": 32, "lr": 0.05,
            "optimizer": Optimizer.SGD, "strategy": "fedavg", "strategy_params": {},
            "partition": "iid", "network": "cnn-small", "seed": 0,
            "round_timeout": 3600}  # fmt: skip


def json_object(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON ({exc}); e.g. '{{\"mu\": 0.01}}'") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("give a JSON object, e.g. '{\"mu\": 0.01}'")
    return value


def patch_size(text: str) -> list[int]:
    try:
        sizes = [int(size) for size in text.split(",")]
    except ValueError:
        sizes = []
    if not sizes or any(size < 1 for size in sizes):
        raise argparse.ArgumentTypeError(
            f"give positive sizes separated by commas, e.g. 32,64,64; got {text!r}"
        )
    return sizes


def add_experiment_arguments(parser) -> None:
    """The options that describe an experiment (run_experiment and the base of a sweep).
    They default to None: what was not given is filled from DEFAULTS, or from the source
    of a clone."""
    parser.add_argument("--dataset", help="a registered dataset's name")
    parser.add_argument("--clients", type=int, help="simulated sites (default 4)")
    sampling = parser.add_mutually_exclusive_group()
    sampling.add_argument("--clients-per-round", type=int, help="default: all clients")
    sampling.add_argument(
        "--clients-fraction", type=float, help="clients per round as a share in (0, 1]"
    )
    parser.add_argument("--min-clients", type=int, help="default: clients per round")
    parser.add_argument(
        "--weighting",
        choices=AggregationWeighting.values,
        help="average updates by their samples (default) or uniformly",
    )
    parser.add_argument("--rounds", type=int, help="default 5")
    parser.add_argument("--local-epochs", type=int, help="default 1")
    parser.add_argument("--batch-size", type=int, help="default 32")
    parser.add_argument("--lr", type=float, help="default 0.05")
    parser.add_argument("--optimizer", choices=Optimizer.values, help="default sgd")
    parser.add_argument("--strategy", help="default fedavg; GET /api/strategies/ lists them")
    parser.add_argument("--strategy-params", type=json_object, help="JSON object")
    parser.add_argument("--partition", help="default iid")
    parser.add_argument("--network", help="default cnn-small (unet for segmentation)")
    parser.add_argument(
        "--patch-size",
        type=patch_size,
        help="segmentation: train on random patches of D,H,W (or H,W), in the order of the "
        "dataset's image_shape, and evaluate by sliding window (default: whole images)",
    )
    parser.add_argument("--seed", type=int, help="default 0")
    parser.add_argument("--round-timeout", type=int, help="seconds (default 3600)")
    parser.add_argument("--dp-clip", type=float, help="client-level DP: clip updates to NORM")
    parser.add_argument(
        "--dp-noise", type=float, help="client-level DP: noise multiplier (std / clip)"
    )
    parser.add_argument("--dp-delta", type=float, help="delta of the (epsilon, delta) account")
    parser.add_argument("--dp-at", choices=NoiseLocation.values, help="where noise is added")
    parser.add_argument("--local-dp-noise", type=float, help="local DP-SGD noise multiplier")
    parser.add_argument("--local-dp-clip", type=float, help="local DP-SGD per-sample norm")
    parser.add_argument("--name", help="default: <dataset>-<strategy>-<time>")
    parser.add_argument("--owner", help="username (default: the first superuser)")


def given_settings(options: dict[str, Any]) -> dict[str, Any]:
    """The experiment settings of the options given on the command line."""
    return {
        setting: options[option]
        for option, setting in OPTION_SETTINGS.items()
        if options.get(option) is not None
    }


def default_network(dataset: Dataset) -> str:
    return "unet" if dataset.task == Task.SEGMENTATION else DEFAULTS["network"]


def new_experiment_settings(options: dict[str, Any]) -> dict[str, Any]:
    """A new experiment's settings from the options, DEFAULTS for the rest, on simulated
    sites: all of them per round and all needed to close a round unless said otherwise."""
    dataset = Dataset.objects.filter(name=options.get("dataset") or "").first()
    if dataset is None:
        if not options.get("dataset"):
            raise CommandError("Give --dataset NAME (or --clone ID).")
        raise CommandError(
            f"No dataset named {options['dataset']!r}; register it first with "
            "`manage.py register_dataset --name NAME --path PATH`."
        )
    defaults = {**DEFAULTS, "network": default_network(dataset)}
    filled = {**options, **{k: v for k, v in defaults.items() if options.get(k) is None}}
    sites = simulated_sites(filled["clients"])
    values = given_settings(filled)
    if filled.get("clients_fraction") is None:
        values.setdefault("clients_per_round", len(sites))
    per_round = clients_in_round(
        len(sites),
        clients_per_round=values.get("clients_per_round", len(sites)),
        client_fraction=filled.get("clients_fraction"),
        min_clients=1,
    )
    values.setdefault("min_clients", per_round)
    values.setdefault(
        "name", f"{dataset.name}-{filled['strategy']}-{time.strftime('%Y%m%d-%H%M%S')}"
    )
    return {**values, "dataset": dataset.pk, "sites": [site.slug for site in sites]}


def clone_changes(options: dict[str, Any]) -> dict[str, Any]:
    """What the options given beside --clone change of the source's settings."""
    changes = given_settings(options)
    if options.get("dataset"):
        dataset = Dataset.objects.filter(name=options["dataset"]).first()
        if dataset is None:
            raise CommandError(f"No dataset named {options['dataset']!r}.")
        changes["dataset"] = dataset.pk
    if options.get("clients") is not None:
        changes["sites"] = [site.slug for site in simulated_sites(options["clients"])]
    return changes


def command_owner(options: dict[str, Any]):
    try:
        return default_owner(options["owner"])
    except ExperimentInputError as exc:
        raise CommandError(str(exc)) from exc


def ensure_workers() -> None:
    """Outside embedded mode, the running Celery workers do the work: they must answer."""
    if not settings.FEDLENS_EMBEDDED and not celery_app.control.ping(timeout=WORKER_PING_SECONDS):
        raise CommandError(
            "No Celery worker answers on REDIS_URL; start them with "
            f"`python -m workers.launch --queues {TRAINING_QUEUE},{AGGREGATION_QUEUE}`."
        )


def experiment_to_resume(options: dict[str, Any]) -> Experiment:
    """The experiment of --resume; it continues as it was stored, so no setting may change."""
    changed = sorted(option for option in OPTION_SETTINGS if options.get(option) is not None)
    changed += [name for name in ("dataset", "clients", "clone") if options.get(name) is not None]
    if changed:
        raise CommandError(
            f"--resume continues the experiment with its own settings; leave out "
            f"{', '.join('--' + name.replace('_', '-') for name in changed)} (or use --clone)."
        )
    experiment = Experiment.objects.filter(pk=options["resume"]).first()
    if experiment is None:
        raise CommandError(f"No experiment {options['resume']} to resume.")
    return experiment


class Command(BaseCommand):
    help = (
        "Run a federated experiment on simulated sites: an in-process worker in embedded "
        "mode, the running Celery workers when REDIS_URL is set. --clone ID runs an "
        "existing experiment again, with the options given changing its settings; "
        "--resume ID continues one that a dead process left running."
    )

    def add_arguments(self, parser):
        add_experiment_arguments(parser)
        parser.add_argument(
            "--clone", type=int, metavar="ID", help="run this experiment again with changes"
        )
        parser.add_argument(
            "--resume",
            type=int,
            metavar="ID",
            help="continue this running experiment from its last closed round (its process "
            "died) and follow it to its end",
        )
        parser.add_argument("--json", type=Path, help="write the summary to this file")

    def handle(self, *args, **options):
        with quiet_task_logs(options["verbosity"]):
            self.run_to_the_end(options)

    def run_to_the_end(self, options):
        started = time.perf_counter()
        resuming = options["resume"] is not None
        if resuming:
            experiment = experiment_to_resume(options)
        else:
            experiment = self.create(options)
            self.stdout.write(f"Experiment {experiment.pk} ({experiment.name}) created.")
        ensure_workers()
        if settings.FEDLENS_EMBEDDED:
            worker = EmbeddedWorker(name="embedded-cli@fedlens").start()
            try:
                final = self.run(experiment.pk, resume=resuming)
            finally:
                worker.stop(wait_for_idle=False)  # the process ends after the summary
        else:
            final = self.run(experiment.pk, resume=resuming)
        summary = summarize(final, wall_seconds=time.perf_counter() - started)
        if options["json"]:
            options["json"].write_text(json.dumps(summary, indent=2))
            self.stdout.write(f"Summary written to {options['json']}")
        lost = faults.lost_sites_warning(final)
        if lost:  # "completed" alone would hide that some sites never contributed
            self.stderr.write(f"WARNING: {lost}")
        if final.status != ExperimentStatus.COMPLETED:
            raise CommandError(
                f"Experiment {final.pk} ended {final.status}: {final.failure_reason}"
            )

    def create(self, options):
        owner = command_owner(options)
        if options["clone"] is None:
            try:
                return create_experiment(owner, new_experiment_settings(options))
            except ExperimentInputError as exc:
                raise CommandError(str(exc)) from exc
        source = Experiment.objects.filter(pk=options["clone"]).first()
        if source is None:
            raise CommandError(f"No experiment {options['clone']} to clone.")
        try:
            return sweeps.clone_experiment(source, owner, clone_changes(options))
        except sweeps.SettingsError as exc:
            raise CommandError(str(exc)) from exc

    def run(self, experiment_id: int, *, resume: bool = False):
        rows = []

        def show(fl_round):
            rows.append(round_row(fl_round))

        # On the command line, the experiment's owner (--owner) is the one acting.
        if resume:
            try:
                resumed = resume_experiment(experiment_id)
            except InvalidTransition as exc:
                raise CommandError(str(exc)) from exc
            audit.record(
                resumed.experiment,
                "resume",
                actor=resumed.experiment.owner,
                via="manage.py run_experiment",
                sent=resumed.what,
            )
            self.stdout.write(f"Experiment {experiment_id} resumed: sent {resumed.what} again.")
        else:
            started = services.start_experiment(experiment_id)
            audit.record(started, "start", actor=started.owner, via="manage.py run_experiment")
        try:
            final = watch_experiment(experiment_id, out=self.stderr, on_round_closed=show)
        except KeyboardInterrupt:
            stopped = services.stop_experiment(
                experiment_id, reason="Interrupted on the command line."
            )
            audit.record(stopped, "stop", actor=stopped.owner, via="manage.py run_experiment")
            raise CommandError(f"Experiment {experiment_id} stopped.") from None
        if rows:
            self.stdout.write(format_table(rows))
        cross_site = site_evaluation.cross_site_results(final)
        if cross_site is not None and cross_site["models"]:
            self.stdout.write("Cross-site evaluation (each model on each site's validation data):")
            self.stdout.write(format_cross_site(cross_site))
        return final
