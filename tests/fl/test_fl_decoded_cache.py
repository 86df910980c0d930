"""The decoded-dataset cache: images decoded once on disk, memory-mapped by later processes,
identical to decoding without it, replaced when the data or preprocessing changes, safe
with concurrent writers; and the bounded set of datasets a process keeps open."""

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import PROJECT_ROOT
from training.fl.data import (
    ImageReadError,
    Preprocessor,
    generate_segmentation_dataset,
    generate_synthetic_dataset,
    load_dataset,
)
from training.fl.data.cache import DecodedCache, OpenedDatasets

FOLDER_PREPROCESSING = Preprocessor(size=(24, 24), channels=1, normalization="zscore")


@pytest.fixture(scope="module")
def folder_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("cache-folder"), sites=2, per_site=6, size=32, seed=3
    )


@pytest.fixture(scope="module")
def volumes_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return generate_segmentation_dataset(
        tmp_path_factory.mktemp("cache-msd"), dims=3, sites=2, per_site=2, size=32, depth=16
    )


@pytest.fixture(scope="module")
def npz_dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("cache-npz") / "set.npz"
    pixels = np.random.default_rng(0).integers(0, 256, (10, 12, 12), dtype=np.uint8)
    np.savez(
        path,
        train_images=pixels,
        train_labels=np.arange(10) % 3,
        test_images=pixels[:4],
        test_labels=np.arange(4) % 3,
    )
    return path


def every_sample(dataset) -> list[tuple]:
    return [dataset[index] for index in range(len(dataset))]


def assert_same_samples(expected: list[tuple], actual: list[tuple]) -> None:
    assert len(expected) == len(actual)
    for (image, target), (cached_image, cached_target) in zip(expected, actual, strict=True):
        assert cached_image.dtype == image.dtype
        assert torch.equal(cached_image, image)
        if isinstance(target, torch.Tensor):
            assert cached_target.dtype == target.dtype
            assert torch.equal(cached_target, target)
        else:
            assert cached_target == target


@pytest.mark.parametrize("kind", ["folder", "npz", "volumes"])
def test_cached_samples_are_identical_to_decoding_without_the_cache(
    kind, folder_dataset, npz_dataset, volumes_dataset, tmp_path
):
    # given a dataset of each kind: classification images, an .npz, segmentation volumes
    path, preprocessor = {
        "folder": (folder_dataset, FOLDER_PREPROCESSING),
        "npz": (npz_dataset, Preprocessor()),
        "volumes": (volumes_dataset, Preprocessor(size=(16, 16, 8), normalization="zscore")),
    }[kind]
    plain = load_dataset(path, preprocessor=preprocessor)
    cache = DecodedCache(tmp_path / "cache")
    # when it is decoded into the cache, then mapped again from it
    decoded = load_dataset(path, preprocessor=preprocessor, decoded_cache=cache)
    mapped = load_dataset(path, preprocessor=preprocessor, decoded_cache=cache)
    # then every sample, label and tensor type is the same as without the cache
    expected = every_sample(plain)
    assert_same_samples(expected, every_sample(decoded))
    assert_same_samples(expected, every_sample(mapped))
    assert np.array_equal(mapped.labels, plain.labels)
    assert cache.built >= 1 and cache.reused >= 1


# A second process that opens the dataset and reads every sample, counting the image files
# it decodes (each file read goes through read_image) and the .npz arrays it decompresses.
READER = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    from training.fl.data import Preprocessor, load_dataset
    from training.fl.data import datasets, segmentation
    from training.fl.data.cache import DecodedCache

    reads = []
    def counting(read):
        def read_image(path, *args, **kwargs):
            reads.append(str(path))
            return read(path, *args, **kwargs)
        return read_image
    datasets.read_image = counting(datasets.read_image)
    segmentation.read_image = counting(segmentation.read_image)
    unpacked = []
    member = np.lib.npyio.NpzFile.__getitem__
    def counting_member(archive, name):
        unpacked.append(name)
        return member(archive, name)
    np.lib.npyio.NpzFile.__getitem__ = counting_member

    path, cache_dir, preprocessing = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    data = load_dataset(
        path, preprocessor=Preprocessor(**preprocessing), decoded_cache=DecodedCache(cache_dir)
    )
    labels = data.labels.tolist()
    checksum = float(sum(float(data[index][0].double().sum()) for index in range(len(data))))
    print(json.dumps({"reads": len(reads), "unpacked": unpacked, "checksum": checksum}))
    """
)


def read_in_another_process(path: Path, cache_dir: Path, preprocessing: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": str(PROJECT_ROOT)}
    done = subprocess.run(
        [sys.executable, "-c", READER, str(path), str(cache_dir), json.dumps(preprocessing)],
        cwd=PROJECT_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("kind", ["folder", "npz", "volumes"])
def test_a_second_process_maps_what_the_first_decoded_and_reads_no_image(
    kind, folder_dataset, npz_dataset, volumes_dataset, tmp_path
):
    path, preprocessing = {
        "folder": (folder_dataset, {"size": [24, 24], "channels": 1, "normalization": "zscore"}),
        "npz": (npz_dataset, {}),
        "volumes": (volumes_dataset, {"size": [16, 16, 8]}),
    }[kind]
    # given a first process that decoded the dataset into the cache
    first = read_in_another_process(path, tmp_path / "cache", preprocessing)
    assert first["reads"] > 0 or "train_images" in first["unpacked"]
    # when a second process opens it and reads every sample
    second = read_in_another_process(path, tmp_path / "cache", preprocessing)
    # then it reads no image file, unpacks no image array, and sees the same pixels
    assert second["reads"] == 0
    assert "train_images" not in second["unpacked"]
    assert second["checksum"] == first["checksum"]


def test_changed_data_is_decoded_again_and_its_stale_entry_deleted(tmp_path):
    # given a dataset decoded into the cache
    path = generate_synthetic_dataset(tmp_path / "data", sites=1, per_site=4, size=32, seed=5)
    cache = DecodedCache(tmp_path / "cache")
    before = load_dataset(path, preprocessor=FOLDER_PREPROCESSING, decoded_cache=cache)
    old_first = before[0][0].clone()
    entries_before = sorted(cache.root.glob("*/*/key.json"))
    # when one of its images is replaced by another (a different size on disk)
    first_file, other_file = before.paths[0], before.paths[-1]
    first_file.write_bytes(other_file.read_bytes())
    after = load_dataset(path, preprocessor=FOLDER_PREPROCESSING, decoded_cache=cache)
    # then it is decoded again, with the new pixels, and the old entry is gone
    assert torch.equal(after[0][0], load_dataset(path, preprocessor=FOLDER_PREPROCESSING)[0][0])
    assert not torch.equal(after[0][0], old_first)
    assert cache.built == 2
    entries_after = sorted(cache.root.glob("*/*/key.json"))
    assert len(entries_before) == len(entries_after) == 1
    assert entries_before != entries_after


def test_other_preprocessing_is_another_entry(folder_dataset, tmp_path):
    # given a dataset decoded at one size
    cache = DecodedCache(tmp_path / "cache")
    small = load_dataset(folder_dataset, preprocessor=FOLDER_PREPROCESSING, decoded_cache=cache)
    assert small[0][0].shape == (1, 24, 24)
    # when an experiment asks for another size and normalization
    other = Preprocessor(size=(16, 16), channels=1, normalization="minmax")
    resized = load_dataset(folder_dataset, preprocessor=other, decoded_cache=cache)
    # then that is decoded into an entry of its own, and both stay usable
    assert_same_samples(
        every_sample(load_dataset(folder_dataset, preprocessor=other)), every_sample(resized)
    )
    assert cache.built == 2
    assert small[0][0].shape == (1, 24, 24)
    assert len(list(cache.root.glob("*/*/key.json"))) == 2


def test_a_writer_that_loses_the_race_uses_the_entry_that_won(tmp_path):
    # given two processes' caches on one folder, the second finishing first while the
    # first is still writing the same entry
    first, second = DecodedCache(tmp_path / "cache"), DecodedCache(tmp_path / "cache")
    key = {"source": "/data/set", "fingerprint": "f1", "kind": "images"}

    def write_first(writer):
        writer.add_sample("images", np.full((2, 2), 1.0, dtype=np.float32))
        second.entry(key, lambda other: other.add_sample("images", np.ones((2, 2), np.float32)))

    # when the first renames its finished copy into place after the second did
    entry = first.entry(key, write_first)
    # then it answers the entry in place, complete, and leaves no temporary folder behind
    assert np.array_equal(entry.samples("images")[0], np.ones((2, 2), np.float32))
    assert first.built == second.built == 1
    assert [path.name for path in entry.folder.parent.iterdir()] == [entry.folder.name]


def test_an_unreadable_image_fails_its_own_sample_only(tmp_path):
    # given a dataset with one image cut short on disk
    path = generate_synthetic_dataset(tmp_path / "data", sites=1, per_site=4, size=32, seed=6)
    data = load_dataset(path, preprocessor=FOLDER_PREPROCESSING)
    broken = data.paths[1]
    broken.write_bytes(broken.read_bytes()[:100])
    # when it is decoded into the cache, and mapped again by another process
    cache = DecodedCache(tmp_path / "cache")
    for _ in range(2):
        cached = load_dataset(path, preprocessor=FOLDER_PREPROCESSING, decoded_cache=cache)
        # then the other samples are there, and that one raises naming its file
        assert cached[0][0].shape == (1, 24, 24)
        with pytest.raises(ImageReadError, match=broken.name):
            cached[1]
    assert cache.built == 1


def test_a_process_keeps_the_datasets_it_opened_within_its_budget(folder_dataset, tmp_path):
    cache = DecodedCache(tmp_path / "cache")
    sizes = [(24, 24), (20, 20), (16, 16)]

    def opener(size):
        preprocessor = Preprocessor(size=size, channels=1, normalization="zscore")
        return lambda: load_dataset(folder_dataset, preprocessor=preprocessor, decoded_cache=cache)

    one = opener(sizes[0])()
    one[0]  # decoded: its samples are what the budget counts
    budget = one.memory_bytes() + 1
    opened = OpenedDatasets()
    # given a budget that fits the first dataset's decoded samples and not two
    first = opened.get(sizes[0], opener(sizes[0]), budget_bytes=budget)
    first[0]
    assert opened.get(sizes[0], opener(sizes[0]), budget_bytes=budget) is first
    # when a second dataset is opened and decoded, then used again
    second = opened.get(sizes[1], opener(sizes[1]), budget_bytes=budget)
    second[0]
    assert opened.get(sizes[1], opener(sizes[1]), budget_bytes=budget) is second
    # then the least recently used one was closed, and the one in use kept
    assert len(opened) == 1
    assert opened.get(sizes[0], opener(sizes[0]), budget_bytes=budget) is not first
    # and a dataset larger than the whole budget is kept alone while it is used
    large = opened.get(sizes[2], opener(sizes[2]), budget_bytes=0)
    large[0]
    assert opened.get(sizes[2], opener(sizes[2]), budget_bytes=0) is large
    assert len(opened) == 1
    assert large.memory_bytes() == len(large) * 16 * 16 * 4


def test_what_a_dead_writer_left_half_written_is_removed_by_the_next_writer(tmp_path):
    # given a source whose group holds a temporary folder untouched for two days
    cache = DecodedCache(tmp_path / "cache")
    key = {"source": "/data/set", "fingerprint": "f1", "kind": "images"}
    entry = cache.entry(key, lambda writer: writer.add_sample("images", np.zeros(3, np.float32)))
    abandoned = entry.folder.parent / ".abandoned-by-a-killed-worker"
    abandoned.mkdir()
    two_days_ago = time.time() - 2 * 24 * 3600
    os.utime(abandoned, (two_days_ago, two_days_ago))
    in_progress = entry.folder.parent / ".being-written-now"
    in_progress.mkdir()
    # when another entry of that source is written
    cache.entry({**key, "kind": "masks"}, lambda writer: writer.add_array("x", np.zeros(1)))
    # then the abandoned folder is gone, and one being written now is left alone
    assert not abandoned.exists()
    assert in_progress.exists()
