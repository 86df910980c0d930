"""Differential privacy: accounting, clipping, noise, the DP-FedAvg wrapper and DP-SGD."""

import math

import numpy as np
import pytest
import torch
from opacus.accountants import RDPAccountant
from torch.utils.data import DataLoader, Subset, TensorDataset

from training.fl.networks import build_network
from training.fl.privacy import (
    DifferentiallyPrivate,
    add_gaussian_noise_,
    client_noise_std,
    clip_update,
    epsilon_spent,
    make_private_training,
    server_noise_generator,
)
from training.fl.strategies import FedAvg, Strategy

DELTA = 1e-5


def random_weights(rng: np.random.Generator, scale: float = 1.0) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.from_numpy((scale * rng.normal(size=(8, 1, 3, 3))).astype(np.float32)),
        "fc.bias": torch.from_numpy((scale * rng.normal(size=(4,))).astype(np.float32)),
        "bn.num_batches_tracked": torch.tensor(int(rng.integers(0, 100))),
    }


def flat_delta(trained: dict[str, torch.Tensor], start: dict[str, torch.Tensor]) -> np.ndarray:
    return np.concatenate(
        [
            (trained[name].double() - start[name].double()).numpy().ravel()
            for name in ("conv.weight", "fc.bias")
        ]
    )


def run_round(
    strategy: Strategy, start: dict[str, torch.Tensor], updates: list[dict[str, torch.Tensor]]
) -> dict[str, torch.Tensor]:
    strategy.begin_round(start)
    for number, update in enumerate(updates):
        strategy.accumulate(update, num_samples=10 + 7 * number, metrics={"loss": 1.0 + number})
    return strategy.finish_round()


# --- Accounting ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sample_rate", "noise_multiplier", "steps"),
    [(0.1, 1.1, 50), (0.5, 0.8, 20), (1.0, 2.0, 10), (0.01, 0.6, 300)],
)
def test_epsilon_equals_opacus_accountant_stepped_once_per_round(
    sample_rate: float, noise_multiplier: float, steps: int
) -> None:
    # Given Opacus's RDP accountant stepped once per round, as a training loop would
    accountant = RDPAccountant()
    for _ in range(steps):
        accountant.step(noise_multiplier=noise_multiplier, sample_rate=sample_rate)
    # When FedLens computes ε for the same settings
    epsilon = epsilon_spent(
        noise_multiplier=noise_multiplier, sample_rate=sample_rate, steps=steps, delta=DELTA
    )
    # Then both agree
    assert epsilon == pytest.approx(accountant.get_epsilon(DELTA), rel=1e-12)
    assert 0 < epsilon < math.inf


@pytest.mark.parametrize(("noise_multiplier", "steps"), [(1.0, 1), (2.0, 10), (5.0, 100)])
def test_epsilon_with_every_client_each_round_equals_the_gaussian_mechanism_computed_here(
    noise_multiplier: float, steps: int
) -> None:
    # Given every site in every round (q = 1): T compositions of the Gaussian mechanism,
    # whose Rényi DP of order a is a / (2 z²) per step (Mironov 2017, Prop. 7), converted to
    # (ε, δ) as in Balle et al. 2020, Thm. 21, over the orders Opacus searches
    orders = np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float)
    rdp = steps * orders / (2 * noise_multiplier**2)
    expected = np.min(
        rdp - (np.log(DELTA) + np.log(orders)) / (orders - 1) + np.log((orders - 1) / orders)
    )
    # When FedLens accounts it
    epsilon = epsilon_spent(
        noise_multiplier=noise_multiplier, sample_rate=1.0, steps=steps, delta=DELTA
    )
    # Then it is the value computed independently
    assert epsilon == pytest.approx(expected, rel=1e-9)


def test_epsilon_grows_with_rounds_and_shrinks_with_noise() -> None:
    by_rounds = [
        epsilon_spent(noise_multiplier=1.0, sample_rate=0.2, steps=steps, delta=DELTA)
        for steps in (1, 2, 5, 10)
    ]
    by_noise = [
        epsilon_spent(noise_multiplier=z, sample_rate=0.2, steps=10, delta=DELTA)
        for z in (0.7, 1.0, 2.0)
    ]
    assert by_rounds == sorted(by_rounds) and len(set(by_rounds)) == 4
    assert by_noise == sorted(by_noise, reverse=True) and len(set(by_noise)) == 3


def test_epsilon_without_noise_is_infinite_and_before_any_round_zero() -> None:
    assert epsilon_spent(noise_multiplier=0.0, sample_rate=0.5, steps=3, delta=DELTA) == math.inf
    assert epsilon_spent(noise_multiplier=1.0, sample_rate=0.5, steps=0, delta=DELTA) == 0.0


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        ({"noise_multiplier": -1.0, "sample_rate": 0.5, "steps": 1, "delta": DELTA}, "noise"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.0, "steps": 1, "delta": DELTA}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 1.5, "steps": 1, "delta": DELTA}, "sample_rate"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": -1, "delta": DELTA}, "steps"),
        ({"noise_multiplier": 1.0, "sample_rate": 0.5, "steps": 1, "delta": 0.0}, "delta"),
    ],
)
def test_epsilon_refuses_settings_outside_their_range(arguments: dict, named: str) -> None:
    with pytest.raises(ValueError, match=named):
        epsilon_spent(**arguments)


# --- Clipping and noise --------------------------------------------------------------------


def test_clipping_scales_a_long_update_down_to_the_norm_in_its_direction() -> None:
    # Given an update much longer than the clipping norm
    rng = np.random.default_rng(0)
    start, trained = random_weights(rng), random_weights(rng, scale=5.0)
    norm_before = float(np.linalg.norm(flat_delta(trained, start)))
    assert norm_before > 10
    # When it is clipped to 1.5
    clipped, reported = clip_update(trained, start, 1.5)
    # Then its delta has norm 1.5, points the same way, and the integer buffer is untouched
    delta, original = flat_delta(clipped, start), flat_delta(trained, start)
    assert reported == pytest.approx(norm_before, rel=1e-12)
    assert np.linalg.norm(delta) == pytest.approx(1.5, rel=1e-5)
    np.testing.assert_allclose(delta, original * (1.5 / norm_before), rtol=1e-4, atol=1e-6)
    assert torch.equal(clipped["bn.num_batches_tracked"], trained["bn.num_batches_tracked"])


def test_clipping_leaves_an_update_within_the_norm_bit_for_bit() -> None:
    rng = np.random.default_rng(1)
    start = random_weights(rng)
    trained = {name: tensor.clone() for name, tensor in start.items()}
    trained["fc.bias"] += 0.01
    clipped, norm = clip_update(trained, start, 1.0)
    assert norm == pytest.approx(0.02, rel=1e-4)
    for name, tensor in trained.items():
        assert clipped[name] is tensor


def test_clipping_refuses_an_update_of_another_model() -> None:
    rng = np.random.default_rng(2)
    start = random_weights(rng)
    with pytest.raises(ValueError, match="missing"):
        clip_update({"fc.bias": start["fc.bias"]}, start, 1.0)


def test_noise_has_the_asked_standard_deviation_on_every_tensor() -> None:
    # Given zero weights with many coordinates
    weights = {"a": torch.zeros(200_000), "b": torch.zeros(300, 300, dtype=torch.float64)}
    weights["count"] = torch.tensor(7)
    # When noise of std 0.3 is added
    add_gaussian_noise_(weights, 0.3, torch.Generator().manual_seed(0))
    # Then each tensor's values have mean 0 and std 0.3 (the std of a sample of 90 000 is
    # within 1% of the truth far beyond 5 sigma), and integer buffers stay as they were
    for name in ("a", "b"):
        values = weights[name].double()
        assert float(values.std()) == pytest.approx(0.3, rel=0.01)
        assert abs(float(values.mean())) < 5 * 0.3 / math.sqrt(values.numel())
    assert int(weights["count"]) == 7


def test_noise_is_repeatable_from_the_seed_and_zero_noise_changes_nothing() -> None:
    first, second, untouched = (torch.ones(1000) for _ in range(3))
    add_gaussian_noise_({"w": first}, 0.1, server_noise_generator(seed=3, round_number=2))
    add_gaussian_noise_({"w": second}, 0.1, server_noise_generator(seed=3, round_number=2))
    other = torch.ones(1000)
    add_gaussian_noise_({"w": other}, 0.1, server_noise_generator(seed=3, round_number=3))
    add_gaussian_noise_({"w": untouched}, 0.0, torch.Generator().manual_seed(0))
    assert torch.equal(first, second)
    assert not torch.equal(first, other)
    assert torch.equal(untouched, torch.ones(1000))


# --- The DP-FedAvg wrapper -----------------------------------------------------------------


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_wrapper_without_clipping_or_noise_is_fedavg_bit_for_bit(weighting: str) -> None:
    rng = np.random.default_rng(3)
    start = random_weights(rng)
    updates = [random_weights(rng) for _ in range(4)]
    fedavg = FedAvg(weighting=weighting)
    plain = run_round(fedavg, start, updates)
    wrapped = DifferentiallyPrivate(
        FedAvg(weighting=weighting), clip_norm=None, noise_multiplier=0.0
    )
    private = run_round(wrapped, start, updates)
    assert private.keys() == plain.keys()
    for name, tensor in plain.items():
        assert private[name].dtype == tensor.dtype
        assert torch.equal(private[name], tensor)
    assert wrapped.round_metrics == fedavg.round_metrics


def test_wrapper_averages_the_clipped_updates_then_adds_noise_of_z_c_over_m() -> None:
    # Given four updates, two of them far longer than the norm, from a large model
    rng = np.random.default_rng(4)
    start = {"w": torch.zeros(400_000)}
    updates = [
        {"w": torch.from_numpy(rng.normal(scale=s / 632.0, size=400_000).astype(np.float32))}
        for s in (0.5, 8.0, 0.9, 30.0)
    ]
    clip, z, m = 2.0, 1.5, len(updates)
    # When the wrapper (uniform weighting, as DP-FedAvg's estimator) aggregates them
    strategy = DifferentiallyPrivate(
        FedAvg(weighting="uniform"),
        clip_norm=clip,
        noise_multiplier=z,
        generator=torch.Generator().manual_seed(0),
    )
    result = run_round(strategy, start, updates)["w"].double().numpy()
    # Then the result is the mean of the updates clipped here with numpy, plus noise whose
    # std is z * C / m (the residual's std is within 1% of it; without noise it would be 0)
    clipped = []
    for update in updates:
        delta = update["w"].double().numpy()
        clipped.append(delta * min(1.0, clip / np.linalg.norm(delta)))
    residual = result - np.mean(clipped, axis=0)
    assert residual.std() == pytest.approx(z * clip / m, rel=0.01)
    assert abs(residual.mean()) < 5 * (z * clip / m) / math.sqrt(residual.size)
    assert strategy.round_metrics["dp_clipped_fraction"] == 0.5
    assert strategy.round_metrics["dp_noise_std"] == pytest.approx(z * clip / m)


class ProximalFedAvg(FedAvg):
    """An inner strategy with client options of its own, to see that they are kept."""

    name = "proximal-fedavg"

    def configure_client(self, *, round_number: int, site: str) -> dict:
        return {"proximal_mu": 0.01}


def test_wrapper_keeps_the_inner_options_and_adds_the_clients_share_of_noise() -> None:
    strategy = DifferentiallyPrivate(
        ProximalFedAvg(),
        clip_norm=1.0,
        noise_multiplier=1.2,
        noise_at="client",
        expected_clients=4,
        local_dp_sgd={"noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": DELTA},
    )
    options = strategy.configure_client(round_number=1, site="a")
    assert options == {
        "proximal_mu": 0.01,
        "dp_clip": 1.0,
        # Four noises of std z*C/2 sum to one of std z*C, the server's noise on the sum.
        "dp_noise_std": pytest.approx(0.6),
        "dp_sgd": {"noise_multiplier": 0.8, "max_grad_norm": 1.0, "delta": DELTA},
    }
    assert client_noise_std(noise_multiplier=1.2, clip_norm=1.0, expected_clients=4) == 0.6


def test_server_noise_settings_send_the_clients_no_dp_options() -> None:
    strategy = DifferentiallyPrivate(FedAvg(), clip_norm=1.0, noise_multiplier=1.0)
    assert strategy.configure_client(round_number=1, site="a") == {}


def test_noise_at_the_clients_leaves_honest_noised_updates_whole_and_adds_none() -> None:
    # Given clients that clipped to C and added their share of the noise, and one that
    # sent an update far beyond both
    rng = np.random.default_rng(5)
    size, clip, z, m = 50_000, 1.0, 1.0, 3
    std = client_noise_std(noise_multiplier=z, clip_norm=clip, expected_clients=m)
    start = {"w": torch.zeros(size)}
    honest = [
        {"w": torch.from_numpy(rng.normal(scale=std, size=size).astype(np.float32))}
        for _ in range(m - 1)
    ]
    rogue = {"w": torch.full((size,), 10.0)}
    strategy = DifferentiallyPrivate(
        FedAvg(weighting="uniform"),
        clip_norm=clip,
        noise_multiplier=z,
        noise_at="client",
        expected_clients=m,
        generator=torch.Generator().manual_seed(0),
    )
    # When the server aggregates them
    result = run_round(strategy, start, [*honest, rogue])["w"].double().numpy()
    # Then the honest updates count whole, no noise is added, and the rogue one is cut to
    # the defensive bound C + s(√d + 6)
    bound = clip + std * (math.sqrt(size) + 6)
    rogue_clipped = rogue["w"].double().numpy() * (bound / (10.0 * math.sqrt(size)))
    expected = (sum(u["w"].double().numpy() for u in honest) + rogue_clipped) / m
    np.testing.assert_allclose(result, expected, rtol=1e-5, atol=1e-6)
    assert strategy.round_metrics["dp_clipped_fraction"] == pytest.approx(1 / 3)
    assert "dp_noise_std" not in strategy.round_metrics


def test_wrapper_passes_state_and_extras_through_to_the_inner_strategy() -> None:
    received: list[dict] = []

    class Recording(FedAvg):
        name = "recording"

        def _receive_extras(self, extras, num_samples: int) -> None:
            received.append(dict(extras))

    rng = np.random.default_rng(6)
    start = random_weights(rng)
    strategy = DifferentiallyPrivate(Recording(), clip_norm=1.0, noise_multiplier=0.0)
    strategy.begin_round(start)
    strategy.accumulate(random_weights(rng), num_samples=3, extras={"local_steps": 4})
    strategy.finish_round()
    assert received == [{"local_steps": 4}]
    assert strategy.state_dict() == {}


@pytest.mark.parametrize(
    ("arguments", "message"),
    [
        ({"clip_norm": None, "noise_multiplier": 1.0}, "needs a clip norm"),
        ({"clip_norm": 0.0, "noise_multiplier": 1.0}, "clip norm must be a positive"),
        ({"clip_norm": 1.0, "noise_multiplier": -0.5}, "noise multiplier"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "noise_at": "site"}, "added at one of"),
        ({"clip_norm": 1.0, "noise_multiplier": 1.0, "noise_at": "client"}, "expected number"),
    ],
)
def test_wrapper_refuses_settings_that_give_no_guarantee(arguments: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        DifferentiallyPrivate(FedAvg(), **arguments)


# --- Local DP-SGD --------------------------------------------------------------------------


def tiny_images(count: int = 96) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (count,), generator=generator)
    images = torch.randn(count, 1, 12, 12, generator=generator) + labels.view(-1, 1, 1, 1)
    return TensorDataset(images, labels)


def test_dp_sgd_trains_a_tiny_model_and_accounts_a_finite_epsilon() -> None:
    # Given a small CNN and this client's share of a shared dataset
    torch.manual_seed(0)
    model = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2, seed=0)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    loader = DataLoader(Subset(tiny_images(), range(64)), batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    # When it trains one epoch with DP-SGD
    private_model, private_optimizer, private_loader, engine = make_private_training(
        model, optimizer, loader, noise_multiplier=1.0, max_grad_norm=1.0
    )
    steps = 0
    for inputs, targets in private_loader:
        private_optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(private_model(inputs), targets)
        loss.backward()
        private_optimizer.step()
        steps += 1
    # Then the original module's weights (same names) moved, and the local ε is finite and
    # what the accountant gives for q = batch / samples over the steps taken
    assert model.state_dict().keys() == before.keys()
    assert any(not torch.equal(before[n], t) for n, t in model.state_dict().items())
    epsilon = engine.get_epsilon(DELTA)
    assert 0 < epsilon < math.inf
    assert epsilon == pytest.approx(
        epsilon_spent(noise_multiplier=1.0, sample_rate=16 / 64, steps=steps, delta=DELTA)
    )


def test_dp_sgd_refuses_batch_norm_networks_and_loaders_over_other_sites_data() -> None:
    data = tiny_images()
    resnet = build_network("resnet18-small", in_channels=1, num_classes=2, spatial_dims=2, seed=0)
    with pytest.raises(ValueError, match="BatchNorm"):
        make_private_training(
            resnet,
            torch.optim.SGD(resnet.parameters(), lr=0.1),
            DataLoader(data, batch_size=8),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
    cnn = build_network("cnn-small", in_channels=1, num_classes=2, spatial_dims=2, seed=0)
    with pytest.raises(ValueError, match="Subset"):
        make_private_training(
            cnn,
            torch.optim.SGD(cnn.parameters(), lr=0.1),
            DataLoader(data, batch_size=8, sampler=list(range(10))),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
        )
