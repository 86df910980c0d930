"""A worker process's datasets: decoded once into FEDLENS_DATASET_CACHE_DIR and mapped from
there afterwards, and kept open only within FEDLENS_DATASET_CACHE_MB."""

import pytest
import torch

from training import federation
from training.fl.data import datasets as image_folders


@pytest.fixture
def cache_dir(settings, tmp_path):
    settings.FEDLENS_DATASET_CACHE_DIR = tmp_path / "dataset-cache"
    yield settings.FEDLENS_DATASET_CACHE_DIR
    federation.OPENED_DATASETS.clear()


@pytest.fixture
def image_reads(monkeypatch):
    """The image files that image folders decode, as they read them."""
    reads = []
    read = image_folders.read_image

    def counting(path, *args, **kwargs):
        reads.append(path)
        return read(path, *args, **kwargs)

    monkeypatch.setattr(image_folders, "read_image", counting)
    return reads


@pytest.mark.django_db
def test_a_dataset_opened_again_maps_what_was_decoded(lesions_dataset, cache_dir, image_reads):
    # given a worker that decoded a dataset's images into the cache while training
    data = federation.open_dataset_at(lesions_dataset, lesions_dataset.path)
    first = [data[index][0] for index in range(len(data))]
    assert len(image_reads) == len(data)
    assert list(cache_dir.glob("*/*/key.json"))
    # when the dataset is opened afresh (another process, or after it was closed here)
    federation.OPENED_DATASETS.clear()
    again = federation.open_dataset_at(lesions_dataset, lesions_dataset.path)
    # then its images are the same and none is read from its files again
    assert again is not data
    assert all(torch.equal(again[index][0], first[index]) for index in range(len(again)))
    assert len(image_reads) == len(data)


@pytest.mark.django_db
def test_a_worker_keeps_no_more_datasets_open_than_its_budget(lesions_dataset, cache_dir, settings):
    # given a budget smaller than any decoded dataset
    settings.FEDLENS_DATASET_CACHE_MB = 0
    data = federation.open_dataset_at(lesions_dataset, lesions_dataset.path)
    data[0]
    assert data.memory_bytes() > 0
    assert federation.open_dataset_at(lesions_dataset, lesions_dataset.path) is data
    # when a second dataset (the same files at another size) is opened and used
    lesions_dataset.image_shape = [16, 16]
    smaller = federation.open_dataset_at(lesions_dataset, lesions_dataset.path)
    smaller[0]
    # then only the dataset in use stays open: the first is closed, not kept beside it
    assert len(federation.OPENED_DATASETS) == 1
    assert federation.open_dataset_at(lesions_dataset, lesions_dataset.path) is smaller
    lesions_dataset.image_shape = [32, 32]
    assert federation.open_dataset_at(lesions_dataset, lesions_dataset.path) is not data
