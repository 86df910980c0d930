"""Check the model store against the ledger: every checkpoint and client update file that a
row names must exist and have the SHA-256 the row recorded.

Run after a restore (deploy/scripts/restore.sh does) or whenever the store is in doubt.
Files that no row names (left by a task that ran twice, or written after a backup's dump)
are not errors and are not counted.
"""

import hashlib

from django.core.files.storage import Storage
from django.core.management.base import BaseCommand, CommandError

from training.models import Checkpoint, ClientUpdate, model_store

READ_CHUNK_BYTES = 1 << 20


def stored_file_sha256(storage: Storage, name: str) -> str:
    digest = hashlib.sha256()
    with storage.open(name, "rb") as handle:
        while chunk := handle.read(READ_CHUNK_BYTES):
            digest.update(chunk)
    return digest.hexdigest()


class Command(BaseCommand):
    help = (
        "Check that every checkpoint and client update file the database names is in the "
        "model store with its recorded SHA-256; exits non-zero if any is missing or differs."
    )

    def add_arguments(self, parser):
        parser.add_argument(
            "--experiment",
            type=int,
            action="append",
            dest="experiment_ids",
            metavar="ID",
            help="check only this experiment's files (may be repeated)",
        )

    def handle(self, *args, experiment_ids: list[int] | None, **options):
        storage = model_store()
        checkpoints = Checkpoint.objects.order_by("pk")
        client_updates = ClientUpdate.objects.exclude(update_file="").order_by("pk")
        if experiment_ids:
            checkpoints = checkpoints.filter(experiment_id__in=experiment_ids)
            client_updates = client_updates.filter(round__experiment_id__in=experiment_ids)
        recorded_files = (
            ("checkpoint", checkpoints.values_list("pk", "file", "sha256")),
            ("client update", client_updates.values_list("pk", "update_file", "update_sha256")),
        )
        checked = {"checkpoint": 0, "client update": 0}
        missing = mismatched = 0
        for kind, rows in recorded_files:
            for pk, name, recorded_sha256 in rows.iterator():
                checked[kind] += 1
                if not storage.exists(name):
                    missing += 1
                    self.stderr.write(f"missing: {kind} {pk}: {name}")
                    continue
                actual_sha256 = stored_file_sha256(storage, name)
                if actual_sha256 != recorded_sha256:
                    mismatched += 1
                    self.stderr.write(
                        f"different: {kind} {pk}: {name} has SHA-256 {actual_sha256}, "
                        f"the ledger recorded {recorded_sha256}"
                    )
        total = sum(checked.values())
        location = getattr(storage, "location", type(storage).__name__)
        self.stdout.write(
            f"Model store {location}: checked {checked['checkpoint']} checkpoint and "
            f"{checked['client update']} client update files; {total - missing - mismatched} "
            f"match, {missing} missing, {mismatched} different."
        )
        if missing or mismatched:
            raise CommandError(
                f"{missing + mismatched} of {total} files the ledger names are missing from the "
                "model store or differ from it; restore them from a backup."
            )
