"""The image viewer: rendering, per-site statistics, predictions, its API and its page."""

import csv
import io
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tests.conftest import client_for
from tests.factories import CheckpointFactory, DatasetFactory, ExperimentFactory, UserFactory
from training.federation import open_dataset_at
from training.fl.data import ImageArray, generate_synthetic_dataset, read_image, write_image
from training.fl.networks import build_network
from training.models import StorageFormat
from training.modelstore import initial_weights_name, save_weights
from visualization.viewer.images import catalog_for, read_raw_image
from visualization.viewer.rendering import PRESETS, RenderError, render_png
from visualization.viewer.statistics import SiteSummary, compute_statistics, find_site_differences

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
CLASS_NAMES = ["benign", "lesion"]


# --- Data ---------------------------------------------------------------------------------


def image_2d(pixels, spacing=(1.0, 1.0)) -> ImageArray:
    array = np.asarray(pixels, dtype=np.float32)
    return ImageArray(array=array, spacing=spacing, origin=(0.0, 0.0), direction=(1, 0, 0, 1))


def stepped_volume() -> ImageArray:
    """Five axial slices of 16 x 24 pixels; slice k holds the value 100 k everywhere."""
    array = np.repeat(np.arange(5, dtype=np.float32)[:, None, None] * 100, 16, axis=1)
    array = np.repeat(array, 24, axis=2)
    return ImageArray(
        array=array,
        spacing=(1.0, 1.0, 2.0),
        origin=(0.0, 0.0, 0.0),
        direction=(1, 0, 0, 0, 1, 0, 0, 0, 1),
    )


def write_folder_dataset(folder: Path, rows: list[tuple[str, ImageArray, int]]) -> Path:
    """A dataset folder with labels.csv (path,label; no site column)."""
    for relative, image, _ in rows:
        write_image(image, folder / relative)
    with (folder / "labels.csv").open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(("path", "label"))
        writer.writerows((relative, label) for relative, _, label in rows)
    return folder


def labels_csv(folder: Path) -> list[dict[str, str]]:
    with (folder / "labels.csv").open(newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def decoded(response_or_bytes) -> Image.Image:
    data = getattr(response_or_bytes, "content", response_or_bytes)
    assert data.startswith(PNG_SIGNATURE)
    return Image.open(io.BytesIO(data))


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


@pytest.fixture
def lesions(dataset_root, owner):
    """The synthetic dataset: 3 sites of 12 2D NIfTI images of 32 x 32 pixels."""
    folder = generate_synthetic_dataset(
        dataset_root / "lesions", sites=3, per_site=12, size=32, seed=0
    )
    return DatasetFactory(
        owner=owner, path=str(folder), image_shape=[32, 32], class_names=CLASS_NAMES
    )


@pytest.fixture
def volumes(dataset_root, owner):
    folder = write_folder_dataset(
        dataset_root / "volumes",
        [(f"volume-{number}.nii.gz", stepped_volume(), number % 2) for number in range(3)],
    )
    return DatasetFactory(
        owner=owner, path=str(folder), image_shape=[5, 16, 24], class_names=CLASS_NAMES
    )


@pytest.fixture
def anisotropic(dataset_root, owner):
    """One image of 40 rows x 80 columns whose pixels are 0.5 mm wide and 1.0 mm tall."""
    image = image_2d(np.random.default_rng(0).normal(size=(40, 80)), spacing=(0.5, 1.0))
    folder = write_folder_dataset(dataset_root / "anisotropic", [("wide.nii.gz", image, 0)])
    return DatasetFactory(owner=owner, path=str(folder), image_shape=[40, 80])


@pytest.fixture
def checkpoint(lesions, owner):
    """The initial weights of a cnn-small experiment on the lesions dataset."""
    experiment = ExperimentFactory(owner=owner, dataset=lesions, network="cnn-small")
    return checkpoint_of(experiment)


def checkpoint_of(experiment):
    network = build_network("cnn-small", in_channels=1, num_classes=2, seed=0)
    stored = save_weights(initial_weights_name(experiment.pk), network.state_dict())
    return CheckpointFactory(
        experiment=experiment,
        round=None,
        file=stored.name,
        sha256=stored.sha256,
        size_bytes=stored.size_bytes,
        num_parameters=stored.num_parameters,
    )


def images_url(dataset, suffix="") -> str:
    return f"/api/datasets/{dataset.pk}/images/{suffix}"


# --- Rendering ----------------------------------------------------------------------------


def test_a_value_below_the_window_renders_black_and_one_above_it_white():
    image = image_2d([[-1000.0, 40.0, 1000.0]])

    png, window = render_png(image, preset="ct-soft-tissue")

    assert (window.width, window.level) == (400, 40)
    assert np.asarray(decoded(png)).tolist() == [[0, 128, 255]]


def test_lung_and_bone_windows_show_water_at_different_grey_levels():
    water = image_2d([[0.0]])

    lung = np.asarray(decoded(render_png(water, preset="ct-lung")[0]))
    bone = np.asarray(decoded(render_png(water, preset="ct-bone")[0]))

    # (0 - (-600 - 750)) / 1500 and (0 - (400 - 900)) / 1800 of the grey scale.
    assert lung.item() == 230
    assert bone.item() == 71


def test_mr_auto_ignores_the_extreme_pixels_that_the_full_range_shows():
    pixels = np.arange(1000, dtype=np.float32).reshape(20, 50)
    pixels[0, 0] = 1e6  # one hot pixel
    image = image_2d(pixels)

    full_range = np.asarray(decoded(render_png(image, preset="auto")[0]))
    mr_auto = np.asarray(decoded(render_png(image, preset="mr-auto")[0]))

    middle = (10, 0)  # the value 500, halfway through the ordinary intensities
    assert full_range[middle] == 0
    assert 120 <= mr_auto[middle] <= 135


def test_explicit_window_and_level_replace_the_preset():
    image = image_2d([[0.0, 50.0, 100.0]])

    png, window = render_png(image, window=100, level=50)

    assert (window.width, window.level) == (100, 50)
    assert np.asarray(decoded(png)).tolist() == [[0, 128, 255]]


def test_anisotropic_pixels_keep_their_physical_aspect():
    image = image_2d(np.zeros((40, 80)), spacing=(0.5, 1.0))  # 40 mm x 40 mm

    picture = decoded(render_png(image)[0])

    assert picture.size == (80, 80)


def test_the_output_is_at_most_512_pixels_on_its_long_side():
    image = image_2d(np.zeros((600, 1200)))

    picture = decoded(render_png(image)[0])

    assert picture.size == (512, 256)


def test_a_colour_image_renders_as_rgb():
    pixels = np.zeros((8, 8, 3), dtype=np.float32)
    pixels[..., 0] = 255  # pure red

    picture = decoded(render_png(image_2d(pixels), window=255, level=127.5)[0])

    assert picture.mode == "RGB"
    assert picture.getpixel((4, 4)) == (255, 0, 0)


def test_a_coronal_slice_shows_the_last_axial_slice_at_the_top():
    picture = np.asarray(decoded(render_png(stepped_volume(), plane="coronal", preset="auto")[0]))

    assert picture.shape == (10, 24)  # 5 slices of 2 mm over 24 columns of 1 mm
    assert picture[0, 0] == 255
    assert picture[-1, 0] == 0


def test_an_unknown_preset_names_the_presets():
    with pytest.raises(RenderError, match="ct-lung, ct-soft-tissue, ct-bone, mr-auto, auto"):
        render_png(image_2d([[0.0]]), preset="lungs")


# --- PNG endpoint -------------------------------------------------------------------------


def test_the_png_of_a_2d_image_is_a_private_png_of_its_size(lesions, owner):
    response = client_for(owner).get(images_url(lesions, "0.png"))

    assert response.status_code == 200
    assert response["Content-Type"] == "image/png"
    assert "private" in response["Cache-Control"]
    picture = decoded(response)
    assert (picture.size, picture.mode) == ((32, 32), "L")


def test_the_png_keeps_the_aspect_of_anisotropic_pixels(anisotropic, owner):
    response = client_for(owner).get(images_url(anisotropic, "0.png"))

    assert decoded(response).size == (80, 80)


def test_the_png_shows_raw_intensities_through_the_window(volumes, owner):
    response = client_for(owner).get(images_url(volumes, "0.png"), {"window": 400, "level": 200})

    # The middle slice (2) holds 200, the window's centre.
    assert set(np.asarray(decoded(response)).ravel().tolist()) == {128}
    assert (response["X-Window-Width"], response["X-Window-Level"]) == ("400", "200")


@pytest.mark.parametrize(("slice_index", "grey"), [(0, 0), (1, 64), (3, 191), (4, 255)])
def test_the_slice_parameter_picks_that_axial_slice(volumes, owner, slice_index, grey):
    response = client_for(owner).get(
        images_url(volumes, "1.png"), {"slice": slice_index, "preset": "auto"}
    )

    picture = decoded(response)
    assert picture.size == (24, 16)
    assert set(np.asarray(picture).ravel().tolist()) == {grey}


def test_a_slice_out_of_range_is_a_400_that_gives_the_valid_range(volumes, owner):
    response = client_for(owner).get(images_url(volumes, "0.png"), {"slice": 5})

    assert response.status_code == 400
    assert "from 0 to 4" in response.json()["detail"]


def test_an_unknown_preset_is_a_400_that_lists_the_presets(lesions, owner):
    response = client_for(owner).get(images_url(lesions, "0.png"), {"preset": "brain"})

    assert response.status_code == 400
    assert all(preset in response.json()["detail"] for preset in PRESETS)


@pytest.mark.parametrize(
    ("parameters", "hint"),
    [
        ({"window": 400}, "both window and level"),
        ({"window": -5, "level": 0}, "positive"),
        ({"window": "wide", "level": 0}, "window must be a number"),
        ({"preset": "ct-bone", "window": 400, "level": 40}, "not both"),
        ({"slice": 1}, "single slice"),
        ({"plane": "oblique"}, "axial, coronal, sagittal"),
        ({"size": 4000}, "from 16 to 512"),
    ],
)
def test_bad_rendering_parameters_are_a_400_that_says_what_to_fix(lesions, owner, parameters, hint):
    response = client_for(owner).get(images_url(lesions, "0.png"), parameters)

    assert response.status_code == 400
    assert hint in response.json()["detail"]


def test_an_image_index_out_of_range_is_a_404(lesions, owner):
    client = client_for(owner)

    for suffix in ("36.png", "36/", "999/"):
        response = client.get(images_url(lesions, suffix))

        assert response.status_code == 404, suffix
    assert "numbered 0 to 35" in response.json()["detail"]


def test_errors_of_the_png_endpoint_are_json_even_for_png_only_clients(lesions, owner):
    response = client_for(owner).get(
        images_url(lesions, "0.png"), {"preset": "brain"}, HTTP_ACCEPT="image/png"
    )

    assert response.status_code == 400
    assert response["Content-Type"] == "application/json"


def test_a_dataset_outside_the_dataset_roots_is_not_read(tmp_path, owner):
    folder = generate_synthetic_dataset(tmp_path / "elsewhere", sites=1, per_site=2, size=32)
    dataset = DatasetFactory(owner=owner, path=str(folder))

    response = client_for(owner).get(images_url(dataset, "0.png"))

    assert response.status_code == 409
    assert "FEDLENS_DATASET_ROOTS" in response.json()["detail"]


def test_an_npz_dataset_shows_its_stored_pixel_values(dataset_root, owner):
    images = np.zeros((4, 28, 28), dtype=np.uint8)
    images[:, :, 14:] = 255
    path = dataset_root / "mnist.npz"
    np.savez(path, train_images=images, train_labels=np.array([[0], [1], [0], [1]]))
    dataset = DatasetFactory(
        owner=owner, path=str(path), storage_format=StorageFormat.NPZ, image_shape=[28, 28]
    )
    client = client_for(owner)

    details = client.get(images_url(dataset, "3/")).json()
    picture = decoded(client.get(images_url(dataset, "3.png")))

    assert (details["label"], details["intensity"]["max"], details["shape"]) == (1, 255, [28, 28])
    assert picture.size == (28, 28)
    assert np.asarray(picture)[0].tolist() == [0] * 14 + [255] * 14


# --- Listing and metadata -----------------------------------------------------------------


def test_the_image_list_shows_one_site_page_by_page(lesions, owner):
    expected = [
        index for index, row in enumerate(labels_csv(Path(lesions.path))) if row["site"] == "site-2"
    ]

    response = client_for(owner).get(images_url(lesions), {"site": "site-2", "page_size": 5})

    body = response.json()
    assert body["count"] == 12
    assert [row["index"] for row in body["results"]] == expected[:5]
    assert body["next"] is not None
    first = body["results"][0]
    assert first["site"] == "site-2"
    assert first["path"].startswith("site-2/img-")
    assert first["shape"] == [32, 32]
    assert first["class_name"] == CLASS_NAMES[first["label"]]


def test_the_image_list_filters_by_class_label(lesions, owner):
    lesion_rows = [row for row in labels_csv(Path(lesions.path)) if row["label"] == "1"]

    response = client_for(owner).get(images_url(lesions), {"label": 1, "page_size": 100})

    assert response.json()["count"] == len(lesion_rows)
    assert {row["label"] for row in response.json()["results"]} == {1}


@pytest.mark.parametrize(
    ("parameters", "hint"),
    [({"site": "site-9"}, "site-1, site-2, site-3"), ({"label": 2}, "from 0 to 1")],
)
def test_an_unknown_site_or_label_is_a_400(lesions, owner, parameters, hint):
    response = client_for(owner).get(images_url(lesions), parameters)

    assert response.status_code == 400
    assert hint in response.json()["detail"]


def test_image_metadata_gives_geometry_slices_label_and_intensity_range(volumes, owner):
    response = client_for(owner).get(images_url(volumes, "1/"))

    body = response.json()
    assert body["shape"] == [5, 16, 24]
    assert body["spacing"] == [2.0, 1.0, 1.0]
    assert body["num_slices"] == 5
    assert body["slices_per_plane"] == {"axial": 5, "coronal": 16, "sagittal": 24}
    assert (body["label"], body["class_name"], body["site"]) == (1, "lesion", "all")
    assert (body["intensity"]["min"], body["intensity"]["max"]) == (0, 400)
    assert "private" in response["Cache-Control"]


# --- Statistics ---------------------------------------------------------------------------


def test_statistics_count_the_samples_of_each_class_at_each_site(lesions, owner):
    expected: dict[str, list[int]] = {}
    for row in labels_csv(Path(lesions.path)):
        expected.setdefault(row["site"], [0, 0])[int(row["label"])] += 1

    body = client_for(owner).get(f"/api/datasets/{lesions.pk}/statistics/").json()

    counts = {
        site["site"]: [entry["count"] for entry in site["class_counts"]] for site in body["sites"]
    }
    assert counts == expected
    assert body["class_names"] == CLASS_NAMES
    site = body["sites"][0]
    assert len(site["histogram"]) == 64
    assert sum(site["histogram"]) + site["below_range"] + site["above_range"] == pytest.approx(1)
    assert site["shapes"] == [{"shape": [32, 32], "count": 12}]


def test_statistics_flag_the_site_whose_intensities_were_scaled(lesions, owner):
    for path in sorted((Path(lesions.path) / "site-2").glob("*.nii.gz")):
        image = read_image(path)
        write_image(
            ImageArray(
                array=image.array * 5,
                spacing=image.spacing,
                origin=image.origin,
                direction=image.direction,
            ),
            path,
        )

    body = client_for(owner).get(f"/api/datasets/{lesions.pk}/statistics/").json()

    intensity_flags = [flag for flag in body["flags"] if flag["kind"] == "intensity"]
    assert [flag["site"] for flag in intensity_flags] == ["site-2"]
    assert "site-2: mean intensity" in intensity_flags[0]["message"]
    assert "above the typical site's" in intensity_flags[0]["message"]
    flagged = {site["site"]: site["flagged"] for site in body["sites"]}
    assert flagged["site-2"] is True


def test_statistics_are_computed_once_per_process(lesions, owner, monkeypatch):
    client = client_for(owner)
    first = client.get(f"/api/datasets/{lesions.pk}/statistics/").json()

    def no_reading(*args, **kwargs):
        raise AssertionError("the images were read again")

    monkeypatch.setattr("visualization.viewer.statistics.read_raw_pair", no_reading)
    second = client.get(f"/api/datasets/{lesions.pk}/statistics/").json()

    assert second == first


def test_statistics_read_at_most_the_sample_limit_per_site(lesions):
    reads = []

    def read(record):
        reads.append(record.index)
        return read_raw_image(lesions, record)

    result = compute_statistics(
        {"site-1": catalog_for(lesions).filtered(site="site-1")},
        read,
        CLASS_NAMES,
        samples_per_site=5,
    )

    assert len(reads) == 5
    assert (result["sites"][0]["num_sampled"], result["sites"][0]["num_samples"]) == (5, 12)


def site_summary(name, *, spacing=(1.0, 1.0), shape=(64, 64), counts=(50, 50), mean=100.0):
    summary = SiteSummary(site=name, class_counts=list(counts), num_sampled=10)
    summary.pixel_count, summary.mean, summary.variance = 1000, mean, 100.0
    summary.spacings[spacing] = 10
    summary.shapes[shape] = 10
    return summary


def test_a_site_with_another_spacing_is_flagged_alone():
    summaries = [
        site_summary("a"),
        site_summary("b"),
        site_summary("c", spacing=(0.5, 0.5)),
    ]

    flags = find_site_differences(summaries, CLASS_NAMES)

    assert [(flag.site, flag.kind) for flag in flags] == [("c", "spacing")]
    assert "0.5 x 0.5 mm differs from the 1 x 1 mm" in flags[0].message


def test_sites_that_all_differ_in_size_get_one_flag_for_the_dataset():
    summaries = [site_summary("a", shape=(64, 64)), site_summary("b", shape=(128, 128))]

    flags = find_site_differences(summaries, CLASS_NAMES)

    assert [(flag.site, flag.kind) for flag in flags] == [(None, "shape")]


def test_a_site_with_a_far_class_balance_is_flagged():
    summaries = [
        site_summary("a", counts=(50, 50)),
        site_summary("b", counts=(45, 55)),
        site_summary("c", counts=(95, 5)),
    ]

    flags = find_site_differences(summaries, CLASS_NAMES)

    assert [(flag.site, flag.kind) for flag in flags] == [("c", "class-balance")]
    assert "benign 95%, lesion 5%" in flags[0].message


def test_sites_that_look_alike_raise_no_flag():
    summaries = [site_summary("a"), site_summary("b", mean=105.0), site_summary("c", mean=95.0)]

    assert find_site_differences(summaries, CLASS_NAMES) == []


# --- Prediction ---------------------------------------------------------------------------


def test_a_prediction_gives_softmax_probabilities_and_the_true_label(lesions, owner, checkpoint):
    index = 7
    true_label = int(labels_csv(Path(lesions.path))[index]["label"])
    network = build_network("cnn-small", in_channels=1, num_classes=2, seed=0).eval()
    tensor, _ = open_dataset_at(lesions, lesions.path)[index]
    with torch.inference_mode():
        expected = torch.softmax(network(tensor[None]), dim=1)[0].tolist()

    response = client_for(owner).get(
        images_url(lesions, f"{index}/prediction/"), {"checkpoint": checkpoint.pk}
    )

    body = response.json()
    assert response.status_code == 200
    probabilities = [entry["probability"] for entry in body["probabilities"]]
    assert sum(probabilities) == pytest.approx(1)
    assert probabilities == pytest.approx(expected, abs=1e-6)
    assert (body["true_label"], body["true_class_name"]) == (true_label, CLASS_NAMES[true_label])
    assert body["predicted_label"] == int(np.argmax(expected))
    assert body["probability"] == pytest.approx(max(expected), abs=1e-6)
    assert body["correct"] == (body["predicted_label"] == true_label)
    assert body["round"] is None


def test_a_checkpoint_of_an_experiment_the_user_may_not_see_is_a_404(lesions, owner):
    hidden = checkpoint_of(ExperimentFactory(owner=UserFactory(), dataset=lesions))

    response = client_for(owner).get(
        images_url(lesions, "0/prediction/"), {"checkpoint": hidden.pk}
    )

    assert response.status_code == 404


def test_a_checkpoint_of_another_dataset_is_a_404(lesions, owner):
    elsewhere = checkpoint_of(ExperimentFactory(owner=owner))

    response = client_for(owner).get(
        images_url(lesions, "0/prediction/"), {"checkpoint": elsewhere.pk}
    )

    assert response.status_code == 404


def test_a_prediction_without_a_checkpoint_is_a_400(lesions, owner):
    response = client_for(owner).get(images_url(lesions, "0/prediction/"))

    assert response.status_code == 400
    assert "checkpoint=<id>" in response.json()["detail"]


# --- Who may see what ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("role", "status"), [("anonymous", 401), ("other", 404), ("owner", 200), ("staff", 200)]
)
@pytest.mark.parametrize(
    "suffix", ["", "0/", "0.png", "0/prediction/?checkpoint={checkpoint}", "statistics"]
)
def test_only_the_owner_and_staff_see_a_dataset(lesions, owner, checkpoint, role, status, suffix):
    users = {
        "anonymous": None,
        "other": UserFactory(username="other"),
        "owner": owner,
        "staff": UserFactory(username="staff", is_staff=True),
    }
    url = (
        f"/api/datasets/{lesions.pk}/statistics/"
        if suffix == "statistics"
        else images_url(lesions, suffix.format(checkpoint=checkpoint.pk))
    )

    response = client_for(users[role]).get(url)

    assert response.status_code == status


# --- The page -----------------------------------------------------------------------------


def test_the_viewer_page_renders_for_the_owner(lesions, owner, checkpoint, client):
    client.force_login(owner)

    response = client.get(f"/datasets/{lesions.pk}/viewer/")

    page = response.content.decode()
    assert response.status_code == 200
    assert "visualization/viewer.js" in page
    assert f'"/api/datasets/{lesions.pk}/images/"' in page
    assert '<option value="site-3">site-3 (12)</option>' in page
    assert f'<option value="{checkpoint.pk}">' in page
    assert "private" in response["Cache-Control"]


@pytest.mark.parametrize(
    ("modality", "offered", "default"),
    [
        ("CT", {"ct-soft-tissue", "ct-lung", "ct-bone", "auto"}, "ct-soft-tissue"),
        ("MR", {"mr-auto", "auto"}, "mr-auto"),
        ("XR", {"auto", "mr-auto"}, "auto"),
    ],
)
def test_the_viewer_offers_the_windows_of_the_dataset_modality(
    lesions, owner, client, modality, offered, default
):
    lesions.modality = modality
    lesions.save(update_fields=["modality"])
    client.force_login(owner)

    response = client.get(f"/datasets/{lesions.pk}/viewer/")

    config = response.context["viewer_config"]
    assert {preset["name"] for preset in config["presets"]} == offered
    assert config["defaultPreset"] == default
    page = response.content.decode()
    assert ('data-preset="ct-lung"' in page) == (modality == "CT")


def test_the_viewer_page_is_a_404_for_another_user(lesions, client):
    client.force_login(UserFactory(username="other"))

    response = client.get(f"/datasets/{lesions.pk}/viewer/")

    assert response.status_code == 404


def test_the_viewer_page_sends_anonymous_visitors_to_sign_in(lesions, client):
    response = client.get(f"/datasets/{lesions.pk}/viewer/")

    assert response.status_code == 302
    assert "/accounts/login/" in response["Location"]
