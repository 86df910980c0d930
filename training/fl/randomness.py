"""The process's global CPU generator, shared by the threads that train and build networks.

PyTorch keeps one default CPU generator per process. Training seeds it per client and epoch
(for layers that draw from it, such as dropout), saves and restores it around a client's
training, and a seeded network build draws its initial weights from it. The embedded
worker trains several clients at once in threads: one thread's seeding, draws or restore
landing inside another's seeded sequence would make results depend on which clients ran
side by side. So every use of the generator by training and building goes through
``GLOBAL_GENERATOR``: held throughout a seeded build and the training of a network that
draws from it, and for the instants when any other training seeds, saves or restores it.
Code that only needs randomness of its own takes a ``torch.Generator`` of its own.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import nn

__all__ = ["GLOBAL_GENERATOR", "RANDOM_LAYERS", "draws_random_numbers", "forked_global_generator"]

# Reentrant: a seeded build may happen inside a training that holds it.
GLOBAL_GENERATOR = threading.RLock()

# Layers that draw from the global CPU generator as they train.
RANDOM_LAYERS = (
    nn.Dropout,
    nn.Dropout1d,
    nn.Dropout2d,
    nn.Dropout3d,
    nn.AlphaDropout,
    nn.FeatureAlphaDropout,
    nn.RReLU,
)


def draws_random_numbers(network: nn.Module) -> bool:
    """Whether training ``network`` draws from the global CPU generator: it has a dropout
    layer that drops something."""
    return any(
        isinstance(module, RANDOM_LAYERS) and getattr(module, "p", 1.0) > 0
        for module in network.modules()
    )


@contextmanager
def forked_global_generator(devices: Sequence[int], *, hold: bool) -> Iterator[None]:
    """``torch.random.fork_rng(devices)`` whose save and restore take GLOBAL_GENERATOR; with
    ``hold``, it is held throughout (for training that draws from the generator)."""
    if hold:
        with GLOBAL_GENERATOR, torch.random.fork_rng(devices=devices):
            yield
        return
    forked = torch.random.fork_rng(devices=devices)
    with GLOBAL_GENERATOR:
        forked.__enter__()
    try:
        yield
    finally:
        with GLOBAL_GENERATOR:
            forked.__exit__(None, None, None)
