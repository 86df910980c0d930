"""`make demo`: the synthetic set, a 4-site experiment, and the site serving it, in one process.

One process, so that in embedded mode the web server, the Celery worker and the experiment
share the in-memory broker and channel layer, exactly as `uvicorn` alone would run them.
"""

import socket
import threading

import uvicorn
from django.conf import settings
from django.core.management import call_command
from django.core.management.base import BaseCommand, CommandError
from django.db import connection

from training import audit, services
from training.models import Dataset
from training.runner import (
    ExperimentInputError,
    create_experiment,
    default_owner,
    format_table,
    quiet_task_logs,
    round_row,
    simulated_sites,
    watch_experiment,
)

DATASET_NAME = "synthetic-lesions"


def listening_socket(host: str, port: int) -> socket.socket:
    try:
        return socket.create_server((host, port))
    except OSError as exc:
        raise CommandError(
            f"Cannot listen on {host}:{port} ({exc.strerror}); nothing was created. "
            f"Pick another port: `make demo PORT={port + 1}` (or `manage.py demo --port "
            f"{port + 1}`)."
        ) from exc


class Command(BaseCommand):
    help = "Generate and register the synthetic set, start a 4-site experiment, serve the site."

    def add_arguments(self, parser):
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--port", type=int, default=8000)
        parser.add_argument("--sites", type=int, default=4)
        parser.add_argument("--rounds", type=int, default=5)

    def handle(self, *args, host: str, port: int, sites: int, rounds: int, **options):
        # Bound before anything is created: a busy port must not leave behind an experiment
        # that starts with no server to watch it (and never finishes once we exit).
        listener = listening_socket(host, port)
        dataset_dir = settings.FEDLENS_DATASET_ROOTS[0] / "synthetic-lesions"
        if not (dataset_dir / "labels.csv").exists():
            call_command("make_synthetic_dataset", out=dataset_dir, sites=sites, per_site=300,
                         size=64, seed=0, stdout=self.stdout)  # fmt: skip
        call_command("register_dataset", name=DATASET_NAME, path=dataset_dir,
                     modality="MR", class_names="normal,lesion", stdout=self.stdout)  # fmt: skip
        try:
            experiment = create_experiment(
                default_owner(None),
                {
                    "name": f"Demo: {sites} sites, {rounds} rounds",
                    "description": "Each simulated site holds the images of one scanner.",
                    "dataset": Dataset.objects.get(name=DATASET_NAME).pk,
                    "sites": [site.slug for site in simulated_sites(sites)],
                    "partition": "site",
                    "num_rounds": rounds,
                    "clients_per_round": sites,
                    "min_clients": max(1, sites - 1),
                    "local_epochs": 3,
                    "batch_size": 16,
                    "learning_rate": 0.05,
                    "round_timeout_seconds": 600,
                },
            )
        except ExperimentInputError as exc:
            raise CommandError(str(exc)) from exc
        # Quiet from here on: the experiment's start, the worker's start (with the app's
        # import below) and every task would each log an INFO line into the progress bars.
        with quiet_task_logs(options["verbosity"]):
            started = services.start_experiment(experiment.pk)
            audit.record(started, "start", actor=started.owner, via="manage.py demo")
            self.stdout.write(
                self.style.SUCCESS(
                    f"Experiment {experiment.pk} started; open http://{host}:{port}/ and log in."
                )
            )
            threading.Thread(
                target=self.report_progress, args=(experiment.pk,), daemon=True, name="progress"
            ).start()
            from flproject.asgi import application

            # lifespan off: Channels' router has no lifespan events, and uvicorn would say so.
            # Its request lines too would go between the bars, unless asked for (-v 2).
            config = uvicorn.Config(
                application, host=host, port=port, lifespan="off",
                log_level="info" if options["verbosity"] >= 2 else "warning",
            )  # fmt: skip
            uvicorn.Server(config).run(sockets=[listener])

    def report_progress(self, experiment_id: int) -> None:
        rows = []
        try:
            final = watch_experiment(
                experiment_id,
                out=self.stderr,
                on_round_closed=lambda fl_round: rows.append(round_row(fl_round)),
            )
            self.stdout.write(format_table(rows))
            self.stdout.write(
                f"Experiment {experiment_id} {final.status}. The site keeps serving; "
                "Ctrl-C stops it."
            )
        finally:
            connection.close()
