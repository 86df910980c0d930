"""Write the synthetic lesion-classification set (NIfTI images plus labels.csv)."""

from pathlib import Path

from django.core.management.base import BaseCommand, CommandError

from training.fl.data import generate_synthetic_dataset


class Command(BaseCommand):
    help = (
        "Generate a binary lesion-classification dataset with per-site scanner differences: "
        "NIfTI images and labels.csv (path,label,site)."
    )

    def add_arguments(self, parser):
        parser.add_argument("--out", required=True, type=Path, help="folder to write into")
        parser.add_argument("--sites", type=int, default=4)
        parser.add_argument("--per-site", type=int, default=300, help="images per site")
        parser.add_argument("--size", type=int, default=64, help="image side in pixels")
        parser.add_argument("--seed", type=int, default=0)

    def handle(self, *args, out: Path, sites: int, per_site: int, size: int, seed: int, **opts):
        try:
            root = generate_synthetic_dataset(
                out, sites=sites, per_site=per_site, size=size, seed=seed
            )
        except ValueError as exc:
            raise CommandError(str(exc)) from exc
        self.stdout.write(
            self.style.SUCCESS(f"Wrote {sites * per_site} images of {size}x{size} to {root}")
        )
