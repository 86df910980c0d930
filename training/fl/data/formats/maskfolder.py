"""A mask folder: images and their label masks listed in ``labels.csv`` with the columns
``image,mask[,site]`` (paths relative to the folder). Its classes are those given at
registration (``--class-names``), else 0 up to the largest label the masks hold."""

from __future__ import annotations

import csv
from pathlib import Path

from training.fl.data.errors import LABELS_FILE, DatasetFormatError
from training.fl.data.formats.base import csv_columns
from training.fl.data.formats.paired import PairedFormat, PairListing

__all__ = ["MaskFolderFormat"]


class MaskFolderFormat(PairedFormat):
    """The whole folder is the train split; the server holds back a share to evaluate."""

    name = "maskfolder"
    summary = f"maskfolder: images and masks, {LABELS_FILE} with columns image,mask[,site]"

    def detect(self, path: Path) -> bool:
        labels = path / LABELS_FILE
        return path.is_dir() and labels.is_file() and "mask" in csv_columns(labels)

    def listing(self, path: Path, split: str) -> PairListing:
        labels_path = path / LABELS_FILE
        if not labels_path.is_file():
            raise DatasetFormatError(f"{path}: no {LABELS_FILE} in this folder")
        folder = path.resolve()
        images: list[str] = []
        masks: list[str] = []
        sites: list[str] = []
        # utf-8-sig also accepts the byte-order mark that spreadsheet exports add.
        with labels_path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle)
            try:
                columns = {column.strip() for column in reader.fieldnames or ()}
                if not {"image", "mask"} <= columns:
                    raise DatasetFormatError(
                        f"{labels_path}: needs columns image,mask[,site]; found {sorted(columns)}"
                    )
                reader.fieldnames = [column.strip() for column in reader.fieldnames or ()]
                has_site = "site" in columns
                for line, row in enumerate(reader, start=2):
                    pair = []
                    for column in ("image", "mask"):
                        relative = (row[column] or "").strip()
                        file = (folder / relative).resolve()
                        if not relative or not file.is_relative_to(folder):
                            raise DatasetFormatError(
                                f"{labels_path}:{line}: {column} must lie in the folder"
                            )
                        if not file.exists():
                            raise DatasetFormatError(f"{labels_path}:{line}: {relative} not found")
                        pair.append(file.relative_to(folder).as_posix())
                    images.append(pair[0])
                    masks.append(pair[1])
                    if has_site:
                        sites.append((row["site"] or "").strip())
            except csv.Error as error:
                raise DatasetFormatError(
                    f"{labels_path}:{reader.reader.line_num}: not valid CSV ({error})"
                ) from None
        if not images:
            raise DatasetFormatError(f"{labels_path}: dataset has no samples")
        return PairListing(images=images, masks=masks, sites=sites if has_site else None)
