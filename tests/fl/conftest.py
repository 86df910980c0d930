"""Shared synthetic datasets for the federated-learning engine tests (generated once)."""

from pathlib import Path

import pytest

from training.fl.data import generate_synthetic_dataset


@pytest.fixture(scope="session")
def small_synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 sites x 20 images of 32x32: enough for shapes, partitions and training mechanics."""
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("small-synthetic"), sites=3, per_site=20, size=32, seed=0
    )


@pytest.fixture(scope="session")
def learning_synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """2 sites x 200 images of 48x48: enough for cnn-small to learn the lesion task."""
    return generate_synthetic_dataset(
        tmp_path_factory.mktemp("learning-synthetic"), sites=2, per_site=200, size=48, seed=1
    )
