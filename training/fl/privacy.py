"""Differential privacy for federated training: clipping, Gaussian noise, accounting.

Client-level DP-FedAvg (McMahan et al. 2018, "Learning Differentially Private Recurrent
Language Models", arXiv:1710.06963): each round's client update (its weights minus the
round's starting weights) is clipped to an L2 norm C, and Gaussian noise calibrated to C
is added to the average, so that the new global model barely depends on whether any one
*site* took part. Privacy is accounted with Opacus's RDP accountant (Mironov 2017,
arXiv:1702.07476), treating a round as one step of the subsampled Gaussian mechanism:

- sampling rate q = clients per round / size of the pool of sites,
- noise multiplier z = std of the noise on the *sum* of updates / C,
- steps T = rounds so far.

:class:`DifferentiallyPrivate` wraps any strategy to do this at the server, or (``noise_at
= "client"``) asks the clients to add their share of the noise themselves, so that the
server never sees a noise-free update. Local DP-SGD (Abadi et al. 2016, arXiv:1607.00133)
protects single *samples* within a site instead; :func:`make_private_training` sets it up
with Opacus for a client's own training.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, ClassVar

import numpy as np
import torch
from torch import nn
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler

from training.fl.local import derive_seed
from training.fl.strategies.base import Strategy

if TYPE_CHECKING:
    from opacus import PrivacyEngine

# Opacus (and the SciPy it loads) is imported by the functions that account or train with
# DP-SGD: most runs use neither, and it costs seconds to import.

__all__ = [
    "NOISE_LOCATIONS",
    "DifferentiallyPrivate",
    "add_gaussian_noise_",
    "client_noise_std",
    "clip_update",
    "dp_sgd_problem",
    "epsilon_spent",
    "make_private_training",
    "server_noise_generator",
    "server_noise_std",
]

NOISE_LOCATIONS = ("server", "client")
# derive_seed's key for the server's noise; local training uses one key (epochs) or the key
# 1 (clients), so this stream is independent of theirs.
_SERVER_NOISE_STREAM = 2


def _floating_names(weights: Mapping[str, torch.Tensor]) -> list[str]:
    return [name for name, tensor in weights.items() if tensor.dtype.is_floating_point]


def _update_norm(trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor]) -> float:
    """L2 norm of trained - start over the floating entries, summed in float64."""
    if trained.keys() != start.keys():
        missing = sorted(start.keys() - trained.keys())
        extra = sorted(trained.keys() - start.keys())
        raise ValueError(f"update does not match the model: missing {missing}, extra {extra}")
    squares = 0.0
    for name in _floating_names(start):
        delta = trained[name].detach().to("cpu", torch.float64) - start[name].detach().to(
            "cpu", torch.float64
        )
        squares += float(delta.square().sum())
    return math.sqrt(squares)


def clip_update(
    trained: Mapping[str, torch.Tensor], start: Mapping[str, torch.Tensor], max_norm: float
) -> tuple[dict[str, torch.Tensor], float]:
    """``trained`` with its update (trained - start, floating entries only) scaled down to
    L2 norm ``max_norm`` when it is longer; returns the weights and the norm before.

    An update within the norm comes back as the very tensors given (bit for bit); integer
    buffers such as BatchNorm's ``num_batches_tracked`` always pass through unchanged.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm must be positive, got {max_norm}")
    norm = _update_norm(trained, start)
    if norm <= max_norm:
        return dict(trained), norm
    scale = max_norm / norm
    clipped: dict[str, torch.Tensor] = {}
    for name, tensor in trained.items():
        if not tensor.dtype.is_floating_point:
            clipped[name] = tensor
            continue
        origin = start[name].detach().to(tensor.device, tensor.dtype)
        clipped[name] = origin + (tensor.detach() - origin) * scale
    return clipped, norm


def add_gaussian_noise_(
    weights: Mapping[str, torch.Tensor], std: float, generator: torch.Generator | None
) -> None:
    """Add N(0, std²) independently to every coordinate of the floating tensors, in place.

    The noise is drawn on the CPU from ``generator`` (names in sorted order), so a seeded
    generator gives the same noise on any device. ``std == 0`` changes nothing at all.
    """
    if not (std >= 0 and math.isfinite(std)):
        raise ValueError(f"noise std must be a finite number >= 0, got {std}")
    if std == 0:
        return
    for name in sorted(_floating_names(weights)):
        tensor = weights[name]
        # float32 at least: half-precision draws would be visibly coarse.
        draw_dtype = torch.promote_types(tensor.dtype, torch.float32)
        noise = torch.randn(tensor.shape, generator=generator, dtype=draw_dtype)
        tensor.add_(noise.mul_(std).to(tensor.device, tensor.dtype))


def epsilon_spent(
    *, noise_multiplier: float, sample_rate: float, steps: int, delta: float
) -> float:
    """ε of (ε, δ)-DP after ``steps`` subsampled Gaussian steps (Opacus's RDP accountant).

    For client-level DP-FedAvg: ``sample_rate`` = clients per round / pool, one step per
    round, ``noise_multiplier`` z. No noise gives no guarantee: ``math.inf``.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not 0 < sample_rate <= 1:
        raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
        raise ValueError(f"steps must be an integer >= 0, got {steps!r}")
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}")
    if steps == 0:
        return 0.0
    if noise_multiplier == 0:
        return math.inf
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    # The history Opacus builds from `steps` identical step() calls, in one entry.
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    with warnings.catch_warnings():
        # Opacus warns when the best order is at the end of its range: the ε is then a
        # valid but loose bound (it happens for large ε, where privacy is weak anyway).
        warnings.simplefilter("ignore", UserWarning)
        return float(accountant.get_epsilon(delta))


def server_noise_std(*, noise_multiplier: float, clip_norm: float, num_clients: int) -> float:
    """Std of the noise the server adds to the average of ``num_clients`` clipped updates:
    z·C on their sum, divided by the count like the sum itself."""
    return noise_multiplier * clip_norm / num_clients


def client_noise_std(*, noise_multiplier: float, clip_norm: float, expected_clients: int) -> float:
    """Std of the noise each client adds to its own clipped update when the noise is added
    at the clients: z·C/√m for m expected clients, so that the m independent noises sum to
    std z·C, the noise the server would have added to the sum (exactly when m clients
    report; the accountant assumes it)."""
    return noise_multiplier * clip_norm / math.sqrt(expected_clients)


def server_noise_generator(seed: int, round_number: int) -> torch.Generator:
    """The generator of a round's server-side noise: from the experiment's seed and the
    round, so that an aggregation run again adds the same noise."""
    return torch.Generator().manual_seed(derive_seed(seed, _SERVER_NOISE_STREAM, round_number))


def _has_default_sampling(data_loader: DataLoader[Any]) -> bool:
    return isinstance(data_loader.sampler, SequentialSampler | RandomSampler) and isinstance(
        data_loader.batch_sampler, BatchSampler
    )


def dp_sgd_problem(model: nn.Module) -> str | None:
    """Why Opacus cannot train ``model`` with per-sample DP-SGD, or None when it can."""
    from opacus.validators import ModuleValidator

    problems = ModuleValidator.validate(model, strict=False)
    if not problems:
        return None
    # Opacus explains each problem at length; its first sentence names it.
    reasons = "; ".join(sorted({str(problem).split(".")[0] for problem in problems}))
    return (
        f"this network cannot be trained with per-sample DP-SGD ({reasons}); choose a "
        "network without batch normalization, such as cnn-small"
    )


def make_private_training(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: DataLoader[Any],
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    noise_generator: torch.Generator | None = None,
) -> tuple[nn.Module, torch.optim.Optimizer, DataLoader[Any], PrivacyEngine]:
    """DP-SGD for one client's local training, through ``opacus.PrivacyEngine``.

    Returns the model wrapped to compute per-sample gradients (train through it; the
    original ``model`` holds the same parameters and keeps its state_dict names), the
    optimizer that clips each sample's gradient to ``max_grad_norm`` and adds noise of std
    ``noise_multiplier * max_grad_norm``, the data loader that draws Poisson batches, and
    the engine: ``engine.get_epsilon(delta)`` is the local ε after training.

    In-place activations of ``model`` are switched to out-of-place (Opacus's hooks need it).
    ``data_loader.dataset`` must be this client's data alone (a ``torch.utils.data.Subset``
    of a shared dataset, for instance), with the default sampler: Poisson sampling draws
    from the whole dataset and ignores any custom sampler, which would otherwise train on
    other sites' samples.
    """
    if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
        raise ValueError(f"noise_multiplier must be a finite number >= 0, got {noise_multiplier}")
    if not (max_grad_norm > 0 and math.isfinite(max_grad_norm)):
        raise ValueError(f"max_grad_norm must be a positive number, got {max_grad_norm}")
    if not _has_default_sampling(data_loader):
        raise ValueError(
            "DP-SGD samples from the data loader's whole dataset: give it a loader over this "
            "client's samples only (a Subset) with the default sampler"
        )
    problem = dp_sgd_problem(model)
    if problem is not None:
        raise ValueError(problem)
    # Opacus's backward hooks cannot see through in-place activations (autograd refuses
    # them on the hooks' views); turning them off changes neither the weights nor results.
    for module in model.modules():
        if getattr(module, "inplace", False):
            setattr(module, "inplace", False)  # noqa: B010 - nn.Module types its attributes as tensors
    with warnings.catch_warnings():
        # Its reminder that secure_mode is off: the noise need not resist an attack on the
        # random generator here (secure_mode needs torchcsprng, and seeded runs repeat).
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        from opacus import PrivacyEngine

        engine = PrivacyEngine(accountant="rdp")
    private_model, private_optimizer, private_loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=data_loader,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        noise_generator=noise_generator,
    )
    return private_model, private_optimizer, private_loader, engine


class DifferentiallyPrivate(Strategy):
    """Client-level DP-FedAvg around any strategy (McMahan et al. 2018, arXiv:1710.06963).

    Each update's delta from the round's global weights is clipped to ``clip_norm`` before
    the inner strategy sees it; after the inner strategy aggregated, Gaussian noise of std
    ``noise_multiplier * clip_norm / m`` (m: the clients of the round) is added to every
    floating entry of the result.

    The estimator: with uniform weighting and FedAvg, the result is (1/m)·Σ clipped deltas
    + N(0, (z·C/m)²), McMahan's fixed-denominator estimator with the round's actual count m
    in place of the expected count q·N; the sum has sensitivity C, so each round is the
    subsampled Gaussian mechanism with multiplier z that :func:`epsilon_spent` accounts.
    With sample weighting one site moves the mean by up to C·(its share of the samples),
    more than C/m for a large site, and the accounted ε is then optimistic for that site.
    Strategies that transform the mean non-linearly (FedAdam's step, the median, Krum) get
    their result noised, not their input: the noise level is the same but the guarantee is
    only argued for averaging.

    ``noise_at="client"``: each client clips its own update and adds noise of std
    z·C/√(expected_clients) (see :func:`client_noise_std`), asked through its options; the
    server adds none and clips only defensively, at C plus a bound the norm of an honest
    client's noise stays under (the noise is far longer than C in a model of any size, so
    clipping noised updates at C would shrink them all).

    Without clipping and with no noise the wrapper hands every update to the inner strategy
    untouched: the result is the inner strategy's, bit for bit. ``local_dp_sgd`` (a dict with
    ``noise_multiplier``, ``max_grad_norm`` and ``delta``) is passed to the clients as their
    ``dp_sgd`` option for DP-SGD in their local training; it changes nothing at the server.
    """

    name: ClassVar[str] = "dp"
    title: ClassVar[str] = "Client-level differential privacy"
    paper: ClassVar[str] = "McMahan et al. 2018, arXiv:1710.06963"
    description: ClassVar[str] = (
        "Clips each client's update and adds Gaussian noise around another strategy."
    )

    def __init__(
        self,
        inner: Strategy,
        *,
        clip_norm: float | None,
        noise_multiplier: float,
        generator: torch.Generator | None = None,
        noise_at: str = "server",
        expected_clients: int | None = None,
        local_dp_sgd: Mapping[str, float] | None = None,
    ) -> None:
        super().__init__(weighting=inner.weighting)
        params = self.validate_params(
            {
                "clip_norm": clip_norm,
                "noise_multiplier": noise_multiplier,
                "noise_at": noise_at,
                "expected_clients": expected_clients,
            }
        )
        self.inner = inner
        self.clip_norm: float | None = params["clip_norm"]
        self.noise_multiplier: float = params["noise_multiplier"]
        self.noise_at: str = params["noise_at"]
        self.expected_clients: int | None = params["expected_clients"]
        self.generator = generator
        self.local_dp_sgd = dict(local_dp_sgd) if local_dp_sgd else None
        self._start_weights: dict[str, torch.Tensor] = {}
        self._extras: Mapping[str, Any] = {}
        self._norms: list[float] = []
        self._clipped = 0

    @classmethod
    def validate_params(cls, params: Mapping[str, Any]) -> dict[str, Any]:
        """The wrapper's own settings (not user strategy parameters: the experiment's DP
        fields set them), checked; ValueError says which is wrong."""
        clip_norm = params.get("clip_norm")
        noise_multiplier = params.get("noise_multiplier", 0.0)
        noise_at = params.get("noise_at", "server")
        expected_clients = params.get("expected_clients")
        if clip_norm is not None and not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"dp clip norm must be a positive number, got {clip_norm}")
        if not (noise_multiplier >= 0 and math.isfinite(noise_multiplier)):
            raise ValueError(f"dp noise multiplier must be >= 0, got {noise_multiplier}")
        if noise_multiplier > 0 and clip_norm is None:
            raise ValueError("dp noise needs a clip norm: the noise is calibrated to it")
        if noise_at not in NOISE_LOCATIONS:
            raise ValueError(f"dp noise is added at one of {NOISE_LOCATIONS}, not {noise_at!r}")
        if noise_at == "client" and noise_multiplier > 0 and not expected_clients:
            raise ValueError("noise at the clients needs the expected number of clients")
        return {
            "clip_norm": None if clip_norm is None else float(clip_norm),
            "noise_multiplier": float(noise_multiplier),
            "noise_at": noise_at,
            "expected_clients": expected_clients,
        }

    def _client_noise_std(self) -> float:
        # validate_params demands a clip norm and the expected clients with client noise.
        if (
            self.noise_at != "client"
            or self.noise_multiplier == 0
            or self.clip_norm is None
            or self.expected_clients is None
        ):
            return 0.0
        return client_noise_std(
            noise_multiplier=self.noise_multiplier,
            clip_norm=self.clip_norm,
            expected_clients=self.expected_clients,
        )

    def configure_client(self, *, round_number: int, site: str) -> dict[str, Any]:
        options = dict(self.inner.configure_client(round_number=round_number, site=site))
        if self.noise_at == "client" and self.clip_norm is not None:
            options["dp_clip"] = self.clip_norm
            options["dp_noise_std"] = self._client_noise_std()
        if self.local_dp_sgd:
            options["dp_sgd"] = dict(self.local_dp_sgd)
        return options

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.inner.state_dict()

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.inner.load_state_dict(state)

    def client_payload(self) -> dict[str, torch.Tensor]:
        return self.inner.client_payload()

    def _server_clip_norm(self) -> float | None:
        """The norm the server clips each update to (None: no clipping)."""
        if self.clip_norm is None or self.noise_at == "server":
            return self.clip_norm
        coordinates = sum(tensor.numel() for tensor in self._start_weights.values())
        # ||N(0, s² I_d)|| concentrates at s·√d with a spread of about s/√2: an honest
        # client's noise exceeds s·(√d + 6) with probability below e^-36.
        return self.clip_norm + self._client_noise_std() * (math.sqrt(coordinates) + 6)

    def _start(self, global_weights: Mapping[str, torch.Tensor]) -> None:
        self._start_weights = (
            {
                name: global_weights[name].detach().to("cpu", copy=True)
                for name in _floating_names(global_weights)
            }
            if self.clip_norm is not None
            else {}
        )
        self._norms = []
        self._clipped = 0
        self.inner.begin_round(global_weights)

    def _receive_extras(self, extras: Mapping[str, Any], num_samples: int) -> None:
        # The base class hands a client's extras over just before its weights (_add).
        self._extras = extras

    def _add(self, update: Mapping[str, torch.Tensor], num_samples: int) -> None:
        # The metrics are averaged by this wrapper's base class, exactly as the inner one would.
        self.inner.accumulate(
            self._clipped_update(update), num_samples=num_samples, extras=self._extras
        )

    def _clipped_update(self, update: Mapping[str, torch.Tensor]) -> Mapping[str, torch.Tensor]:
        max_norm = self._server_clip_norm()
        if max_norm is None:
            return update
        floating = {name: update[name] for name in self._start_weights}
        clipped, norm = clip_update(floating, self._start_weights, max_norm)
        self._norms.append(norm)
        self._clipped += norm > max_norm
        return {**update, **clipped}

    def _aggregate(self) -> dict[str, torch.Tensor]:
        new_weights = self.inner.finish_round()
        # The inner strategy's own figures (Krum's choice, say) beside the clients' means.
        self.round_metrics = {**self.inner.round_metrics, **self.round_metrics}
        if self._norms:
            self.round_metrics["dp_update_norm_median"] = float(np.median(self._norms))
            self.round_metrics["dp_clipped_fraction"] = self._clipped / len(self._norms)
        # validate_params demands a clip norm with noise.
        if self.noise_at == "server" and self.noise_multiplier > 0 and self.clip_norm is not None:
            std = server_noise_std(
                noise_multiplier=self.noise_multiplier,
                clip_norm=self.clip_norm,
                num_clients=self.num_updates,
            )
            add_gaussian_noise_(new_weights, std, self.generator)
            self.round_metrics["dp_noise_std"] = std
        return new_weights
