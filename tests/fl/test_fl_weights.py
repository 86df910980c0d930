"""Weights I/O: safetensors round trips, hash verification, and no pickle anywhere."""

import hashlib
import io
import pickle
from pathlib import Path

import pytest
import torch
from torch import nn

from training.fl.networks import build_network
from training.fl.weights import (
    WeightsError,
    all_finite,
    encode_weights,
    l2_distance,
    load_weights,
    load_weights_file,
    save_weights,
    weights_from_bytes,
    weights_to_bytes,
)


def mixed_state() -> dict[str, torch.Tensor]:
    """A ResNet state (with int64 BatchNorm counters) plus half, bool and strided tensors."""
    model = build_network("resnet18-small", in_channels=1, num_classes=2, width=4, seed=0)
    model(torch.randn(2, 1, 16, 16))  # one training-mode pass bumps num_batches_tracked
    state = dict(model.state_dict())
    state["extra.half"] = torch.randn(3, 4).half()
    state["extra.mask"] = torch.tensor([True, False, True])
    state["extra.transposed"] = torch.arange(12.0).reshape(3, 4).t()  # not contiguous
    return state


def assert_same_state(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    assert actual.keys() == expected.keys()
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def test_save_and_load_round_trip_preserves_tensors_and_dtypes(tmp_path: Path) -> None:
    # Given a state dict with float, half, bool and integer buffers
    state = mixed_state()
    assert state["stem.1.num_batches_tracked"].dtype == torch.int64
    # When it is saved and loaded back
    info = save_weights(state, tmp_path / "w.safetensors")
    restored = load_weights(tmp_path / "w.safetensors", expected_sha256=info.sha256)
    # Then every tensor comes back equal with its dtype, BatchNorm counters included
    assert_same_state(restored, state)
    assert restored["stem.1.num_batches_tracked"].item() == 1


def test_weights_info_describes_the_file_written(tmp_path: Path) -> None:
    state = mixed_state()
    path = tmp_path / "w.safetensors"
    info = save_weights(state, path)
    data = path.read_bytes()
    assert info.sha256 == hashlib.sha256(data).hexdigest()
    assert info.size_bytes == len(data)
    assert info.num_parameters == sum(t.numel() for t in state.values())


def test_bytes_round_trip_preserves_tensors() -> None:
    state = mixed_state()
    assert_same_state(weights_from_bytes(weights_to_bytes(state)), state)


def test_tied_weights_are_saved_as_independent_tensors() -> None:
    # safetensors refuses aliased storage; a model with tied weights must still save.
    shared = nn.Linear(4, 4)
    state = {"encoder.weight": shared.weight, "decoder.weight": shared.weight}
    restored = weights_from_bytes(weights_to_bytes(state))
    assert torch.equal(restored["encoder.weight"], shared.weight.detach())


def test_tampered_file_fails_the_hash_check(tmp_path: Path) -> None:
    # Given saved weights whose last byte is changed afterwards
    path = tmp_path / "w.safetensors"
    info = save_weights(mixed_state(), path)
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    # When they are loaded with the original hash, then the mismatch is reported
    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        load_weights(path, expected_sha256=info.sha256)


def test_bytes_are_verified_against_the_expected_hash() -> None:
    data = weights_to_bytes({"w": torch.ones(2)})
    assert torch.equal(
        load_weights(data, expected_sha256=hashlib.sha256(data).hexdigest())["w"], torch.ones(2)
    )
    with pytest.raises(WeightsError, match="mismatch"):
        load_weights(data, expected_sha256="0" * 64)


@pytest.mark.parametrize(
    "data", [b"", b"not safetensors at all", b"\x08\x00\x00\x00\x00\x00\x00\x00{bad json"]
)
def test_malformed_bytes_raise_weights_error(data: bytes) -> None:
    with pytest.raises(WeightsError, match="malformed"):
        load_weights(data)


def test_missing_file_raises_weights_error(tmp_path: Path) -> None:
    with pytest.raises(WeightsError, match="cannot read"):
        load_weights(tmp_path / "absent.safetensors")


def test_loading_never_unpickles(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Given a pickle-based torch checkpoint and valid safetensors weights
    pickled = io.BytesIO()
    torch.save({"w": torch.ones(2)}, pickled)
    path = tmp_path / "w.safetensors"
    save_weights({"w": torch.ones(2)}, path)

    # When every pickle entry point is made to fail
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("pickle was used")

    monkeypatch.setattr(pickle, "load", refuse)
    monkeypatch.setattr(pickle, "loads", refuse)
    monkeypatch.setattr(pickle, "Unpickler", refuse)
    monkeypatch.setattr(torch, "load", refuse)
    # Then safetensors still loads, and the pickle checkpoint is rejected, not unpickled
    assert torch.equal(load_weights(path)["w"], torch.ones(2))
    with pytest.raises(WeightsError, match="malformed"):
        load_weights(pickled.getvalue())


def _all_kinds_of_tensors() -> dict[str, torch.Tensor]:
    return {
        "conv.weight": torch.randn(4, 3, 3, 3),
        "half": torch.randn(5).to(torch.bfloat16),
        "double": torch.randn(2, 2, dtype=torch.float64),
        "bn.num_batches_tracked": torch.tensor(17),
        "mask": torch.tensor([True, False, True]),
        "empty": torch.zeros(0, 3),
    }


def test_load_weights_file_reads_back_every_dtype_and_shape(tmp_path: Path) -> None:
    weights = _all_kinds_of_tensors()
    info = save_weights(weights, tmp_path / "w.safetensors")

    loaded = load_weights_file(tmp_path / "w.safetensors", expected_sha256=info.sha256)

    assert loaded.keys() == weights.keys()
    for name, tensor in weights.items():
        assert loaded[name].dtype == tensor.dtype
        assert torch.equal(loaded[name], tensor)


def test_load_weights_file_reads_into_the_tensors_it_is_lent(tmp_path: Path) -> None:
    first, second = _all_kinds_of_tensors(), _all_kinds_of_tensors()
    for tensor in second.values():
        if tensor.dtype.is_floating_point:
            tensor.add_(1)
    first_info = save_weights(first, tmp_path / "first.safetensors")
    second_info = save_weights(second, tmp_path / "second.safetensors")
    lent = load_weights_file(tmp_path / "first.safetensors", expected_sha256=first_info.sha256)
    addresses = {name: tensor.data_ptr() for name, tensor in lent.items()}

    loaded = load_weights_file(
        tmp_path / "second.safetensors", expected_sha256=second_info.sha256, into=lent
    )

    assert_same_state(loaded, second)
    assert {name: tensor.data_ptr() for name, tensor in loaded.items()} == addresses


def test_load_weights_file_allocates_where_a_lent_tensor_does_not_fit(tmp_path: Path) -> None:
    weights = _all_kinds_of_tensors()
    info = save_weights(weights, tmp_path / "w.safetensors")
    name = next(iter(weights))
    misfit = {name: torch.zeros(1, dtype=torch.float64)}

    loaded = load_weights_file(tmp_path / "w.safetensors", expected_sha256=info.sha256, into=misfit)

    assert_same_state(loaded, weights)
    assert torch.equal(misfit[name], torch.zeros(1, dtype=torch.float64))


def test_load_weights_file_refuses_a_file_whose_hash_differs(tmp_path: Path) -> None:
    path = tmp_path / "w.safetensors"
    info = save_weights(_all_kinds_of_tensors(), path)
    data = bytearray(path.read_bytes())
    data[-5] ^= 0xFF
    path.write_bytes(bytes(data))

    with pytest.raises(WeightsError, match="SHA-256 mismatch"):
        load_weights_file(path, expected_sha256=info.sha256)


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        (lambda data: data[:-4], "data section does not match"),
        (lambda data: b"\xff" * 8 + data[8:], "bad header length"),
        (lambda data: data[:8] + b"[" + data[9:], "header is not JSON"),
        (lambda data: b"", "bad header length"),
    ],
)
def test_load_weights_file_refuses_a_malformed_file(tmp_path: Path, damage, message) -> None:  # type: ignore[no-untyped-def]
    path = tmp_path / "w.safetensors"
    save_weights(_all_kinds_of_tensors(), path)
    damaged = damage(path.read_bytes())
    path.write_bytes(damaged)

    with pytest.raises(WeightsError, match=message):
        load_weights_file(path, expected_sha256=hashlib.sha256(damaged).hexdigest())


def test_streamed_encoding_loads_with_safetensors_and_with_the_one_pass_reader(
    tmp_path: Path,
) -> None:
    # Given a state with mixed dtypes, a strided tensor, an empty one, and chunks smaller
    # than most tensors
    state = mixed_state() | {"extra.empty": torch.zeros(0, 3)}
    # When it is encoded as a stream
    size, chunks = encode_weights(state, chunk_bytes=64)
    data = b"".join(chunks)
    # Then the bytes are as long as announced, and both readers give the state back
    assert len(data) == size
    assert_same_state(weights_from_bytes(data), state)
    path = tmp_path / "w.safetensors"
    path.write_bytes(data)
    digest = hashlib.sha256(data).hexdigest()
    assert_same_state(load_weights_file(path, expected_sha256=digest), state)


def test_all_finite_finds_nan_and_infinities_anywhere() -> None:
    weights = torch.zeros(1_000_000)
    assert all_finite(weights)
    assert all_finite(torch.zeros(0))
    weights[-1] = float("nan")
    assert not all_finite(weights)
    weights[-1] = float("-inf")
    assert not all_finite(weights)


def test_l2_distance_of_large_tensors_matches_a_float64_computation() -> None:
    generator = torch.Generator().manual_seed(0)
    first = {"w": torch.randn(700_001, generator=generator), "n": torch.tensor(3)}
    second = {"w": torch.randn(700_001, generator=generator), "n": torch.tensor(5)}
    expected = float((first["w"].double() - second["w"].double()).norm())
    assert l2_distance(first, second) == pytest.approx(expected, rel=1e-6)


def test_l2_distance_of_half_precision_weights_does_not_overflow() -> None:
    first = {"w": torch.full((100_000,), 100.0).half()}
    second = {"w": torch.zeros(100_000).half()}
    assert l2_distance(first, second) == pytest.approx(100.0 * 100_000**0.5, rel=1e-6)
