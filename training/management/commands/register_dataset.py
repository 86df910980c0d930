"""Register a dataset found on this server: its task, shape, classes and spacing are read
from it by its format (training/fl/data/formats/)."""

from collections.abc import Sequence
from pathlib import Path

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from training.api.serializers import DatasetSerializer
from training.fl.data import NORMALIZATION_FORMS, DatasetFormatError, ImageReadError
from training.fl.data.formats import detect_format, formats, get_format
from training.models import Dataset, Modality, StorageFormat
from training.runner import ExperimentInputError, default_owner


def describe(
    path: Path, storage_format: str | None, class_names: Sequence[str] | None = None
) -> dict:
    """What the ledger records of a dataset, read from the data itself (a segmentation
    dataset's masks are all checked). ``class_names`` declares the classes; segmentation
    formats check the masks against them, classification keeps them as given."""
    data_format = get_format(storage_format) if storage_format else detect_format(path)
    description = data_format.describe(
        path, class_names=class_names, max_voxels=settings.FEDLENS_MAX_VOLUME_VOXELS
    )
    return description.ledger_fields()


class Command(BaseCommand):
    help = "Register a dataset: " + "; ".join(f.summary for f in formats()) + "."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--path", required=True, type=Path)
        parser.add_argument("--format", choices=StorageFormat.values, help="skip detection")
        parser.add_argument("--modality", choices=Modality.values, default=Modality.OTHER)
        parser.add_argument(
            "--class-names",
            help="comma-separated, in label order; for segmentation every class, the "
            "background (label 0) first (default: dataset.json's labels, or 0 up to the "
            "largest label in the masks)",
        )
        parser.add_argument(
            "--channels",
            type=int,
            choices=(1, 3),
            help="channels the network takes (default: the images'); grey is repeated to "
            "make 3, colour collapsed by luma to make 1",
        )
        parser.add_argument(
            "--normalization",
            default="",
            metavar="SPEC",
            help=f"intensity normalization: {NORMALIZATION_FORMS}; default: zscore for "
            "folders, mean-std:0.5,0.5 for 8-bit .npz (after dividing by 255), none for "
            "other .npz",
        )
        parser.add_argument(
            "--validation-fraction",
            type=float,
            metavar="SHARE",
            help="share of each site's data kept for federated evaluation, 0 to 0.9 (default 0.2)",
        )
        parser.add_argument("--description", default="")
        parser.add_argument("--owner", help="username (default: the first superuser)")

    def handle(self, *args, name: str, path: Path, **options):
        path = path.resolve()
        existing = Dataset.objects.filter(name=name).first()
        if existing is not None:
            if Path(existing.path) != path:
                raise CommandError(f"A dataset named {name!r} already points at {existing.path}.")
            self.stdout.write(f"Dataset {name!r} is already registered ({path}).")
            return
        given = options["class_names"]
        class_names = [part.strip() for part in given.split(",")] if given else []
        try:
            owner = default_owner(options["owner"])
            facts = describe(path, options["format"], class_names)
        except (ExperimentInputError, DatasetFormatError, ImageReadError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        payload = {
            "name": name,
            "path": str(path),
            "modality": options["modality"],
            "description": options["description"],
            "normalization": options["normalization"],
            **facts,
        }
        if options["channels"] is not None:
            payload["channels"] = options["channels"]
        if options["validation_fraction"] is not None:
            payload["validation_fraction"] = options["validation_fraction"]
        # "described": the data was read above, its masks checked.
        serializer = DatasetSerializer(data=payload, context={"owner": owner, "described": True})
        if not serializer.is_valid():
            raise CommandError(
                "; ".join(
                    f"{field}: {' '.join(map(str, errors))}"
                    for field, errors in serializer.errors.items()
                )
            )
        dataset = serializer.save(owner=owner)
        self.stdout.write(
            self.style.SUCCESS(
                f"Registered {name!r} ({dataset.task}): {dataset.num_classes} classes, "
                f"{dataset.channels} "
                f"channel(s), images {dataset.image_shape}, normalization "
                f"{dataset.normalization or 'the format default'}, owner {owner.username}."
            )
        )
