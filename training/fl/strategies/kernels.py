"""Numeric aggregation kernels over tensors, free of any round bookkeeping.

Only the weighted sum streams: :func:`add_weighted_` folds one update at a time into a
running float64 sum, so memory stays at one model whatever the number of clients. The
robust statistics -- coordinate-wise median and trimmed mean (Yin et al., 2018,
arXiv:1803.01498) and Krum (Blanchard et al., 2017, arXiv:1703.02757) -- are inherently
order statistics over all updates at once, so they take the whole list and hold every
update in memory.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

__all__ = [
    "add_weighted_",
    "coordinate_median",
    "flatten_weights",
    "krum_select",
    "trimmed_mean",
    "unflatten_weights",
    "weighted_mean",
]


def add_weighted_(
    running: dict[str, torch.Tensor], update: Mapping[str, torch.Tensor], weight: float
) -> None:
    """In place: ``running[name] += weight * update[name]`` on the CPU, without temporaries.

    Missing entries of ``running`` start at zero, so an empty dict begins a new sum. Sums
    are kept in float32 (float64 for float64 weights): 32 or 1000 clients' weights lose
    nothing measurable in float32, and a float64 sum would double the memory of a round.
    """
    for name, tensor in update.items():
        source = tensor.detach().to("cpu")
        if name in running:
            running[name].add_(source, alpha=weight)
        else:
            dtype = torch.promote_types(source.dtype, torch.float32)
            running[name] = source.to(dtype, copy=True).mul_(weight)


def _stack(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    if not tensors:
        raise ValueError("need at least one tensor")
    return torch.stack([t.detach().to("cpu", torch.float64) for t in tensors])


def weighted_mean(tensors: Sequence[torch.Tensor], weights: Sequence[float]) -> torch.Tensor:
    """Mean of same-shaped tensors with non-negative weights that do not all vanish (float64)."""
    if len(tensors) != len(weights):
        raise ValueError(f"got {len(tensors)} tensors but {len(weights)} weights")
    weight_tensor = torch.tensor(weights, dtype=torch.float64)
    if bool((weight_tensor < 0).any()) or float(weight_tensor.sum()) <= 0:
        raise ValueError("weights must be non-negative and sum to a positive number")
    stacked = _stack(tensors)
    shape = (-1,) + (1,) * (stacked.dim() - 1)
    return (stacked * weight_tensor.view(shape)).sum(dim=0) / weight_tensor.sum()


def coordinate_median(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """Element-wise median (the mean of the two middle values for an even count)."""
    # Sorting rather than torch.quantile, which refuses inputs above 16M elements.
    ordered = _stack(tensors).sort(dim=0).values
    middle = len(tensors) // 2
    if len(tensors) % 2:
        return ordered[middle]
    return (ordered[middle - 1] + ordered[middle]) / 2


def trimmed_mean(tensors: Sequence[torch.Tensor], *, trim_ratio: float) -> torch.Tensor:
    """Element-wise mean after dropping the ``trim_ratio`` largest and smallest values."""
    if not 0 <= trim_ratio < 0.5:
        raise ValueError(f"trim_ratio must be in [0, 0.5), got {trim_ratio}")
    stacked = _stack(tensors)
    trimmed = int(trim_ratio * len(tensors))
    ordered = stacked.sort(dim=0).values
    return ordered[trimmed : len(tensors) - trimmed].mean(dim=0)


def krum_select(
    vectors: Sequence[torch.Tensor], *, num_byzantine: int, num_selected: int = 1
) -> list[int]:
    """Indices of the ``num_selected`` vectors with the lowest Krum scores, best first.

    A vector's score is the sum of squared distances to its ``n - num_byzantine - 2``
    nearest neighbours; Krum's guarantee needs ``n > 2 * num_byzantine + 2``. Selecting
    more than one vector gives Multi-Krum, whose picks are then averaged by the caller.
    """
    count = len(vectors)
    if num_byzantine < 0:
        raise ValueError(f"num_byzantine must be >= 0, got {num_byzantine}")
    if count <= 2 * num_byzantine + 2:
        raise ValueError(f"Krum needs more than {2 * num_byzantine + 2} vectors, got {count}")
    if not 1 <= num_selected <= count:
        raise ValueError(f"num_selected must be in 1..{count}, got {num_selected}")
    stacked = _stack([vector.reshape(-1) for vector in vectors])
    squared_distances = torch.cdist(stacked, stacked).square()
    neighbours = count - num_byzantine - 2
    # Column 0 of each sorted row is the vector's zero distance to itself.
    scores = squared_distances.sort(dim=1).values[:, 1 : neighbours + 1].sum(dim=1)
    return [int(index) for index in scores.argsort(stable=True)[:num_selected]]


def flatten_weights(weights: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """All floating-point tensors concatenated into one float64 vector, in key order."""
    parts = [
        t.detach().to("cpu", torch.float64).reshape(-1)
        for t in weights.values()
        if t.dtype.is_floating_point
    ]
    if not parts:
        raise ValueError("no floating-point tensors to flatten")
    return torch.cat(parts)


def unflatten_weights(
    vector: torch.Tensor, template: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Inverse of :func:`flatten_weights`: floating tensors come from ``vector`` (cast to
    the template's dtypes); the template's other tensors are copied unchanged."""
    result: dict[str, torch.Tensor] = {}
    offset = 0
    for name, tensor in template.items():
        if tensor.dtype.is_floating_point:
            size = tensor.numel()
            result[name] = vector[offset : offset + size].reshape(tensor.shape).to(tensor.dtype)
            offset += size
        else:
            result[name] = tensor.detach().clone()
    if offset != vector.numel():
        raise ValueError(f"vector has {vector.numel()} values; the template needs {offset}")
    return result
