"""Aggregation: FedAvg streaming, numeric kernels, and the strategy registry."""

import gc
import weakref

import numpy as np
import pytest
import torch

from training.fl.strategies import (
    FedAvg,
    available_strategies,
    build_strategy,
    validate_strategy_params,
)
from training.fl.strategies.kernels import (
    add_weighted_,
    coordinate_median,
    flatten_weights,
    krum_select,
    trimmed_mean,
    unflatten_weights,
    weighted_mean,
)


def random_update(rng: np.random.Generator) -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.from_numpy(rng.normal(size=(4, 1, 3, 3)).astype(np.float32)),
        "fc.bias": torch.from_numpy(rng.normal(size=(2,)).astype(np.float32)),
        "bn.num_batches_tracked": torch.tensor(int(rng.integers(0, 100))),
    }


def run_round(
    strategy: FedAvg, updates: list[dict[str, torch.Tensor]], counts: list[int]
) -> dict[str, torch.Tensor]:
    strategy.begin_round(updates[0])
    for update, count in zip(updates, counts, strict=True):
        strategy.accumulate(update, num_samples=count)
    return strategy.finish_round()


def test_fedavg_equals_the_sample_weighted_mean_computed_with_numpy() -> None:
    # Given five random client updates trained on different numbers of samples
    rng = np.random.default_rng(0)
    updates = [random_update(rng) for _ in range(5)]
    counts = [10, 250, 3, 77, 1000]
    # When FedAvg aggregates them one at a time
    result = run_round(FedAvg(), updates, counts)
    # Then each float tensor is the sample-weighted mean, in the original dtype
    for name in ("conv.weight", "fc.bias"):
        stacked = np.stack([u[name].numpy().astype(np.float64) for u in updates])
        expected = np.tensordot(np.array(counts, float), stacked, axes=1) / sum(counts)
        assert result[name].dtype == torch.float32
        np.testing.assert_allclose(result[name].numpy(), expected, rtol=1e-6, atol=1e-7)


def test_fedavg_keeps_the_largest_integer_buffer() -> None:
    rng = np.random.default_rng(1)
    updates = [random_update(rng) for _ in range(3)]
    result = run_round(FedAvg(), updates, [1, 1, 1])
    expected = max(int(u["bn.num_batches_tracked"]) for u in updates)
    assert result["bn.num_batches_tracked"].dtype == torch.int64
    assert int(result["bn.num_batches_tracked"]) == expected


def test_fedavg_of_updates_arriving_in_one_reused_set_of_tensors_equals_the_mean() -> None:
    # Given updates delivered as aggregation reads them: each into the previous one's tensors
    rng = np.random.default_rng(2)
    updates = [random_update(rng) for _ in range(4)]
    for counter, update in zip([7, 1, 2, 3], updates, strict=True):
        update["bn.num_batches_tracked"] = torch.tensor(counter)  # the first one is the largest
    expected = run_round(FedAvg(), updates, [1, 2, 3, 4])
    received = {name: torch.empty_like(tensor) for name, tensor in updates[0].items()}
    strategy = FedAvg()
    strategy.begin_round(updates[0])

    # When every update overwrites the same tensors before it is accumulated
    for update, count in zip(updates, [1, 2, 3, 4], strict=True):
        for name, tensor in update.items():
            received[name].copy_(tensor)
        strategy.accumulate(received, num_samples=count)
    result = strategy.finish_round()

    # Then nothing the strategy kept was overwritten: the result is the same
    for name, tensor in expected.items():
        assert torch.equal(result[name], tensor), name


def test_fedavg_streams_without_keeping_any_update() -> None:
    # Given a round in progress
    strategy = FedAvg()
    rng = np.random.default_rng(2)
    strategy.begin_round(random_update(rng))
    references = []
    for _ in range(3):
        update = random_update(rng)
        references.extend(weakref.ref(tensor) for tensor in update.values())
        strategy.accumulate(update, num_samples=5)
        del update
    gc.collect()
    # Then no accumulated tensor is still alive: the strategy kept only running sums
    assert all(reference() is None for reference in references)
    assert strategy.num_updates == 3
    assert not any(isinstance(value, list | tuple) for value in vars(strategy).values())


def test_fedavg_server_learning_rate_moves_part_of_the_way() -> None:
    start = {"w": torch.zeros(3)}
    strategy = FedAvg(server_learning_rate=0.5)
    strategy.begin_round(start)
    strategy.accumulate({"w": torch.full((3,), 4.0)}, num_samples=1)
    assert torch.allclose(strategy.finish_round()["w"], torch.full((3,), 2.0))


def test_round_metrics_are_sample_weighted_means_of_client_metrics() -> None:
    strategy = FedAvg()
    strategy.begin_round({"w": torch.zeros(1)})
    strategy.accumulate({"w": torch.ones(1)}, num_samples=1, metrics={"loss": 1.0, "name": "a"})
    strategy.accumulate({"w": torch.ones(1)}, num_samples=3, metrics={"loss": 3.0})
    strategy.finish_round()
    assert strategy.round_metrics == {"loss": 2.5, "num_clients": 2, "num_samples": 4}


def test_finish_round_without_updates_raises() -> None:
    strategy = FedAvg()
    strategy.begin_round({"w": torch.zeros(1)})
    with pytest.raises(RuntimeError, match="before any update"):
        strategy.finish_round()


def test_accumulate_before_begin_round_raises() -> None:
    with pytest.raises(RuntimeError, match="before begin_round"):
        FedAvg().accumulate({"w": torch.zeros(1)}, num_samples=1)


@pytest.mark.parametrize(
    ("update", "num_samples", "message"),
    [
        ({"w": torch.zeros(2)}, 1, "shape"),
        ({"v": torch.zeros(3)}, 1, "missing"),
        ({"w": torch.tensor([0.0, float("nan"), 0.0])}, 1, "NaN"),
        ({"w": torch.zeros(3)}, 0, "num_samples"),
        ({"w": torch.zeros(3, dtype=torch.int64)}, 1, "dtype"),
    ],
)
def test_invalid_updates_are_rejected(
    update: dict[str, torch.Tensor], num_samples: int, message: str
) -> None:
    strategy = FedAvg()
    strategy.begin_round({"w": torch.zeros(3)})
    with pytest.raises(ValueError, match=message):
        strategy.accumulate(update, num_samples=num_samples)


def test_registry_builds_fedavg_with_validated_parameters() -> None:
    assert "fedavg" in available_strategies()
    assert validate_strategy_params("fedavg", {}) == {"server_learning_rate": 1.0}
    strategy = build_strategy("fedavg", server_learning_rate=0.5)
    assert isinstance(strategy, FedAvg)
    assert strategy.server_learning_rate == 0.5


@pytest.mark.parametrize(
    ("name", "params", "message"),
    [
        ("fedsgd", {}, r"unknown strategy 'fedsgd'; known strategies: \[.*'fedavg'"),
        ("fedavg", {"mu": 0.1}, r"unknown parameters \['mu'\]"),
        ("fedavg", {"server_learning_rate": 0}, "'server_learning_rate' must be greater than 0"),
        ("fedavg", {"server_learning_rate": 11}, "'server_learning_rate' must be at most 10"),
        ("fedavg", {"server_learning_rate": "fast"}, "'server_learning_rate' must be a number"),
        ("fedavg", {"server_learning_rate": True}, "'server_learning_rate' must be a number"),
    ],
)
def test_registry_rejects_unknown_strategies_and_bad_parameters(
    name: str, params: dict[str, object], message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        validate_strategy_params(name, params)
    with pytest.raises(ValueError, match=message):
        build_strategy(name, **params)


def test_add_weighted_accumulates_in_place_in_at_least_float32() -> None:
    running: dict[str, torch.Tensor] = {}
    add_weighted_(running, {"w": torch.tensor([1.0, 2.0])}, 2.0)
    first = running["w"]
    add_weighted_(running, {"w": torch.tensor([3.0, 5.0])}, 0.5)
    assert running["w"] is first
    assert running["w"].dtype == torch.float32
    assert torch.equal(running["w"], torch.tensor([3.5, 6.5]))


def test_add_weighted_sums_half_precision_weights_in_float32() -> None:
    running: dict[str, torch.Tensor] = {}
    add_weighted_(running, {"w": torch.tensor([1.0, 2.0], dtype=torch.bfloat16)}, 3.0)
    assert running["w"].dtype == torch.float32


def test_add_weighted_keeps_float64_weights_in_float64() -> None:
    running: dict[str, torch.Tensor] = {}
    add_weighted_(running, {"w": torch.tensor([1.0], dtype=torch.float64)}, 1.0)
    assert running["w"].dtype == torch.float64


def test_weighted_mean_matches_numpy_average() -> None:
    rng = np.random.default_rng(3)
    arrays = [rng.normal(size=(3, 4)) for _ in range(4)]
    weights = [1.0, 2.0, 0.0, 5.0]
    result = weighted_mean([torch.from_numpy(a) for a in arrays], weights)
    np.testing.assert_allclose(
        result.numpy(), np.average(np.stack(arrays), axis=0, weights=weights)
    )


@pytest.mark.parametrize("count", [1, 4, 5])
def test_coordinate_median_matches_numpy_median(count: int) -> None:
    rng = np.random.default_rng(4)
    arrays = [rng.normal(size=(5,)) for _ in range(count)]
    result = coordinate_median([torch.from_numpy(a) for a in arrays])
    np.testing.assert_allclose(result.numpy(), np.median(np.stack(arrays), axis=0))


def test_trimmed_mean_drops_the_extremes_of_each_coordinate() -> None:
    values = [torch.tensor([v, -v]) for v in (1.0, 2.0, 3.0, 4.0, 1000.0)]
    result = trimmed_mean(values, trim_ratio=0.2)
    assert torch.allclose(result, torch.tensor([3.0, -3.0], dtype=torch.float64))


def test_krum_selects_honest_vectors_over_an_outlier() -> None:
    rng = np.random.default_rng(5)
    honest = [torch.from_numpy(rng.normal(0, 0.1, 10)) for _ in range(6)]
    outlier = torch.full((10,), 50.0, dtype=torch.float64)
    selected = krum_select([outlier, *honest], num_byzantine=1, num_selected=3)
    assert 0 not in selected
    assert len(selected) == 3


def test_krum_needs_enough_vectors_for_its_byzantine_bound() -> None:
    with pytest.raises(ValueError, match="more than 4 vectors"):
        krum_select([torch.zeros(2)] * 4, num_byzantine=1)


def test_flatten_and_unflatten_round_trip_a_state_dict() -> None:
    rng = np.random.default_rng(6)
    state = random_update(rng)
    restored = unflatten_weights(flatten_weights(state), state)
    assert all(torch.equal(restored[name], state[name]) for name in state)
    assert restored["conv.weight"].dtype == torch.float32
