"""The viewer's mask overlays on segmentation datasets: the ground truth and a checkpoint's
prediction over a slice of any plane, coloured per class, with the prediction's Dice; who
may see them and the 400s that say what to fix."""

import base64
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import client_for
from tests.factories import CheckpointFactory, DatasetFactory, ExperimentFactory, UserFactory
from training import federation
from training.fl.data import read_image
from training.fl.data.formats import get_format
from training.fl.data.synthetic import generate_segmentation_dataset
from training.fl.metrics import segmentation_metrics
from training.fl.segmentation import predict_mask
from visualization.viewer.overlay import class_colour, to_stored_grid

ORGAN, LESION = 1, 2


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


def registered(folder, owner):
    """A dataset row as registration writes it, from the data's own description."""
    fields = get_format("msd").describe(folder).ledger_fields()
    return DatasetFactory(owner=owner, path=str(folder), **fields)


@pytest.fixture
def slices(dataset_root, owner):
    """2D: two sites of two 32 x 32 images with organ and lesion masks."""
    folder = generate_segmentation_dataset(
        dataset_root / "slices", dims=2, sites=2, per_site=2, size=32, seed=0
    )
    return registered(folder, owner)


@pytest.fixture
def volumes(dataset_root, owner):
    """3D: two sites of two volumes of 16 slices of 32 x 32 voxels."""
    folder = generate_segmentation_dataset(
        dataset_root / "volumes", dims=3, sites=2, per_site=2, size=32, depth=16, seed=0
    )
    return registered(folder, owner)


def checkpoint_of(experiment):
    stored = federation.store_initial_weights(experiment)
    return CheckpointFactory(
        experiment=experiment,
        round=None,
        file=stored.name,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        num_parameters=stored.num_parameters,
    )


def overlay_url(dataset, index=0) -> str:
    return f"/api/datasets/{dataset.pk}/images/{index}/overlay/"


def decoded(data_url: str) -> np.ndarray:
    prefix = "data:image/png;base64,"
    assert data_url.startswith(prefix)
    with Image.open(io.BytesIO(base64.b64decode(data_url[len(prefix) :]))) as picture:
        assert picture.mode == "RGBA"
        return np.asarray(picture)


def coloured(pixels: np.ndarray, value: int) -> np.ndarray:
    """Where the overlay shows class `value`: its colour, opaque."""
    colour = class_colour(value)
    rgb = [int(colour[i : i + 2], 16) for i in (1, 3, 5)]
    return (pixels[..., :3] == rgb).all(axis=-1) & (pixels[..., 3] == 255)


def stored_mask(dataset, index=0) -> np.ndarray:
    entry = get_format("msd").entries(Path(dataset.path))[index]
    return read_image(Path(dataset.path) / entry.mask).array.astype(np.int64)


def test_the_ground_truth_overlay_colours_each_class_where_the_stored_mask_has_it(slices, owner):
    response = client_for(owner).get(overlay_url(slices))

    assert response.status_code == 200
    answer = response.json()
    mask = stored_mask(slices)
    pixels = decoded(answer["ground_truth"])
    assert pixels.shape[:2] == mask.shape  # 32 x 32 square pixels: shown at their size
    assert (coloured(pixels, ORGAN) == (mask == ORGAN)).all()
    assert (coloured(pixels, LESION) == (mask == LESION)).all()
    assert ((pixels[..., 3] == 0) == (mask == 0)).all()  # the background stays clear
    assert answer["classes"] == [
        {"value": ORGAN, "name": "organ", "colour": class_colour(ORGAN)},
        {"value": LESION, "name": "lesion", "colour": class_colour(LESION)},
    ]
    assert answer["prediction"] is None and answer["dice"] is None
    assert response["Cache-Control"] == "private"


def test_a_volumes_overlay_cuts_the_mask_along_each_plane_as_the_image_is_cut(volumes, owner):
    client = client_for(owner)
    mask = stored_mask(volumes)  # (z, y, x)

    axial = client.get(overlay_url(volumes), {"plane": "axial", "slice": 7}).json()
    coronal = client.get(overlay_url(volumes), {"plane": "coronal", "slice": 16}).json()
    coronal_png = client.get(f"/api/datasets/{volumes.pk}/images/0.png?plane=coronal&slice=16")

    assert axial["slices_per_plane"] == {"axial": 16, "coronal": 32, "sagittal": 32}
    assert (coloured(decoded(axial["ground_truth"]), ORGAN) == (mask[7] == ORGAN)).all()
    # Coronal and sagittal cuts keep the image's physical aspect: the same size as its PNG
    with Image.open(io.BytesIO(coronal_png.content)) as picture:
        assert decoded(coronal["ground_truth"]).shape[1::-1] == picture.size
    assert coronal["plane"] == "coronal" and coronal["slice"] == 16
    sagittal = client.get(overlay_url(volumes), {"plane": "sagittal"}).json()
    assert sagittal["slice"] == 16  # the middle one by default
    assert coloured(decoded(sagittal["ground_truth"]), ORGAN).any()


def test_a_checkpoints_prediction_is_drawn_with_its_dice_as_the_federation_computes_it(
    slices, owner
):
    # Given the initial weights of a U-Net experiment on the 2D set
    experiment = ExperimentFactory(owner=owner, dataset=slices, network="unet")
    checkpoint = checkpoint_of(experiment)

    # When the overlay of image 1 is asked with that checkpoint
    response = client_for(owner).get(overlay_url(slices, 1), {"checkpoint": checkpoint.pk})

    # Then its prediction is the network's label map, and its Dice and HD95 those of the
    # engine's metrics on the training grid
    assert response.status_code == 200
    answer = response.json()
    training_data = federation.open_dataset_at(slices, slices.path)
    tensor, truth = training_data.read_sample(1)
    network = federation.network_with_weights(
        experiment, federation.global_weights(checkpoint.file.name, checkpoint.sha256)
    )
    labels = predict_mask(network, tensor)
    expected = segmentation_metrics(
        labels[None, None], truth[None], num_classes=3, spacing=training_data.spacing(1)
    )
    assert answer["dice"] == pytest.approx(expected["dice"])
    assert answer["dice_per_class"] == pytest.approx(expected["dice_per_class"])
    assert answer["hd95"] == pytest.approx(expected["hd95"])
    predicted = decoded(answer["prediction"])
    assert ((predicted[..., 3] == 255) == (labels.numpy() != 0)).all()
    assert answer["checkpoint"] == {
        "id": checkpoint.pk,
        "experiment": experiment.pk,
        "experiment_name": experiment.name,
        "round": None,
    }
    assert answer["ground_truth"] is not None


@pytest.mark.parametrize(
    ("parameters", "hint"),
    [
        ({"plane": "oblique"}, "axial, coronal, sagittal"),
        ({"plane": "coronal"}, "2D"),
        ({"slice": "3"}, "single slice"),
        ({"slice": "first"}, "slice must be a whole number"),
        ({"checkpoint": "best"}, "checkpoint must be a checkpoint id"),
        ({"size": "4"}, "size must be from 16 to 512"),
    ],
)
def test_bad_overlay_parameters_are_a_400_that_says_what_to_fix(slices, owner, parameters, hint):
    response = client_for(owner).get(overlay_url(slices), parameters)

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"
    assert hint in response.json()["detail"]


def test_a_slice_beyond_the_volume_is_a_400_giving_the_range(volumes, owner):
    response = client_for(owner).get(overlay_url(volumes), {"plane": "axial", "slice": 16})

    assert response.status_code == 400
    assert "from 0 to 15" in response.json()["detail"]


def test_a_classification_dataset_has_no_overlay(dataset_root, owner):
    labelled = DatasetFactory(owner=owner, path=str(dataset_root))

    response = client_for(owner).get(overlay_url(labelled))

    assert response.status_code == 400
    assert "segmentation datasets only" in response.json()["detail"]


@pytest.mark.parametrize(
    ("role", "status"), [("anonymous", 401), ("other", 404), ("owner", 200), ("staff", 200)]
)
def test_only_the_owner_and_staff_see_a_datasets_overlay(slices, owner, role, status):
    users = {
        "anonymous": None,
        "other": UserFactory(username="other"),
        "owner": owner,
        "staff": UserFactory(username="staff", is_staff=True),
    }

    response = client_for(users[role]).get(overlay_url(slices))

    assert response.status_code == status


def test_a_checkpoint_of_an_experiment_the_user_may_not_see_is_a_404(slices, owner):
    hidden = checkpoint_of(ExperimentFactory(owner=UserFactory(), dataset=slices, network="unet"))

    response = client_for(owner).get(overlay_url(slices), {"checkpoint": hidden.pk})

    assert response.status_code == 404


def test_the_viewer_page_of_a_segmentation_dataset_offers_the_overlay(slices, owner, client):
    experiment = ExperimentFactory(owner=owner, dataset=slices, network="unet", name="Seg run")
    checkpoint_of(experiment)
    client.force_login(owner)

    page = client.get(f"/datasets/{slices.pk}/viewer/").content.decode()

    assert 'id="overlay-canvas"' in page
    assert 'id="overlay-opacity"' in page
    assert "Seg run: initial weights" in page


def test_a_volumes_prediction_is_cut_along_the_chosen_plane_with_the_volumes_dice(volumes, owner):
    experiment = ExperimentFactory(owner=owner, dataset=volumes, network="unet")
    checkpoint = checkpoint_of(experiment)
    client = client_for(owner)

    coronal = client.get(
        overlay_url(volumes), {"checkpoint": checkpoint.pk, "plane": "coronal", "slice": 10}
    ).json()
    sagittal = client.get(
        overlay_url(volumes), {"checkpoint": checkpoint.pk, "plane": "sagittal", "slice": 10}
    ).json()

    # One prediction of the whole volume: the same Dice whatever the slice shown
    assert coronal["dice"] == sagittal["dice"]
    assert 0.0 <= coronal["dice"] <= 1.0
    assert len(coronal["dice_per_class"]) == 2
    truth, predicted = decoded(coronal["ground_truth"]), decoded(coronal["prediction"])
    assert truth.shape == predicted.shape


def test_a_predicted_label_map_is_brought_to_the_stored_grid_by_nearest_neighbour():
    labels = torch.tensor([[0, 1], [2, 1]])

    stored = to_stored_grid(labels, (4, 6))

    assert stored.dtype == np.int64
    assert stored.tolist() == [
        [0, 0, 0, 1, 1, 1],
        [0, 0, 0, 1, 1, 1],
        [2, 2, 2, 1, 1, 1],
        [2, 2, 2, 1, 1, 1],
    ]
