"""Each strategy's server step against the paper's equations, written here in numpy.

The updates are random client weights around the global ones; every reference below
recomputes the new global weights (and the carried state) from the equations alone and
compares with what the strategy returns.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import pytest
import torch
from torch import nn

from training.fl.strategies import (
    FedAvg,
    Strategy,
    StrategyContext,
    batch_norm_parameters,
    build_strategy,
)
from training.fl.weights import load_weights, weights_to_bytes

Weights = dict[str, torch.Tensor]
Arrays = dict[str, np.ndarray]
SHAPES = {"conv.weight": (3, 2), "conv.bias": (3,)}


def random_weights(rng: np.random.Generator, scale: float = 1.0) -> Weights:
    return {
        name: torch.from_numpy(rng.normal(0, scale, shape).astype(np.float32))
        for name, shape in SHAPES.items()
    }


def arrays(weights: Mapping[str, torch.Tensor]) -> Arrays:
    return {name: t.numpy().astype(np.float64) for name, t in weights.items()}


def clients_around(rng: np.random.Generator, global_weights: Weights, count: int) -> list[Weights]:
    return [
        {name: t + torch.from_numpy(rng.normal(0, 0.3, t.shape).astype(np.float32))
         for name, t in global_weights.items()}
        for _ in range(count)
    ]  # fmt: skip


def aggregate(
    strategy: Strategy,
    global_weights: Weights,
    updates: Sequence[Weights],
    samples: Sequence[int],
    extras: Sequence[Mapping[str, object]] | None = None,
) -> Weights:
    strategy.begin_round(global_weights)
    for index, (update, num_samples) in enumerate(zip(updates, samples, strict=True)):
        strategy.accumulate(
            update, num_samples=num_samples, extras=extras[index] if extras else None
        )
    return strategy.finish_round()


def assert_matches(result: Mapping[str, torch.Tensor], expected: Arrays) -> None:
    assert result.keys() == expected.keys()
    for name, array in expected.items():
        np.testing.assert_allclose(result[name].numpy(), array, rtol=1e-5, atol=1e-6)


def through_safetensors(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state as the model store gives it back to the next round's aggregation."""
    return dict(load_weights(weights_to_bytes(state)))


def sample_mean(updates: Sequence[Weights], samples: Sequence[int]) -> Arrays:
    return {
        name: np.average(np.stack([arrays(u)[name] for u in updates]), axis=0, weights=samples)
        for name in SHAPES
    }


# FedAvg and its weighting


def test_fedavg_weighs_updates_by_samples_or_uniformly() -> None:
    rng = np.random.default_rng(0)
    global_weights = random_weights(rng)
    updates = clients_around(rng, global_weights, 3)
    samples = [10, 30, 60]

    by_samples = aggregate(build_strategy("fedavg"), global_weights, updates, samples)
    uniform = aggregate(
        build_strategy("fedavg", weighting="uniform"), global_weights, updates, samples
    )

    assert_matches(by_samples, sample_mean(updates, samples))
    assert_matches(uniform, {n: np.mean([arrays(u)[n] for u in updates], axis=0) for n in SHAPES})
    assert not np.allclose(by_samples["conv.bias"].numpy(), uniform["conv.bias"].numpy())


def test_an_unknown_weighting_is_refused() -> None:
    with pytest.raises(ValueError, match=r"weighting must be one of \['samples', 'uniform'\]"):
        build_strategy("fedavg", weighting="by-size")


# FedAvgM: Hsu et al. 2019


def test_fedavgm_applies_server_momentum_to_the_pseudo_gradient_over_rounds() -> None:
    rng = np.random.default_rng(1)
    learning_rate, momentum = 0.7, 0.9
    strategy = build_strategy(
        "fedavgm", server_learning_rate=learning_rate, server_momentum=momentum
    )
    global_weights = random_weights(rng)
    x = arrays(global_weights)
    v = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for round_index in range(3):
        updates, samples = clients_around(rng, global_weights, 3), [5, 7, 11]
        if round_index == 1:  # the next round may run in another process
            saved = through_safetensors(strategy.state_dict())
            strategy = build_strategy(
                "fedavgm", server_learning_rate=learning_rate, server_momentum=momentum
            )
            strategy.load_state_dict(saved)
        result = aggregate(strategy, global_weights, updates, samples)
        mean = sample_mean(updates, samples)
        for name in SHAPES:
            v[name] = momentum * v[name] + (x[name] - mean[name])
            x[name] = x[name] - learning_rate * v[name]
        assert_matches(result, x)
        global_weights = result
    assert_matches({k.removeprefix("momentum."): t for k, t in strategy.state_dict().items()}, v)


# FedAdam, FedYogi, FedAdagrad: Reddi et al. 2021, Algorithm 2


def reference_second_moment(
    variant: str, v: np.ndarray, delta: np.ndarray, beta_2: float
) -> np.ndarray:
    if variant == "fedadam":
        return beta_2 * v + (1 - beta_2) * delta**2
    if variant == "fedyogi":
        return v - (1 - beta_2) * delta**2 * np.sign(v - delta**2)
    return v + delta**2


@pytest.mark.parametrize(
    ("variant", "params"),
    [
        ("fedadam", {"server_learning_rate": 0.05, "beta_1": 0.9, "beta_2": 0.99, "tau": 1e-2}),
        ("fedyogi", {"server_learning_rate": 0.05, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2}),
        ("fedadagrad", {"server_learning_rate": 0.1, "beta_1": 0.5, "tau": 1e-2}),
    ],
)
def test_adaptive_server_step_follows_reddi_et_al_over_three_rounds_with_state_carried(
    variant: str, params: dict[str, float]
) -> None:
    rng = np.random.default_rng(2)
    strategy = build_strategy(variant, **params)
    eta, beta_1, tau = params["server_learning_rate"], params["beta_1"], params["tau"]
    beta_2 = params.get("beta_2", 0.0)
    global_weights = random_weights(rng)
    x = arrays(global_weights)
    m = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    v = {name: np.full(shape, tau**2) for name, shape in SHAPES.items()}
    for round_index in range(3):
        updates, samples = clients_around(rng, global_weights, 4), [3, 9, 4, 20]
        if round_index > 0:  # a fresh strategy each round, as in another worker process
            saved = through_safetensors(strategy.state_dict())
            strategy = build_strategy(variant, **params)
            strategy.load_state_dict(saved)
        result = aggregate(strategy, global_weights, updates, samples)
        mean = sample_mean(updates, samples)
        for name in SHAPES:
            delta = mean[name] - x[name]
            m[name] = beta_1 * m[name] + (1 - beta_1) * delta
            v[name] = reference_second_moment(variant, v[name], delta, beta_2)
            x[name] = x[name] + eta * m[name] / (np.sqrt(v[name]) + tau)
        assert_matches(result, x)
        global_weights = result
    state = strategy.state_dict()
    assert int(state["rounds"]) == 3
    assert_matches({n: state[f"m.{n}"] for n in SHAPES}, m)
    assert_matches({n: state[f"v.{n}"] for n in SHAPES}, v)


def test_yogi_second_moment_differs_from_adams_when_it_shrinks() -> None:
    # Given the same rounds under both, the update of v differs (else the test above could
    # pass for a Yogi that is secretly Adam)
    rng = np.random.default_rng(3)
    global_weights = random_weights(rng)
    rounds = [clients_around(rng, global_weights, 2) for _ in range(2)]
    finals = {}
    for variant in ("fedadam", "fedyogi"):
        strategy, weights = build_strategy(variant), global_weights
        for updates in rounds:
            weights = aggregate(strategy, weights, updates, [1, 1])
        finals[variant] = strategy.state_dict()["v.conv.weight"]
    assert not torch.allclose(finals["fedadam"], finals["fedyogi"])


def test_saved_state_for_another_network_is_refused() -> None:
    rng = np.random.default_rng(4)
    strategy = build_strategy("fedadam")
    strategy.load_state_dict(
        {"m.conv.weight": torch.zeros(5), "v.conv.weight": torch.ones(5), "rounds": torch.tensor(1)}
    )
    with pytest.raises(ValueError, match=r"saved state for 'conv\.weight' does not match"):
        strategy.begin_round(random_weights(rng))


def test_a_stateless_strategy_refuses_state() -> None:
    with pytest.raises(ValueError, match="keeps no state"):
        build_strategy("fedmedian").load_state_dict({"m.w": torch.zeros(1)})


# FedProx: Li et al. 2020


@pytest.mark.parametrize("mu", [0.0, 0.5])
def test_fedprox_server_equals_fedavg_to_the_bit_and_asks_clients_for_the_proximal_term(
    mu: float,
) -> None:
    rng = np.random.default_rng(5)
    global_weights = random_weights(rng)
    updates, samples = clients_around(rng, global_weights, 5), [3, 1, 4, 1, 5]
    fedprox = build_strategy("fedprox", mu=mu)

    proximal = aggregate(fedprox, global_weights, updates, samples)
    averaged = aggregate(FedAvg(), global_weights, updates, samples)

    for name in SHAPES:
        assert torch.equal(proximal[name], averaged[name])
    assert fedprox.configure_client(round_number=1, site="a") == {"proximal_mu": mu}


# SCAFFOLD: Karimireddy et al. 2020, option II


def test_scaffold_updates_the_server_control_variate_from_weights_and_extras() -> None:
    rng = np.random.default_rng(6)
    pool, eta_g = 5, 0.8
    context = StrategyContext(num_sites=pool)
    strategy = build_strategy("scaffold", context=context, server_learning_rate=eta_g)
    assert strategy.configure_client(round_number=1, site="a") == {"scaffold": True}
    assert strategy.client_payload() == {}  # round 1: clients take c = 0
    global_weights = random_weights(rng)
    x = arrays(global_weights)
    c = {name: np.zeros(shape) for name, shape in SHAPES.items()}
    for round_index in range(2):
        updates, samples = clients_around(rng, global_weights, 3), [4, 8, 12]
        extras = [
            {"local_steps": k, "learning_rate": lr} for k, lr in [(5, 0.1), (7, 0.05), (2, 0.2)]
        ]
        if round_index == 1:
            saved = through_safetensors(strategy.state_dict())
            strategy = build_strategy("scaffold", context=context, server_learning_rate=eta_g)
            strategy.load_state_dict(saved)
        result = aggregate(strategy, global_weights, updates, samples, extras)
        mean = sample_mean(updates, samples)
        for name in SHAPES:
            deltas = [
                -c[name] + (x[name] - arrays(y)[name]) / (e["local_steps"] * e["learning_rate"])
                for y, e in zip(updates, extras, strict=True)
            ]
            c[name] = c[name] + (len(updates) / pool) * np.mean(deltas, axis=0)
            x[name] = x[name] + eta_g * (mean[name] - x[name])
        assert_matches(result, x)
        assert_matches(strategy.client_payload(), c)
        global_weights = result
    assert int(strategy.state_dict()["rounds"]) == 2


def test_scaffold_refuses_a_client_that_did_not_report_its_steps() -> None:
    rng = np.random.default_rng(7)
    strategy = build_strategy("scaffold", context=StrategyContext(num_sites=2))
    global_weights = random_weights(rng)
    strategy.begin_round(global_weights)
    with pytest.raises(ValueError, match="scaffold needs the client's local_steps"):
        strategy.accumulate(global_weights, num_samples=3, extras={})


def test_scaffold_needs_the_pool_size() -> None:
    with pytest.raises(ValueError, match="number of sites"):
        build_strategy("scaffold")


# FedBN: Li et al. 2021


def small_batch_norm_network() -> nn.Module:
    return nn.Sequential(nn.Conv2d(1, 2, 3), nn.BatchNorm2d(2), nn.ReLU(), nn.Flatten())


def test_batch_norm_parameters_are_every_entry_of_the_batch_norm_layers() -> None:
    assert batch_norm_parameters(small_batch_norm_network()) == [
        "1.weight", "1.bias", "1.running_mean", "1.running_var", "1.num_batches_tracked",
    ]  # fmt: skip


def test_fedbn_keeps_batch_norm_entries_at_their_global_values_and_averages_the_rest() -> None:
    network = small_batch_norm_network()
    local = batch_norm_parameters(network)
    strategy = build_strategy(
        "fedbn", context=StrategyContext(batch_norm_parameters=local), weighting="uniform"
    )
    global_weights = {n: t.clone() for n, t in network.state_dict().items()}
    updates = []
    for seed in range(3):
        generator = torch.Generator().manual_seed(seed)
        updates.append(
            {
                n: t + torch.randn(t.shape, generator=generator) if t.is_floating_point() else t + 1
                for n, t in global_weights.items()
            }
        )

    result = aggregate(strategy, global_weights, updates, [1, 2, 3])

    for name in local:
        assert torch.equal(result[name], global_weights[name])
    for name in ("0.weight", "0.bias"):
        expected = np.mean([u[name].numpy().astype(np.float64) for u in updates], axis=0)
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-5, atol=1e-6)
    assert strategy.configure_client(round_number=1, site="a") == {"local_parameters": local}


def test_fedbn_refuses_local_parameters_the_model_does_not_have() -> None:
    strategy = build_strategy("fedbn", context=StrategyContext(batch_norm_parameters=["bn.x"]))
    with pytest.raises(ValueError, match=r"local parameters \['bn.x'\] are not weights"):
        strategy.begin_round(random_weights(np.random.default_rng(8)))


# Median, trimmed mean, Krum, Multi-Krum


def stacked(updates: Sequence[Weights], name: str) -> np.ndarray:
    return np.stack([arrays(u)[name] for u in updates])


def reference_krum_scores(updates: Sequence[Weights], f: int) -> np.ndarray:
    vectors = np.stack([np.concatenate([arrays(u)[n].ravel() for n in SHAPES]) for u in updates])
    count = len(vectors)
    scores = []
    for i in range(count):
        distances = sorted(
            float(np.sum((vectors[i] - vectors[j]) ** 2)) for j in range(count) if j != i
        )
        scores.append(sum(distances[: count - f - 2]))
    return np.array(scores)


def poisoned_round(rng: np.random.Generator) -> tuple[Weights, list[Weights]]:
    global_weights = random_weights(rng)
    updates = clients_around(rng, global_weights, 7)
    updates[2] = {n: t * 50 for n, t in updates[2].items()}
    return global_weights, updates


def test_fedmedian_takes_the_coordinate_wise_median() -> None:
    global_weights, updates = poisoned_round(np.random.default_rng(9))
    result = aggregate(build_strategy("fedmedian"), global_weights, updates, [1] * 6 + [100])
    assert_matches(result, {n: np.median(stacked(updates, n), axis=0) for n in SHAPES})


def test_fedtrimmedavg_drops_the_extremes_of_each_coordinate() -> None:
    global_weights, updates = poisoned_round(np.random.default_rng(10))
    result = aggregate(build_strategy("fedtrimmedavg", beta=0.3), global_weights, updates, [1] * 7)
    trimmed = int(0.3 * 7)
    expected = {
        n: np.sort(stacked(updates, n), axis=0)[trimmed : 7 - trimmed].mean(axis=0) for n in SHAPES
    }
    assert_matches(result, expected)


def test_krum_selects_the_update_with_the_lowest_score() -> None:
    global_weights, updates = poisoned_round(np.random.default_rng(11))
    strategy = build_strategy("krum", f=2)

    result = aggregate(strategy, global_weights, updates, [1] * 7)

    best = int(np.argmin(reference_krum_scores(updates, 2)))
    assert strategy.selected == [best]
    assert_matches(result, arrays(updates[best]))


@pytest.mark.parametrize("weighting", ["samples", "uniform"])
def test_multikrum_averages_the_m_best_scored_updates(weighting: str) -> None:
    global_weights, updates = poisoned_round(np.random.default_rng(12))
    samples = [5, 1, 2, 8, 3, 4, 9]
    strategy = build_strategy("multikrum", f=1, m=3, weighting=weighting)

    result = aggregate(strategy, global_weights, updates, samples)

    best = list(np.argsort(reference_krum_scores(updates, 1), kind="stable")[:3])
    assert 2 not in best  # the poisoned update is never among them
    assert strategy.selected == best
    weights = [samples[i] if weighting == "samples" else 1 for i in best]
    expected = {
        n: np.average(stacked([updates[i] for i in best], n), axis=0, weights=weights)
        for n in SHAPES
    }
    assert_matches(result, expected)


def test_multikrum_with_m_zero_averages_n_minus_f() -> None:
    global_weights, updates = poisoned_round(np.random.default_rng(13))
    strategy = build_strategy("multikrum", f=2)
    aggregate(strategy, global_weights, updates, [1] * 7)
    assert len(strategy.selected) == 5


def test_krum_says_how_many_updates_its_f_needs() -> None:
    rng = np.random.default_rng(14)
    global_weights = random_weights(rng)
    with pytest.raises(ValueError, match="krum with f=1 needs at least 5 client updates, got 4"):
        aggregate(
            build_strategy("krum"), global_weights, clients_around(rng, global_weights, 4), [1] * 4
        )


@pytest.mark.parametrize("name", ["fedmedian", "fedtrimmedavg", "krum", "multikrum"])
def test_robust_strategies_keep_the_largest_integer_buffer(name: str) -> None:
    rng = np.random.default_rng(15)
    global_weights = {**random_weights(rng), "bn.num_batches_tracked": torch.tensor(4)}
    updates = [
        {**u, "bn.num_batches_tracked": torch.tensor(4 + i)}
        for i, u in enumerate(clients_around(rng, random_weights(rng), 5))
    ]
    result = aggregate(build_strategy(name), global_weights, updates, [1] * 5)
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert int(result["bn.num_batches_tracked"]) == 8


def test_every_averaging_strategy_honours_uniform_weighting() -> None:
    # One update with many samples: sample weighting pulls the mean to it, uniform does not.
    rng = np.random.default_rng(16)
    global_weights = random_weights(rng)
    updates, samples = clients_around(rng, global_weights, 3), [1, 1, 1000]
    uniform = {n: np.mean(stacked(updates, n), axis=0) for n in SHAPES}
    contexts: dict[str, Callable[[], StrategyContext]] = {
        "scaffold": lambda: StrategyContext(num_sites=3),
        "fedbn": lambda: StrategyContext(batch_norm_parameters=[]),
    }
    extras = [{"local_steps": 1, "learning_rate": 0.1}] * 3
    for name in ("fedavg", "fedprox", "scaffold", "fedbn"):
        context = contexts.get(name, StrategyContext)()
        result = aggregate(
            build_strategy(name, weighting="uniform", context=context),
            global_weights, updates, samples, extras,
        )  # fmt: skip
        assert_matches(result, uniform)
