"""What refusing truncated and corrupt NIfTI files costs a read.

    .venv/bin/python benchmarks/image_read_checks.py [--shape 128,256,256] [--repeats 5]

ITK pads a NIfTI file that ends early with zeros, so `read_image` first checks that the
file holds every byte its header declares: a .nii by its size (free), a .nii.gz by
decompressing its gzip stream to the end (which also checks its CRC). The table compares
SimpleITK's read (with the conversion to a float32 array that read_image also does) with
read_image, and times the check alone; best of `--repeats` runs, on random float32
voxels (which barely compress, the worst case for decompression).
"""

import argparse
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import SimpleITK as sitk

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.fl.data import readers


def best_seconds(run: Callable[[], object], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="128,256,256", help="z,y,x voxels")
    parser.add_argument("--repeats", type=int, default=5)
    options = parser.parse_args()
    shape = tuple(int(n) for n in options.shape.split(","))
    voxels = np.random.default_rng(0).normal(size=shape).astype(np.float32)
    print(f"{'file':<12} {'MB':>6} {'SimpleITK ms':>13} {'read_image ms':>14} {'check ms':>9}")
    with tempfile.TemporaryDirectory() as folder:
        for name in ("scan.nii", "scan.nii.gz"):
            path = Path(folder) / name
            sitk.WriteImage(sitk.GetImageFromArray(voxels), str(path), useCompression=True)
            header = readers._read_nifti_header(path)

            def plain(path: Path = path) -> object:
                image = sitk.ReadImage(str(path), imageIO="NiftiImageIO")
                return readers.image_from_sitk(image)

            def checked(path: Path = path) -> object:
                return readers.read_image(path)

            def check(path: Path = path, header=header) -> None:
                readers._check_nifti_complete(path, header, full=True)

            row = [best_seconds(run, options.repeats) * 1000 for run in (plain, checked, check)]
            size = path.stat().st_size / 1e6
            print(f"{name:<12} {size:6.1f} {row[0]:13.1f} {row[1]:14.1f} {row[2]:9.1f}")


if __name__ == "__main__":
    main()
