"""Dataset upload: an archive of images plus labels.csv becomes the uploader's own dataset;
anything unsafe or unreadable in it is refused with the member named, and nothing is kept."""

import csv
import gzip
import io
import os
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
from django.test import Client
from rest_framework.test import APIRequestFactory, force_authenticate
from selenium import webdriver
from selenium.webdriver.chrome.service import Service
from selenium.webdriver.common.by import By
from selenium.webdriver.support.ui import WebDriverWait

from tests.conftest import client_for, service_env
from tests.factories import DatasetFactory, UserFactory
from tests.test_browser import CHROMEDRIVER, CHROMIUM, PASSWORD, SCREENSHOTS, Server, manage
from training.api.uploads import DatasetUploadView, SizeCappedUploadHandler, UploadTooLarge
from training.fl.data import (
    ImageArray,
    generate_synthetic_dataset,
    write_dicom_series,
    write_image,
)
from training.models import Dataset
from training.uploads import detect_image_format

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
ZEROS = b"\0" * (8 * 1024 * 1024)


@pytest.fixture
def uploads_dir(settings, dataset_root):
    settings.FEDLENS_UPLOADS_DIR = dataset_root / "uploads"
    return settings.FEDLENS_UPLOADS_DIR


@pytest.fixture
def uploader(db):
    return UserFactory(username="uploader")


@pytest.fixture
def lesions_folder(tmp_path) -> Path:
    """2 sites of 4 2D NIfTI images each, with labels.csv (path,label,site)."""
    return generate_synthetic_dataset(tmp_path / "lesions", sites=2, per_site=4, size=32)


def zip_of(folder: Path, target: Path, *, prefix: str = "") -> Path:
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        for path in sorted(folder.rglob("*")):
            if path.is_file():
                archive.write(path, prefix + path.relative_to(folder).as_posix())
    return target


def tar_of(folder: Path, target: Path, *, mode: str = "w:gz") -> Path:
    with tarfile.open(target, mode) as archive:
        for path in sorted(folder.rglob("*")):
            archive.add(path, path.relative_to(folder).as_posix(), recursive=False)
    return target


def zip_with(target: Path, members: dict[str, bytes], folder: Path | None = None) -> Path:
    """A zip of `folder` (if given) plus extra members."""
    with zipfile.ZipFile(target, "w", zipfile.ZIP_DEFLATED) as archive:
        if folder is not None:
            for path in sorted(folder.rglob("*")):
                if path.is_file():
                    archive.write(path, path.relative_to(folder).as_posix())
        for name, data in members.items():
            archive.writestr(name, data)
    return target


def png_bytes(tmp_path: Path, name: str = "probe.png") -> bytes:
    image = ImageArray(
        array=np.arange(64, dtype=np.float32).reshape(8, 8),
        spacing=(1.0, 1.0),
        origin=(0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 1.0),
    )
    return write_image(image, tmp_path / name).read_bytes()


def upload(user, archive: Path | None, **fields):
    data = {"name": "uploaded", "modality": "CT", **fields}
    if archive is not None:
        data["archive"] = archive.open("rb")
    try:
        return client_for(user).post("/api/datasets/upload/", data, format="multipart")
    finally:
        if archive is not None:
            data["archive"].close()


def assert_refused(response, status: int, *, member: str | None, words: str) -> dict:
    assert response.status_code == status, response.content[:500]
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    assert words in body["detail"], body
    assert body["member"] == member, body
    return body


def nothing_kept(uploads_dir: Path) -> bool:
    return not uploads_dir.exists() or not any(path.is_file() for path in uploads_dir.rglob("*"))


# --- Success --------------------------------------------------------------------------------


@pytest.mark.django_db
def test_an_uploaded_zip_becomes_a_dataset_of_the_uploader_in_their_own_folder(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = zip_of(lesions_folder, tmp_path / "lesions.zip", prefix="lesions/")

    response = upload(uploader, archive, class_names="benign, lesion", description="tiny")

    assert response.status_code == 201, response.json()
    body = response.json()
    assert (body["owner"], body["name"], body["modality"]) == ("uploader", "uploaded", "CT")
    assert body["class_names"] == ["benign", "lesion"]
    assert (body["num_classes"], body["image_shape"], body["storage_format"]) == (
        2,
        [32, 32],
        "folder",
    )
    stored = Path(body["path"])
    assert stored.parent.parent == uploads_dir / f"user-{uploader.pk}"
    assert (stored / "labels.csv").read_bytes() == (lesions_folder / "labels.csv").read_bytes()
    assert Dataset.objects.get().owner == uploader


@pytest.mark.django_db
def test_an_uploaded_dataset_is_visible_to_its_uploader_only(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = tar_of(lesions_folder, tmp_path / "lesions.tar.gz")
    dataset_id = upload(uploader, archive).json()["id"]
    someone_else = UserFactory(username="someone-else")

    mine = client_for(uploader).get("/api/datasets/").json()["results"]
    theirs = client_for(someone_else).get("/api/datasets/").json()["results"]
    their_look = client_for(someone_else).get(f"/api/datasets/{dataset_id}/images/")

    assert [dataset["id"] for dataset in mine] == [dataset_id]
    assert theirs == []
    assert their_look.status_code == 404


@pytest.mark.django_db
def test_the_images_of_an_uploaded_dataset_are_read_through_the_viewer(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = tar_of(lesions_folder, tmp_path / "lesions.tar", mode="w")
    dataset_id = upload(uploader, archive).json()["id"]
    with (lesions_folder / "labels.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))

    listing = client_for(uploader).get(f"/api/datasets/{dataset_id}/images/?page_size=100")
    png = client_for(uploader).get(f"/api/datasets/{dataset_id}/images/0.png")

    assert listing.status_code == 200, listing.json()
    listed = listing.json()["results"]
    assert [(image["path"], str(image["label"])) for image in listed] == [
        (row["path"], row["label"]) for row in rows
    ]
    assert png.status_code == 200
    assert png.content.startswith(PNG_SIGNATURE)


@pytest.mark.django_db
def test_a_zip_of_png_images_with_mac_leftovers_is_accepted(uploader, uploads_dir, tmp_path):
    image = png_bytes(tmp_path)
    archive = zip_with(
        tmp_path / "pngs.zip",
        {
            "labels.csv": b"path,label\na.png,0\nb.png,1\n",
            "a.png": image,
            "b.png": image,
            "__MACOSX/._a.png": b"resource fork",
            ".DS_Store": b"finder",
        },
    )

    response = upload(uploader, archive)

    assert response.status_code == 201, response.json()
    stored = Path(response.json()["path"])
    assert sorted(path.name for path in stored.iterdir()) == ["a.png", "b.png", "labels.csv"]


def volume(side: int = 8) -> ImageArray:
    return ImageArray(
        array=np.arange(side**3, dtype=np.float32).reshape(side, side, side) % 100,
        spacing=(1.0, 1.0, 2.0),
        origin=(0.0, 0.0, 0.0),
        direction=(1.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 1.0),
    )


@pytest.mark.django_db
def test_dicom_series_with_and_without_extensions_and_single_file_formats_are_accepted(
    uploader, uploads_dir, tmp_path
):
    data = tmp_path / "mixed"
    for series in ("series-a", "series-b"):
        for path in write_dicom_series(volume(), data / series):
            if series == "series-b":  # scanners often write slices without an extension
                path.rename(path.with_suffix(""))
    write_image(volume(), data / "volume.mha")
    write_image(volume(), data / "volume.nrrd")
    (data / "labels.csv").write_text(
        "path,label\nseries-a,0\nseries-b,1\nvolume.mha,0\nvolume.nrrd,1\n"
    )
    archive = zip_of(data, tmp_path / "mixed.zip")

    response = upload(uploader, archive)

    assert response.status_code == 201, response.json()
    dataset_id = response.json()["id"]
    listing = client_for(uploader).get(f"/api/datasets/{dataset_id}/images/").json()["results"]
    assert [image["shape"] for image in listing] == [[8, 8, 8]] * 4


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("name", "header", "words"),
    [
        (
            "volume.mhd",
            b"ObjectType = Image\nNDims = 3\nDimSize = 8 8 8\nElementType = MET_FLOAT\n"
            b"ElementDataFile = volume.raw\n",
            "save it as one .mha file",
        ),
        (
            "volume.nrrd",
            b"NRRD0004\ntype: float\ndimension: 3\nsizes: 8 8 8\nencoding: raw\n"
            b"data file: /etc/shadow\n\n",
            "save it as one .nrrd file",
        ),
    ],
)
def test_an_image_whose_pixels_lie_in_another_file_is_refused(
    uploader, uploads_dir, tmp_path, name, header, words
):
    archive = zip_with(
        tmp_path / "detached.zip", {"labels.csv": f"path,label\n{name},0\n".encode(), name: header}
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member=name, words=words)


@pytest.mark.django_db
def test_an_upload_whose_form_a_middleware_read_first_is_still_unpacked(
    uploader, uploads_dir, tmp_path
):
    image = png_bytes(tmp_path)
    archive = zip_with(
        tmp_path / "small.zip",
        {"labels.csv": b"path,label\na.png,0\nb.png,1\n", "a.png": image, "b.png": image},
    )
    with archive.open("rb") as handle:
        request = APIRequestFactory().post(
            "/api/datasets/upload/", {"name": "read early", "archive": handle}, format="multipart"
        )
    assert "archive" in request.FILES  # read with Django's own handlers: kept in memory
    force_authenticate(request, user=uploader)

    response = DatasetUploadView.as_view()(request)

    assert response.status_code == 201, response.data
    assert Dataset.objects.get().name == "read early"


# --- Refusals -------------------------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize(
    "member",
    ["../escaped.png", "images/../../escaped.png", "/var/fedlens-escaped.png", "C:/escaped.png"],
)
def test_a_member_outside_the_archive_is_refused(
    uploader, uploads_dir, lesions_folder, tmp_path, member
):
    archive = zip_with(tmp_path / "evil.zip", {member: png_bytes(tmp_path)}, lesions_folder)

    response = upload(uploader, archive)

    assert_refused(response, 400, member=member, words="")
    assert nothing_kept(uploads_dir)
    assert not (uploads_dir.parent / "escaped.png").exists()
    assert not Path("/var/fedlens-escaped.png").exists()


@pytest.mark.django_db
def test_a_symbolic_link_in_a_tar_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    archive = tmp_path / "link.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(lesions_folder, "", recursive=True)
        link = tarfile.TarInfo("site-1/passwd.nii.gz")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tar.addfile(link)

    response = upload(uploader, archive)

    assert_refused(response, 400, member="site-1/passwd.nii.gz", words="symbolic link")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_hard_link_in_a_tar_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    archive = tmp_path / "hardlink.tar"
    with tarfile.open(archive, "w") as tar:
        tar.add(lesions_folder, "", recursive=True)
        link = tarfile.TarInfo("site-1/copy.nii.gz")
        link.type, link.linkname = tarfile.LNKTYPE, "site-1/img-0001.nii.gz"
        tar.addfile(link)

    response = upload(uploader, archive)

    assert_refused(response, 400, member="site-1/copy.nii.gz", words="hard link")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_symbolic_link_in_a_zip_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    archive = zip_with(tmp_path / "link.zip", {}, lesions_folder)
    with zipfile.ZipFile(archive, "a") as zipped:
        link = zipfile.ZipInfo("site-1/shadow.nii.gz")
        link.external_attr = (0o120777 << 16) | 0x20
        zipped.writestr(link, "/etc/shadow")

    response = upload(uploader, archive)

    assert_refused(response, 400, member="site-1/shadow.nii.gz", words="symbolic link")


@pytest.mark.django_db
def test_a_zip_bomb_is_refused_by_its_compression_ratio(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = zip_with(tmp_path / "bomb.zip", {"site-1/zeros.nii": ZEROS}, lesions_folder)
    assert archive.stat().st_size < len(ZEROS) / 100

    response = upload(uploader, archive)

    assert_refused(response, 413, member="site-1/zeros.nii", words="compression bomb")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_tar_gz_bomb_is_refused_before_its_member_is_written(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = tmp_path / "bomb.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(lesions_folder, "", recursive=True)
        zeros = tarfile.TarInfo("site-1/zeros.nii")
        zeros.size = len(ZEROS)
        tar.addfile(zeros, io.BytesIO(ZEROS))

    response = upload(uploader, archive)

    assert_refused(response, 413, member="site-1/zeros.nii", words="compression bomb")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_gzipped_nifti_bomb_inside_the_archive_is_refused(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    header = (lesions_folder / "site-1" / "img-0001.nii.gz").read_bytes()
    nifti_header = gzip.decompress(header)[:352]
    bomb = gzip.compress(nifti_header + ZEROS)
    # The zip itself is no bomb: the ratio hides inside the member's own gzip stream.
    archive = zip_with(
        tmp_path / "inner-bomb.zip",
        {"labels.csv": b"path,label\nbomb.nii.gz,0\n", "bomb.nii.gz": bomb},
    )

    response = upload(uploader, archive)

    assert_refused(response, 413, member="bomb.nii.gz", words="compression bomb")


@pytest.mark.django_db
def test_a_truncated_gzipped_nifti_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    whole = (lesions_folder / "site-1" / "img-0002.nii.gz").read_bytes()
    archive = zip_with(
        tmp_path / "cut.zip",
        {"labels.csv": b"path,label\ncut.nii.gz,0\n", "cut.nii.gz": whole[: len(whole) // 2]},
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="cut.nii.gz", words="truncated")


@pytest.mark.django_db
def test_a_text_file_named_like_an_image_is_refused(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = zip_with(
        tmp_path / "fake.zip", {"site-1/notes.png": b"not an image at all\n"}, lesions_folder
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="site-1/notes.png", words="not an image by its content")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_script_among_the_images_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    archive = zip_with(
        tmp_path / "script.zip", {"run.sh": b"#!/bin/sh\nrm -rf /\n"}, lesions_folder
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="run.sh", words="not an image by its content")


@pytest.mark.django_db
def test_a_member_name_that_is_not_utf8_is_refused_and_shown_escaped(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    archive = tmp_path / "latin1.tar"
    with tarfile.open(archive, "w", format=tarfile.GNU_FORMAT, encoding="latin-1") as tar:
        tar.add(lesions_folder, "", recursive=True)
        image = lesions_folder / "site-1" / "img-0001.nii.gz"
        tar.add(image, "site-1/r\xf6ntgen.nii.gz")

    response = upload(uploader, archive)

    body = assert_refused(
        response, 400, member="site-1/r\\udcf6ntgen.nii.gz", words="not UTF-8 text"
    )
    assert "rename it" in body["detail"]


@pytest.mark.django_db
def test_labels_that_are_not_utf8_text_are_refused(uploader, uploads_dir, tmp_path):
    image = png_bytes(tmp_path)
    archive = zip_with(
        tmp_path / "latin1.zip",
        {"labels.csv": "path,label\nr\xf6ntgen.png,0\n".encode("latin-1"), "r\xf6ntgen.png": image},
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="labels.csv", words="not UTF-8 text")


@pytest.mark.django_db
def test_an_image_named_as_another_format_is_refused(uploader, uploads_dir, tmp_path):
    archive = zip_with(
        tmp_path / "renamed.zip",
        {"labels.csv": b"path,label\nscan.nii.gz,0\n", "scan.nii.gz": png_bytes(tmp_path)},
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="scan.nii.gz", words="holds a PNG image but is named")


@pytest.mark.django_db
def test_a_png_with_a_damaged_header_is_refused(uploader, uploads_dir, tmp_path):
    damaged = PNG_SIGNATURE + b"\0" * 64
    archive = zip_with(
        tmp_path / "damaged.zip",
        {"labels.csv": b"path,label\nscan.png,0\n", "scan.png": damaged},
    )

    response = upload(uploader, archive)

    assert_refused(response, 400, member="scan.png", words="cannot be read as one")


@pytest.mark.django_db
def test_an_archive_larger_than_the_limit_is_refused_before_it_is_read(
    uploader, uploads_dir, settings, tmp_path
):
    settings.FEDLENS_MAX_UPLOAD_MB = 1
    archive = tmp_path / "large.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("noise.nii", os.urandom(2 * 1024 * 1024))

    response = upload(uploader, archive)

    assert response.status_code == 413
    assert "FEDLENS_MAX_UPLOAD_MB" in response.json()["detail"]
    assert nothing_kept(uploads_dir)


def test_the_upload_handler_stops_reading_past_the_limit_whatever_the_length_header_said(rf):
    handler = SizeCappedUploadHandler(rf.post("/api/datasets/upload/"), limit_bytes=1000)
    handler.new_file("archive", "a.zip", "application/zip", None)
    handler.receive_data_chunk(b"x" * 600, 0)

    with pytest.raises(UploadTooLarge):
        handler.receive_data_chunk(b"x" * 600, 600)


@pytest.mark.django_db
def test_an_archive_unpacking_beyond_the_size_limit_is_refused(
    uploader, uploads_dir, settings, lesions_folder, tmp_path
):
    settings.FEDLENS_UPLOAD_MAX_UNPACKED_MB = 1
    archive = tmp_path / "noise.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED) as zipped:
        zipped.writestr("a-noise.nii", os.urandom(700 * 1024))
        zipped.writestr("b-noise.nii", os.urandom(700 * 1024))

    response = upload(uploader, archive)

    assert_refused(response, 413, member="b-noise.nii", words="FEDLENS_UPLOAD_MAX_UNPACKED_MB")


@pytest.mark.django_db
def test_an_archive_with_too_many_files_is_refused(
    uploader, uploads_dir, settings, lesions_folder, tmp_path
):
    settings.FEDLENS_UPLOAD_MAX_FILES = 5
    archive = zip_of(lesions_folder, tmp_path / "lesions.zip")

    response = upload(uploader, archive)

    assert_refused(response, 413, member="site-2/img-0001.nii.gz", words="more than 5 files")


@pytest.mark.django_db
def test_an_archive_without_labels_is_refused(uploader, uploads_dir, lesions_folder, tmp_path):
    (lesions_folder / "labels.csv").unlink()
    archive = zip_of(lesions_folder, tmp_path / "unlabelled.zip")

    response = upload(uploader, archive)

    assert_refused(response, 400, member=None, words="no labels.csv")
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_labels_naming_a_missing_image_are_refused_without_server_paths(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    with (lesions_folder / "labels.csv").open("a") as handle:
        handle.write("site-1/missing.nii.gz,0,site-1\n")
    archive = zip_of(lesions_folder, tmp_path / "lesions.zip")

    response = upload(uploader, archive)

    body = assert_refused(response, 400, member=None, words="labels.csv:10")
    assert "missing.nii.gz not found" in body["detail"]
    assert str(uploads_dir) not in body["detail"]
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_a_file_that_is_no_archive_is_refused(uploader, uploads_dir, tmp_path):
    not_archive = tmp_path / "scan.zip"
    not_archive.write_bytes(b"just some bytes, not a zip or a tar")

    response = upload(uploader, not_archive)

    assert_refused(response, 400, member=None, words="not a zip or tar archive")


@pytest.mark.django_db
def test_a_taken_name_is_refused_before_anything_is_unpacked(
    uploader, uploads_dir, lesions_folder, tmp_path
):
    DatasetFactory(name="uploaded", owner=uploader)
    archive = zip_of(lesions_folder, tmp_path / "lesions.zip")

    response = upload(uploader, archive)

    assert response.status_code == 400
    assert "name" in response.json()
    assert nothing_kept(uploads_dir)


@pytest.mark.django_db
def test_an_upload_without_an_archive_says_so(uploader, uploads_dir):
    response = upload(uploader, None)

    assert response.status_code == 400
    assert "archive" in response.json()


@pytest.mark.django_db
def test_an_anonymous_upload_is_refused(uploads_dir, lesions_folder, tmp_path):
    archive = zip_of(lesions_folder, tmp_path / "lesions.zip")

    with archive.open("rb") as handle:
        response = client_for(None).post(
            "/api/datasets/upload/", {"name": "x", "archive": handle}, format="multipart"
        )

    assert response.status_code == 401
    assert nothing_kept(uploads_dir)


# --- Detection, the page and the schema -----------------------------------------------------


def test_image_formats_are_told_by_content_not_by_name(lesions_folder, tmp_path):
    renamed = tmp_path / "image.txt"
    renamed.write_bytes((lesions_folder / "site-1" / "img-0001.nii.gz").read_bytes())
    text = tmp_path / "image.nii.gz"
    text.write_text("path,label\n")

    assert detect_image_format(renamed).name == "gzipped NIfTI"
    assert detect_image_format(text) is None


@pytest.mark.django_db
def test_the_upload_page_has_a_file_input_and_is_linked_from_the_datasets_page(uploader):
    browser = Client()
    browser.force_login(uploader)

    datasets_page = browser.get("/datasets/")
    upload_page = browser.get("/datasets/upload/")

    assert datasets_page.status_code == 200
    assert 'href="/datasets/upload/"' in datasets_page.content.decode()
    page = upload_page.content.decode()
    assert upload_page.status_code == 200
    assert 'type="file"' in page and 'name="archive"' in page
    assert "/api/datasets/upload/" in page


@pytest.mark.django_db
def test_the_datasets_page_lists_only_the_users_own_datasets(uploader):
    DatasetFactory(name="mine", owner=uploader)
    DatasetFactory(name="not-mine", owner=UserFactory(username="other"))
    browser = Client()
    browser.force_login(uploader)

    page = browser.get("/datasets/").content.decode()

    assert "mine" in page
    assert "not-mine" not in page


@pytest.mark.django_db
def test_the_upload_endpoint_is_in_the_openapi_schema(uploader):
    schema = client_for(uploader).get("/api/schema/?format=json").json()

    operation = schema["paths"]["/api/datasets/upload/"]["post"]
    assert "multipart/form-data" in operation["requestBody"]["content"]
    assert {"201", "400", "413"} <= set(operation["responses"])


# --- In a real browser, against a real server -----------------------------------------------


@pytest.fixture
def upload_server(tmp_path):
    """FedLens under uvicorn (embedded mode) with one user and no dataset."""
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path / "server"),
        DJANGO_SUPERUSER_PASSWORD=PASSWORD,
    )
    manage(env, "migrate", "--noinput")
    manage(env, "createsuperuser", "--noinput", "--username", "ana", "--email", "ana@x.org")
    fedlens = Server(env)
    fedlens.start()
    yield fedlens
    fedlens.stop()


@pytest.fixture
def chromium():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--no-first-run",
                 "--window-size=1400,1400"):  # fmt: skip
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def sign_in(browser, server) -> None:
    browser.get(f"{server.url}/accounts/login/")
    browser.find_element(By.ID, "id_username").send_keys("ana")
    browser.find_element(By.ID, "id_password").send_keys(PASSWORD)
    browser.find_element(By.CSS_SELECTOR, "form.login button").click()
    WebDriverWait(browser, 20).until(lambda d: d.find_elements(By.LINK_TEXT, "Datasets"))


def send_archive(browser, archive: Path, name: str) -> None:
    browser.find_element(By.ID, "archive").send_keys(str(archive))
    browser.find_element(By.ID, "name").send_keys(name)
    browser.find_element(By.ID, "class_names").send_keys("benign, lesion")
    browser.find_element(By.ID, "upload-button").click()


@pytest.mark.browser
@pytest.mark.skipif(
    not (Path(CHROMIUM).exists() and Path(CHROMEDRIVER).exists())
    and os.environ.get("CI", "").lower() != "true",
    reason="needs Debian's chromium and chromium-driver (`make system-packages` installs them)",
)
def test_a_user_uploads_a_dataset_from_the_page_and_browses_its_images(
    upload_server, chromium, lesions_folder, tmp_path
):
    browser = chromium
    good = zip_of(lesions_folder, tmp_path / "lesions.zip", prefix="lesions/")
    bad = zip_with(tmp_path / "bad.zip", {"site-1/notes.png": b"just text\n"}, lesions_folder)
    sign_in(browser, upload_server)
    browser.find_element(By.LINK_TEXT, "Datasets").click()
    browser.find_element(By.ID, "upload-link").click()

    send_archive(browser, bad, "refused")
    WebDriverWait(browser, 30).until(lambda d: d.find_element(By.ID, "upload-error").is_displayed())
    refusal = browser.find_element(By.ID, "upload-error").text
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    browser.save_screenshot(str(SCREENSHOTS / "upload-refused.png"))
    browser.find_element(By.ID, "name").clear()
    browser.find_element(By.ID, "class_names").clear()
    send_archive(browser, good, "uploaded lesions")
    WebDriverWait(browser, 60).until(lambda d: "/viewer/" in d.current_url)
    WebDriverWait(browser, 30).until(
        lambda d: len(d.find_elements(By.CSS_SELECTOR, "#image-list img")) == 8
    )
    browser.save_screenshot(str(SCREENSHOTS / "uploaded-dataset.png"))
    browser.get(f"{upload_server.url}/datasets/")
    browser.save_screenshot(str(SCREENSHOTS / "datasets-page.png"))

    assert "site-1/notes.png" in refusal and "not an image by its content" in refusal
    assert "uploaded lesions" in browser.find_element(By.ID, "datasets").text
    assert "refused" not in browser.find_element(By.ID, "datasets").text
