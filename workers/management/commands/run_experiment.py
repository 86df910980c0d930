"""Run a federated experiment on simulated sites to its end, with progress and a summary."""

import json
import time
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from flproject.celery import app as celery_app
from training import services
from training.models import Dataset, ExperimentStatus, Optimizer
from training.queues import AGGREGATION_QUEUE, TRAINING_QUEUE
from training.runner import (
    ExperimentInputError,
    create_experiment,
    default_owner,
    format_table,
    quiet_task_logs,
    round_row,
    simulated_sites,
    summarize,
    watch_experiment,
)
from workers.embedded import EmbeddedWorker

WORKER_PING_SECONDS = 3


class Command(BaseCommand):
    help = (
        "Run a federated experiment on simulated sites: an in-process worker in embedded "
        "mode, the running Celery workers when REDIS_URL is set."
    )

    def add_arguments(self, parser):
        parser.add_argument("--dataset", required=True, help="a registered dataset's name")
        parser.add_argument("--clients", type=int, default=4, help="simulated sites")
        parser.add_argument("--clients-per-round", type=int, help="default: all clients")
        parser.add_argument("--min-clients", type=int, help="default: clients per round")
        parser.add_argument("--rounds", type=int, default=5)
        parser.add_argument("--local-epochs", type=int, default=1)
        parser.add_argument("--batch-size", type=int, default=32)
        parser.add_argument("--lr", type=float, default=0.05)
        parser.add_argument("--optimizer", choices=Optimizer.values, default=Optimizer.SGD)
        parser.add_argument("--strategy", default="fedavg")
        parser.add_argument("--strategy-params", type=json.loads, default={}, help="JSON object")
        parser.add_argument("--partition", default="iid")
        parser.add_argument("--network", default="cnn-small")
        parser.add_argument("--seed", type=int, default=0)
        parser.add_argument("--round-timeout", type=int, default=3600, help="seconds")
        parser.add_argument("--name", help="default: <dataset>-<strategy>-<time>")
        parser.add_argument("--owner", help="username (default: the first superuser)")
        parser.add_argument("--json", type=Path, help="write the summary to this file")

    def handle(self, *args, **options):
        with quiet_task_logs(options["verbosity"]):
            self.run_to_the_end(options)

    def run_to_the_end(self, options):
        started = time.perf_counter()
        experiment = self.create(options)
        self.stdout.write(f"Experiment {experiment.pk} ({experiment.name}) created.")
        if settings.FEDLENS_EMBEDDED:
            with EmbeddedWorker(name="embedded-cli@fedlens"):
                final = self.run(experiment.pk)
        else:
            if not celery_app.control.ping(timeout=WORKER_PING_SECONDS):
                raise CommandError(
                    "No Celery worker answers on REDIS_URL; start them with "
                    f"`python -m workers.launch --queues {TRAINING_QUEUE},{AGGREGATION_QUEUE}`."
                )
            final = self.run(experiment.pk)
        summary = summarize(final, wall_seconds=time.perf_counter() - started)
        if options["json"]:
            options["json"].write_text(json.dumps(summary, indent=2))
            self.stdout.write(f"Summary written to {options['json']}")
        if final.status != ExperimentStatus.COMPLETED:
            raise CommandError(
                f"Experiment {final.pk} ended {final.status}: {final.failure_reason}"
            )

    def create(self, options):
        dataset = Dataset.objects.filter(name=options["dataset"]).first()
        if dataset is None:
            raise CommandError(
                f"No dataset named {options['dataset']!r}; register it first with "
                "`manage.py register_dataset --name NAME --path PATH`."
            )
        sites = simulated_sites(options["clients"])
        per_round = options["clients_per_round"] or len(sites)
        try:
            return create_experiment(
                default_owner(options["owner"]),
                {
                    "name": options["name"]
                    or f"{dataset.name}-{options['strategy']}-{time.strftime('%Y%m%d-%H%M%S')}",
                    "dataset": dataset.pk,
                    "sites": [site.slug for site in sites],
                    "network": options["network"],
                    "strategy": options["strategy"],
                    "strategy_params": options["strategy_params"],
                    "partition": options["partition"],
                    "num_rounds": options["rounds"],
                    "clients_per_round": per_round,
                    "min_clients": options["min_clients"] or per_round,
                    "local_epochs": options["local_epochs"],
                    "batch_size": options["batch_size"],
                    "learning_rate": options["lr"],
                    "optimizer": options["optimizer"],
                    "seed": options["seed"],
                    "round_timeout_seconds": options["round_timeout"],
                },
            )
        except ExperimentInputError as exc:
            raise CommandError(str(exc)) from exc

    def run(self, experiment_id: int):
        rows = []

        def show(fl_round):
            rows.append(round_row(fl_round))

        services.start_experiment(experiment_id)
        try:
            final = watch_experiment(experiment_id, out=self.stderr, on_round_closed=show)
        except KeyboardInterrupt:
            services.stop_experiment(experiment_id, reason="Interrupted on the command line.")
            raise CommandError(f"Experiment {experiment_id} stopped.") from None
        if rows:
            self.stdout.write(format_table(rows))
        return final
