"""A `file:` partition's indices are rows of the dataset as registered: data rows of an
image folder's labels.csv, or rows of an .npz file's train split, counted from 0."""

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tests.factories import SiteFactory, UserFactory
from training import federation
from training.fl.data import ImageArray, write_image
from training.models import Dataset, Experiment

pytestmark = pytest.mark.django_db

ROWS = 12


def write_numbered_folder(root: Path) -> Path:
    """Images whose every pixel is 10 * (their labels.csv row + 1), listed in an order that
    differs from the order of their file names."""
    root.mkdir(parents=True)
    order = [7, 2, 11, 0, 5, 9, 1, 4, 10, 3, 8, 6]  # file number of each csv row
    lines = ["path,label"]
    for row, number in enumerate(order):
        image = ImageArray(
            array=np.full((6, 6), 10.0 * (row + 1), np.float32),
            spacing=(1.0, 1.0),
            origin=(0.0, 0.0),
            direction=(1.0, 0.0, 0.0, 1.0),
        )
        write_image(image, root / f"image-{number:02d}.nii.gz")
        lines.append(f"image-{number:02d}.nii.gz,{row % 2}")
    (root / "labels.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return root


def experiment_on(dataset: Dataset, partition_file: Path, parts: list[list[int]]) -> Experiment:
    partition_file.write_text(json.dumps(parts), encoding="utf-8")
    experiment = Experiment.objects.create(
        owner=dataset.owner, dataset=dataset, name="rows", partition=f"file:{partition_file}",
        seed=3, clients_per_round=len(parts), min_clients=len(parts),
    )  # fmt: skip
    experiment.sites.set(SiteFactory.create_batch(len(parts)))
    return experiment


@pytest.fixture
def numbered_folder(dataset_root):
    return Dataset.objects.create(
        name="numbered", owner=UserFactory(), storage_format="folder", num_classes=2,
        channels=1, normalization="none", path=str(write_numbered_folder(dataset_root / "n")),
    )  # fmt: skip


def test_each_site_of_a_folder_gets_exactly_the_labels_csv_rows_the_file_names(
    numbered_folder, dataset_root
):
    # Given a partition file naming labels.csv rows, leaving rows 3, 8 and 10 to no site
    parts = [[0, 5, 7], [1, 2, 4, 6], [9, 11]]
    experiment = experiment_on(numbered_folder, dataset_root / "parts.json", parts)
    site_ids = federation.experiment_site_ids(experiment)

    # When the simulated sites' data are made
    by_site, held_out = federation.simulated_split(experiment.pk, site_ids)
    data = [federation.simulated_client_data(experiment, site_id) for site_id in site_ids]

    # Then each site trains on its rows, whose images and labels are those of labels.csv
    with (Path(numbered_folder.path) / "labels.csv").open(encoding="utf-8") as handle:
        csv_labels = [int(row["label"]) for row in csv.DictReader(handle)]
    for site_id, client, rows in zip(site_ids, data, parts, strict=True):
        assert by_site[site_id] == rows
        assert client.indices == rows
        for row in rows:
            image, label = client.dataset[row]
            assert float(image.mean()) == pytest.approx(10.0 * (row + 1))
            assert label == csv_labels[row]
    # And the rows given to no site are the server's held-out data
    assert held_out == [3, 8, 10]
    evaluation = federation.evaluation_data(experiment)
    assert evaluation is not None and evaluation.indices == [3, 8, 10]


def test_a_file_that_gives_every_row_to_a_site_leaves_no_server_evaluation(
    numbered_folder, dataset_root
):
    parts = [list(range(0, 6)), list(range(6, ROWS))]
    experiment = experiment_on(numbered_folder, dataset_root / "parts.json", parts)

    by_site, held_out = federation.simulated_split(
        experiment.pk, federation.experiment_site_ids(experiment)
    )

    assert sorted(by_site.values()) == parts
    assert held_out == []
    assert federation.evaluation_data(experiment) is None


def test_each_site_of_an_npz_gets_the_train_split_rows_the_file_names(dataset_root):
    # Given an .npz whose train row i holds the value i everywhere and label i % 3
    count = 9
    images = np.repeat(np.arange(count, dtype=np.float32), 16).reshape(count, 4, 4)
    path = dataset_root / "rows.npz"
    np.savez(
        path,
        train_images=images,
        train_labels=(np.arange(count) % 3).reshape(-1, 1),
        test_images=images[:3],
        test_labels=np.array([[0], [1], [2]]),
    )
    dataset = Dataset.objects.create(
        name="rows", owner=UserFactory(), storage_format="npz", num_classes=3, path=str(path)
    )
    parts = [[8, 0, 4], [1, 2, 3, 5, 6, 7]]
    experiment = experiment_on(dataset, dataset_root / "parts.json", parts)

    # When the sites' data are made
    site_ids = federation.experiment_site_ids(experiment)
    by_site, held_out = federation.simulated_split(experiment.pk, site_ids)

    # Then each site's rows are train rows of the file (sorted), and evaluation uses the
    # test split whole
    assert [by_site[site_id] for site_id in site_ids] == [[0, 4, 8], [1, 2, 3, 5, 6, 7]]
    assert held_out is None
    client = federation.simulated_client_data(experiment, site_ids[0])
    for row in client.indices:
        image, label = client.dataset[row]
        assert float(image.mean()) == pytest.approx(row)
        assert label == row % 3
    evaluation = federation.evaluation_data(experiment)
    assert evaluation is not None and evaluation.indices is None
    assert len(evaluation.dataset) == 3


def test_a_partition_file_with_a_row_past_the_dataset_is_refused(numbered_folder, dataset_root):
    experiment = experiment_on(numbered_folder, dataset_root / "parts.json", [[0, 1], [ROWS]])

    with pytest.raises(ValueError, match=f"index {ROWS} outside 0..{ROWS - 1}"):
        federation.simulated_split(experiment.pk, federation.experiment_site_ids(experiment))
