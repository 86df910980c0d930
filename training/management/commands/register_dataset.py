"""Register a dataset found on this server: its shape, classes and spacing are read from it."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from training.api.serializers import DatasetSerializer
from training.fl.data import NORMALIZATION_FORMS, DatasetFormatError, load_dataset, read_image
from training.models import Dataset, Modality, StorageFormat
from training.runner import ExperimentInputError, default_owner


def describe(path: Path, storage_format: str | None) -> dict:
    """What the ledger records of a dataset, read from the data itself."""
    data = load_dataset(path, storage_format)
    image, _ = data[0]
    spacing: list[float] = []
    if hasattr(data, "paths"):
        # SimpleITK gives spacing as x, y(, z); the ledger keeps (depth,) height, width.
        spacing = [float(step) for step in reversed(read_image(data.paths[0]).spacing)]
    return {
        "storage_format": StorageFormat.NPZ if path.suffix == ".npz" else StorageFormat.FOLDER,
        "num_classes": data.num_classes,
        "channels": data.in_channels,
        "image_shape": list(image.shape[1:]),
        "spacing": spacing,
    }


class Command(BaseCommand):
    help = "Register a dataset folder (images + labels.csv) or a MedMNIST .npz file."

    def add_arguments(self, parser):
        parser.add_argument("--name", required=True)
        parser.add_argument("--path", required=True, type=Path)
        parser.add_argument("--format", choices=StorageFormat.values, help="skip detection")
        parser.add_argument("--modality", choices=Modality.values, default=Modality.OTHER)
        parser.add_argument("--class-names", help="comma-separated, in label order")
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
        try:
            owner = default_owner(options["owner"])
            facts = describe(path, options["format"])
        except (ExperimentInputError, DatasetFormatError, ValueError) as exc:
            raise CommandError(str(exc)) from exc
        class_names = options["class_names"]
        payload = {
            "name": name,
            "path": str(path),
            "modality": options["modality"],
            "description": options["description"],
            "class_names": class_names.split(",") if class_names else [],
            "normalization": options["normalization"],
            **facts,
        }
        if options["channels"] is not None:
            payload["channels"] = options["channels"]
        if options["validation_fraction"] is not None:
            payload["validation_fraction"] = options["validation_fraction"]
        serializer = DatasetSerializer(data=payload, context={"owner": owner})
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
                f"Registered {name!r}: {dataset.num_classes} classes, {dataset.channels} "
                f"channel(s), images {dataset.image_shape}, normalization "
                f"{dataset.normalization or 'the format default'}, owner {owner.username}."
            )
        )
