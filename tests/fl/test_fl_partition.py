"""Client partitioners: coverage, skew, site grouping and file validation."""

import json
from pathlib import Path

import numpy as np
import pytest

from training.fl.data.partition import holdout_split, parse_partition_spec, partition_indices

LABELS = np.repeat(np.arange(4), 100)  # 400 samples, 4 balanced classes


def assert_each_index_once(parts: list[list[int]], num_samples: int) -> None:
    flat = [index for part in parts for index in part]
    assert sorted(flat) == list(range(num_samples))


def dominant_label_share(parts: list[list[int]]) -> float:
    """Mean over clients of the fraction of samples carrying the client's commonest label."""
    return float(np.mean([np.bincount(LABELS[part]).max() / len(part) for part in parts]))


def test_iid_covers_every_index_exactly_once_in_near_equal_parts() -> None:
    parts = partition_indices("iid", labels=LABELS, num_clients=7, seed=0)
    assert_each_index_once(parts, len(LABELS))
    sizes = [len(part) for part in parts]
    assert max(sizes) - min(sizes) <= 1


def test_partition_is_deterministic_for_a_seed_and_varies_across_seeds() -> None:
    first = partition_indices("dirichlet:0.5", labels=LABELS, num_clients=5, seed=3)
    again = partition_indices("dirichlet:0.5", labels=LABELS, num_clients=5, seed=3)
    other = partition_indices("dirichlet:0.5", labels=LABELS, num_clients=5, seed=4)
    assert first == again
    assert first != other


def test_dirichlet_with_small_alpha_skews_client_label_distributions() -> None:
    # Given the same labels split with strong and with no label skew
    skewed = partition_indices("dirichlet:0.1", labels=LABELS, num_clients=8, seed=0)
    iid = partition_indices("iid", labels=LABELS, num_clients=8, seed=0)
    # Then skewed clients are dominated by one label while iid clients are mixed
    assert dominant_label_share(skewed) > 0.7
    assert dominant_label_share(iid) < 0.45
    assert_each_index_once(skewed, len(LABELS))


def test_dirichlet_gives_every_client_at_least_a_few_samples() -> None:
    parts = partition_indices("dirichlet:0.01", labels=LABELS, num_clients=20, seed=1)
    assert min(len(part) for part in parts) >= 5
    assert_each_index_once(parts, len(LABELS))


def test_quantity_skew_varies_client_sizes_but_keeps_a_minimum() -> None:
    parts = partition_indices("quantity:0.3", labels=LABELS, num_clients=6, seed=2)
    sizes = sorted(len(part) for part in parts)
    assert sizes[-1] > 3 * sizes[0]
    assert sizes[0] >= 5
    assert_each_index_once(parts, len(LABELS))


def test_site_partition_gives_one_client_per_site_in_site_name_order() -> None:
    sites = ["b", "a", "c", "a", "b", "c", "c"]
    parts = partition_indices("site", labels=[0] * 7, num_clients=3, seed=0, sites=sites)
    assert parts == [[1, 3], [0, 4], [2, 5, 6]]


def test_site_partition_rejects_a_client_count_other_than_the_site_count() -> None:
    with pytest.raises(ValueError, match=r"3 sites .* num_clients is 2"):
        partition_indices("site", labels=[0] * 3, num_clients=2, seed=0, sites=["a", "b", "c"])
    with pytest.raises(ValueError, match="site column"):
        partition_indices("site", labels=[0] * 3, num_clients=3, seed=0)


def test_file_partition_returns_the_listed_indices(tmp_path: Path) -> None:
    path = tmp_path / "parts.json"
    path.write_text(json.dumps([[4, 0], [1, 2]]))
    parts = partition_indices(f"file:{path}", labels=[0] * 6, num_clients=2, seed=0)
    assert parts == [[0, 4], [1, 2]]


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("[[0, 1], [2, 9]]", "index 9 outside"),
        ("[[0, 1], [1, 2]]", "index 1 appears twice"),
        ('[[0, "1"], [2]]', "'1' is not an integer"),
        ("[[0, true], [2]]", "True is not an integer"),
        ("[[0, 1.5], [2]]", "1.5 is not an integer"),
        ("[[0, 1], []]", "client 1 has no samples"),
        ("[[0, 1, 2]]", "has 1 clients, expected 2"),
        ('{"a": [0]}', "expected a JSON list"),
        ("[[0, 1", "cannot read JSON"),
    ],
)
def test_file_partition_is_validated(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "parts.json"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        partition_indices(f"file:{path}", labels=[0] * 6, num_clients=2, seed=0)


@pytest.mark.parametrize(
    "spec",
    ["", "random", "iid:3", "dirichlet", "dirichlet:", "dirichlet:-1", "quantity:abc", "file:"],
)
def test_malformed_spec_is_rejected(spec: str) -> None:
    with pytest.raises(ValueError, match=r"accepted forms|alpha must be a positive number"):
        parse_partition_spec(spec)


def test_malformed_spec_error_lists_the_accepted_forms() -> None:
    with pytest.raises(ValueError, match=r"iid, dirichlet:<alpha>, quantity:<alpha>, site, file:"):
        partition_indices("shards:2", labels=LABELS, num_clients=2, seed=0)


def test_more_clients_than_samples_is_rejected() -> None:
    with pytest.raises(ValueError, match="cannot split 3 samples among 4 clients"):
        partition_indices("iid", labels=[0, 1, 0], num_clients=4, seed=0)


def test_holdout_split_is_disjoint_complete_and_stratified() -> None:
    labels = np.array([0] * 80 + [1] * 20)
    kept, held_out = holdout_split(labels, fraction=0.25, seed=0)
    assert sorted(kept + held_out) == list(range(100))
    assert np.bincount(labels[held_out]).tolist() == [20, 5]
