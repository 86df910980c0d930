"""Run a sweep: one experiment per combination of a grid, queued, run a few at a time, and
compared (mean ± std over seeds, rounds to reach the target, per site)."""

import json
import time
from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from training import audit, comparison, services, sweeps
from training.models import TERMINAL_EXPERIMENT_STATUSES, Sweep
from training.runner import POLL_SECONDS, quiet_task_logs
from workers.embedded import EmbeddedWorker
from workers.management.commands.run_experiment import (
    add_experiment_arguments,
    command_owner,
    ensure_workers,
    new_experiment_settings,
)


def parse_value(text: str) -> Any:
    """A --vary value: JSON when it reads as JSON (numbers, null, objects), else a string."""
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_vary(items: list[str]) -> dict[str, list[Any]]:
    """--vary FIELD=V1,V2 ... into a grid (FIELD as the REST API names it; - or _)."""
    grid = {}
    for item in items:
        field, sep, values = item.partition("=")
        if not sep or not field.strip() or not values.strip():
            raise CommandError(
                f"--vary {item!r}: write FIELD=V1,V2, e.g. --vary strategy=fedavg,fedprox"
            )
        grid[field.strip().replace("-", "_")] = [parse_value(v.strip()) for v in values.split(",")]
    return grid


class Command(BaseCommand):
    help = (
        "Create a sweep from the run_experiment options (the settings every experiment "
        "shares) and a grid (--grid JSON or --vary FIELD=V1,V2 ...), run it to the end on "
        "simulated sites and print the comparison; --no-wait only queues it."
    )

    def add_arguments(self, parser):
        add_experiment_arguments(parser)
        parser.add_argument("--grid", type=json.loads, help='JSON: {"field": [values], ...}')
        parser.add_argument(
            "--vary",
            action="append",
            default=[],
            metavar="FIELD=V1,V2",
            help="a setting and its values (repeat for more); values read as JSON when they can",
        )
        parser.add_argument("--max-running", type=int, default=2, help="experiments at once")
        parser.add_argument(
            "--target-metric", help="default: the task's primary metric (accuracy, dice)"
        )
        parser.add_argument("--target-value", type=float, default=0.8)
        parser.add_argument("--no-wait", action="store_true", help="queue it and return")

    def handle(self, *args, **options):
        grid = {**(options["grid"] or {}), **parse_vary(options["vary"])}
        if not grid:
            raise CommandError("Give the grid: --grid JSON or --vary FIELD=V1,V2 (repeatable).")
        if options["no_wait"] and settings.FEDLENS_EMBEDDED:
            raise CommandError(
                "--no-wait needs REDIS_URL and running workers: in embedded mode the sweep "
                "runs in this process, so it waits for the end."
            )
        base = new_experiment_settings(options)
        name = options["name"] or base["name"]
        base.pop("name")
        ensure_workers()
        with quiet_task_logs(options["verbosity"]):
            if settings.FEDLENS_EMBEDDED:
                with EmbeddedWorker(name="embedded-sweep@fedlens"):
                    sweep = self.create(options, name, base, grid)
                    self.wait(sweep)
            else:
                sweep = self.create(options, name, base, grid)
                if not options["no_wait"]:
                    self.wait(sweep)
        if options["no_wait"]:
            return
        self.stdout.write(comparison.format_comparison(comparison.sweep_comparison(sweep)))

    def create(self, options, name, base, grid) -> Sweep:
        try:
            sweep = sweeps.create_sweep(
                command_owner(options),
                name=name,
                base_settings=base,
                grid=grid,
                max_running=options["max_running"],
                target_metric=options["target_metric"],
                target_value=options["target_value"],
            )
        except sweeps.SettingsError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            f"Sweep {sweep.pk} ({sweep.name}): {sweep.experiments.count()} experiments queued, "
            f"{sweep.max_running} at a time."
        )
        return sweep

    def wait(self, sweep: Sweep) -> None:
        """Until every experiment of the sweep has ended; Ctrl-C stops the unfinished ones."""
        shown = None
        try:
            while True:
                statuses = list(sweep.experiments.values_list("status", flat=True))
                done = sum(status in TERMINAL_EXPERIMENT_STATUSES for status in statuses)
                if done != shown:
                    self.stderr.write(f"{done}/{len(statuses)} experiments ended")
                    shown = done
                if done == len(statuses):
                    return
                time.sleep(POLL_SECONDS)
        except KeyboardInterrupt:
            for experiment in sweep.experiments.exclude(status__in=TERMINAL_EXPERIMENT_STATUSES):
                services.stop_experiment(experiment.pk, reason="Sweep interrupted.")
                audit.record(experiment, "stop", actor=sweep.owner, via="manage.py sweep")
            raise CommandError(f"Sweep {sweep.pk} stopped.") from None
