"""Splitting one dataset's sample indices among simulated federated clients.

Partition specs:

* ``iid`` -- shuffled and split into near-equal parts.
* ``dirichlet:<alpha>`` -- label skew: each class is split among clients with Dirichlet
  proportions (Hsu et al., 2019, arXiv:1909.06335); small alpha means strong skew.
* ``quantity:<alpha>`` -- quantity skew: client sizes follow Dirichlet proportions.
* ``site`` -- one client per acquisition site, in sorted site-name order.
* ``file:<path>`` -- a JSON list with one list of sample indices per client. The indices
  are rows of the dataset as registered, counted from 0: an image folder's labels.csv data
  rows, or the rows of an .npz file's train split (see docs/datasets.md); the server's
  held-out rows are whichever the file gives to no client.

Every client gets at least ``min(min_samples, num_samples // num_clients)`` samples.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

__all__ = [
    "PARTITION_FORMS",
    "PartitionSpec",
    "holdout_split",
    "parse_partition_spec",
    "partition_indices",
]

PARTITION_FORMS = (
    "iid, dirichlet:<alpha>, quantity:<alpha>, site, file:<path> (a JSON list of row-index "
    "lists, one per site; rows of the dataset as registered, from 0)"
)


@dataclass(frozen=True, kw_only=True)
class PartitionSpec:
    """A parsed spec: ``alpha`` is used by dirichlet/quantity, ``path`` by file."""

    kind: str
    alpha: float = 0.0
    path: str = ""


def parse_partition_spec(spec: str) -> PartitionSpec:
    """Parse a spec string, rejecting anything malformed with the accepted forms."""
    kind, _, argument = spec.partition(":")
    if kind in ("iid", "site") and not argument:
        return PartitionSpec(kind=kind)
    if kind in ("dirichlet", "quantity") and argument:
        try:
            alpha = float(argument)
        except ValueError:
            alpha = float("nan")
        if not (alpha > 0 and np.isfinite(alpha)):
            raise ValueError(f"{kind} alpha must be a positive number, got {argument!r}")
        return PartitionSpec(kind=kind, alpha=alpha)
    if kind == "file" and argument:
        return PartitionSpec(kind=kind, path=argument)
    raise ValueError(f"invalid partition spec {spec!r}; accepted forms: {PARTITION_FORMS}")


def partition_indices(
    spec: str,
    *,
    labels: Sequence[int] | npt.NDArray[np.integer],
    num_clients: int,
    seed: int,
    sites: Sequence[str] | None = None,
    min_samples: int = 5,
) -> list[list[int]]:
    """Return one sorted list of dataset indices per client, as ``spec`` prescribes."""
    parsed = parse_partition_spec(spec)
    label_array = np.asarray(labels, dtype=np.int64)
    num_samples = len(label_array)
    if num_clients < 1:
        raise ValueError(f"num_clients must be >= 1, got {num_clients}")
    if num_samples < num_clients:
        raise ValueError(f"cannot split {num_samples} samples among {num_clients} clients")
    rng = np.random.default_rng(seed)
    floor = min(min_samples, num_samples // num_clients)

    parts: Sequence[Sequence[int] | npt.NDArray[np.int64]]
    if parsed.kind == "iid":
        parts = np.array_split(rng.permutation(num_samples), num_clients)
    elif parsed.kind == "dirichlet":
        parts = _label_skew(label_array, num_clients, parsed.alpha, floor, rng)
    elif parsed.kind == "quantity":
        parts = _quantity_skew(num_samples, num_clients, parsed.alpha, floor, rng)
    elif parsed.kind == "site":
        parts = _by_site(sites, num_samples, num_clients)
    else:
        parts = _from_file(Path(parsed.path), num_samples, num_clients)
    return [sorted(int(index) for index in part) for part in parts]


def _label_skew(
    labels: npt.NDArray[np.int64],
    num_clients: int,
    alpha: float,
    floor: int,
    rng: np.random.Generator,
) -> list[list[int]]:
    parts: list[list[int]] = [[] for _ in range(num_clients)]
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        proportions = rng.dirichlet(np.full(num_clients, alpha))
        cuts = (np.cumsum(proportions)[:-1] * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts), strict=True):
            part.extend(chunk.tolist())
    # Strong skew can leave a client (nearly) empty; top it up from the largest client,
    # which changes the label mix as little as possible.
    for part in parts:
        while len(part) < floor:
            largest = max(parts, key=len)
            part.append(largest.pop(int(rng.integers(len(largest)))))
    return parts


def _quantity_skew(
    num_samples: int, num_clients: int, alpha: float, floor: int, rng: np.random.Generator
) -> list[npt.NDArray[np.int64]]:
    spare = num_samples - floor * num_clients
    sizes = floor + rng.multinomial(spare, rng.dirichlet(np.full(num_clients, alpha)))
    return np.split(rng.permutation(num_samples), np.cumsum(sizes)[:-1])


def _by_site(
    sites: Sequence[str] | None, num_samples: int, num_clients: int
) -> list[npt.NDArray[np.int64]]:
    if sites is None:
        raise ValueError("the site partition needs a dataset with a site column")
    if len(sites) != num_samples:
        raise ValueError(f"got {len(sites)} sites for {num_samples} samples")
    site_array = np.asarray(sites, dtype=str)
    names = sorted(set(site_array.tolist()))
    if len(names) != num_clients:
        raise ValueError(
            f"the site partition makes one client per site: {len(names)} sites "
            f"({', '.join(names)}) but num_clients is {num_clients}"
        )
    return [np.flatnonzero(site_array == name) for name in names]


def _from_file(path: Path, num_samples: int, num_clients: int) -> list[list[int]]:
    try:
        parts = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ValueError(f"partition file {path}: cannot read JSON ({error})") from None
    if not isinstance(parts, list) or not all(isinstance(part, list) for part in parts):
        raise ValueError(f"partition file {path}: expected a JSON list of index lists")
    if len(parts) != num_clients:
        raise ValueError(f"partition file {path}: has {len(parts)} clients, expected {num_clients}")
    seen: set[int] = set()
    for client, part in enumerate(parts):
        if not part:
            raise ValueError(f"partition file {path}: client {client} has no samples")
        for index in part:
            # bool is an int subclass, but true/false in the file is certainly a mistake.
            if not isinstance(index, int) or isinstance(index, bool):
                raise ValueError(f"partition file {path}: {index!r} is not an integer index")
            if not 0 <= index < num_samples:
                raise ValueError(
                    f"partition file {path}: index {index} outside 0..{num_samples - 1}"
                )
            if index in seen:
                raise ValueError(f"partition file {path}: index {index} appears twice")
            seen.add(index)
    return parts


def holdout_split(
    labels: Sequence[int] | npt.NDArray[np.integer], *, fraction: float, seed: int
) -> tuple[list[int], list[int]]:
    """Stratified split into (kept, held-out) sorted index lists, e.g. for a test set.

    Every class keeps at least one sample on the kept side.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"fraction must be strictly between 0 and 1, got {fraction}")
    label_array = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(seed)
    held_out: list[int] = []
    for label in np.unique(label_array):
        members = rng.permutation(np.flatnonzero(label_array == label))
        count = min(round(fraction * len(members)), len(members) - 1)
        held_out.extend(members[:count].tolist())
    held = set(held_out)
    kept = [index for index in range(len(label_array)) if index not in held]
    return kept, sorted(held_out)
