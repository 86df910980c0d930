"""Write a synthetic multi-site dataset: 2D or 3D lesion classification (NIfTI images
plus labels.csv) or organ-and-lesion segmentation (Medical Segmentation Decathlon layout)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from training.fl.data import (
    generate_segmentation_dataset,
    generate_synthetic_dataset,
    generate_volume_classification_dataset,
)

# Per task and dimensionality: small enough for CI by default, larger on request.
DEFAULTS = {
    ("classification", 2): {"sites": 4, "per_site": 300, "size": 64},
    ("classification", 3): {"sites": 3, "per_site": 20, "size": 32, "depth": 16},
    ("segmentation", 2): {"sites": 3, "per_site": 8, "size": 48},
    ("segmentation", 3): {"sites": 3, "per_site": 8, "size": 48, "depth": 32},
}


class Command(BaseCommand):
    help = (
        "Generate a dataset with per-site scanner differences: --task classification "
        "(default; NIfTI images and labels.csv path,label,site; --dims 3 for volumes) or "
        "--task segmentation (labels background/organ/lesion, Decathlon layout: "
        "dataset.json, imagesTr/, labelsTr/; --dims 2 for slices, 3 for volumes)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, type=Path, help="folder to write into")
        parser.add_argument(
            "--task", choices=("classification", "segmentation"), default="classification"
        )
        parser.add_argument(
            "--dims", type=int, choices=(2, 3), help="default: 2 (classification), 3 (segmentation)"
        )
        parser.add_argument("--sites", type=int, help="default: 4 (2D classification), else 3")
        parser.add_argument(
            "--per-site", type=int, help="images per site (default: 300 / 20 / 8 by task)"
        )
        parser.add_argument("--size", type=int, help="in-plane side in pixels")
        parser.add_argument("--depth", type=int, help="slices per volume (3D only)")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, out: Path, task: str, dims: int | None, seed: int, **opts):
        dims = dims or (3 if task == "segmentation" else 2)
        settings = DEFAULTS[(task, dims)]
        if dims == 2 and opts["depth"] is not None:
            raise CommandError("--depth applies to volumes only; drop it or give --dims 3.")
        chosen = {key: opts[key] if opts[key] is not None else value
                  for key, value in settings.items()}  # fmt: skip
        try:
            if task == "segmentation":
                root = generate_segmentation_dataset(out, dims=dims, seed=seed, **chosen)
            elif dims == 3:
                root = generate_volume_classification_dataset(out, seed=seed, **chosen)
            else:
                root = generate_synthetic_dataset(out, seed=seed, **chosen)
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        shape = "x".join(str(chosen[key]) for key in ("size", "size", "depth") if key in chosen)
        self.stdout.write(
            self.style.SUCCESS(
                f"Wrote {chosen['sites'] * chosen['per_site']} {task} images of {shape} to {root}"
            )
        )
