"""Bad input gets a 4xx JSON answer that says what to fix, never a 500 or an HTML page."""

import csv
import json
import urllib.error
import urllib.request

import pytest
from asgiref.sync import async_to_sync
from channels.testing import WebsocketCommunicator
from django.test import Client
from rest_framework.test import APIClient
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect as websocket_connect

from flproject.websocket_routes import websocket_application
from tests.conftest import client_for, service_env
from tests.factories import CheckpointFactory, DatasetFactory, ExperimentFactory, UserFactory
from tests.test_browser import Server, manage
from training.fl.data import generate_synthetic_dataset
from training.models import Dataset

# One more than the csv module's default field limit (128 KiB).
OVERSIZED_CELL = "x" * (128 * 1024 + 1)


def nested_json(depth: int) -> str:
    return "[" * depth + "]" * depth


def assert_json_error(response, status: int) -> dict:
    assert response.status_code == status, response.content[:300]
    assert response["Content-Type"].startswith("application/json"), response["Content-Type"]
    body = response.json()
    assert isinstance(body.get("detail"), str) and body["detail"], body
    return body


@pytest.fixture
def owner(db):
    return UserFactory(username="owner")


@pytest.fixture
def dataset_with_an_oversized_cell(dataset_root, owner):
    """The synthetic dataset whose labels.csv gets a 5th row with a path cell over 128 KiB."""
    folder = generate_synthetic_dataset(dataset_root / "lesions", sites=1, per_site=4, size=32)
    with (folder / "labels.csv").open("a", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerow((OVERSIZED_CELL, 0, "site-1"))
    return DatasetFactory(owner=owner, path=str(folder), image_shape=[32, 32])


VIEWER_ENDPOINTS = [
    "/api/datasets/{id}/images/",
    "/api/datasets/{id}/images/0/",
    "/api/datasets/{id}/images/0.png",
    "/api/datasets/{id}/images/0/prediction/?checkpoint={checkpoint}",
    "/api/datasets/{id}/statistics/",
]


@pytest.mark.django_db
@pytest.mark.parametrize("endpoint", VIEWER_ENDPOINTS)
def test_a_labels_file_with_a_cell_over_128_kib_is_a_conflict_naming_the_file_and_line(
    owner, dataset_with_an_oversized_cell, endpoint
):
    dataset = dataset_with_an_oversized_cell
    checkpoint = CheckpointFactory(experiment=ExperimentFactory(owner=owner, dataset=dataset))
    url = endpoint.format(id=dataset.pk, checkpoint=checkpoint.pk)

    response = client_for(owner).get(url)

    detail = assert_json_error(response, 409)["detail"]
    assert "labels.csv:6" in detail
    assert "longer than" in detail


@pytest.mark.django_db
def test_the_viewer_page_of_a_labels_file_with_an_oversized_cell_says_what_is_wrong(
    owner, dataset_with_an_oversized_cell
):
    browser = Client()
    browser.force_login(owner)

    response = browser.get(f"/datasets/{dataset_with_an_oversized_cell.pk}/viewer/")

    assert response.status_code == 200
    assert "labels.csv:6" in response.content.decode()


@pytest.mark.django_db
def test_deeply_nested_json_to_the_anonymous_token_endpoint_is_a_bad_request():
    response = APIClient().post(
        "/api/auth/token/", nested_json(100_000), content_type="application/json"
    )

    assert "nested" in assert_json_error(response, 400)["detail"]


@pytest.mark.django_db
def test_deeply_nested_json_to_an_api_endpoint_is_a_bad_request(owner):
    response = client_for(owner).post(
        "/api/experiments/",
        '{"name": "x", "network_params": ' + nested_json(100_000) + "}",
        content_type="application/json",
    )

    assert "nested" in assert_json_error(response, 400)["detail"]


@pytest.mark.django_db
def test_json_nested_just_within_the_limit_is_parsed(owner, settings):
    settings.FEDLENS_MAX_JSON_DEPTH = 8
    payload = '{"name": "x", "network_params": ' + nested_json(7) + "}"

    response = client_for(owner).post("/api/experiments/", payload, content_type="application/json")

    # Parsed: the serializer answers about the fields, not about the nesting.
    body = assert_json_error_fields(response)
    assert "dataset" in body


@pytest.mark.django_db
def test_json_nested_one_level_beyond_the_limit_is_refused(owner, settings):
    settings.FEDLENS_MAX_JSON_DEPTH = 8
    payload = '{"name": "x", "network_params": ' + nested_json(8) + "}"

    response = client_for(owner).post("/api/experiments/", payload, content_type="application/json")

    assert "nested more than 8" in assert_json_error(response, 400)["detail"]


def assert_json_error_fields(response) -> dict:
    assert response.status_code == 400, response.content[:300]
    assert response["Content-Type"].startswith("application/json")
    return response.json()


@pytest.mark.django_db
def test_a_lone_surrogate_in_a_json_value_is_a_bad_request(owner, dataset_root):
    # class_names is a JSON column: no CharField validator sees its strings before the database.
    payload = json.dumps(
        {"name": "scans", "num_classes": 2, "storage_format": "folder", "path": str(dataset_root)}
    )
    payload = payload[:-1] + ', "class_names": ["benign", "lesion\\ud800"]}'

    response = client_for(owner).post("/api/datasets/", payload, content_type="application/json")

    assert "surrogate" in assert_json_error(response, 400)["detail"]
    assert not Dataset.objects.exists()


@pytest.mark.django_db
def test_a_lone_surrogate_in_a_json_key_is_a_bad_request(owner):
    response = client_for(owner).post(
        "/api/experiments/", '{"\\udc00": 1}', content_type="application/json"
    )

    assert "surrogate" in assert_json_error(response, 400)["detail"]


@pytest.mark.django_db
def test_a_lone_surrogate_in_the_username_of_a_token_request_is_a_bad_request():
    response = APIClient().post(
        "/api/auth/token/",
        '{"username": "\\ud83d", "password": "x"}',
        content_type="application/json",
    )

    assert "surrogate" in assert_json_error(response, 400)["detail"]


@pytest.mark.django_db
def test_a_surrogate_pair_is_an_ordinary_character(owner):
    response = client_for(owner).post(
        "/api/experiments/", '{"name": "\\ud83d\\ude00"}', content_type="application/json"
    )

    body = assert_json_error_fields(response)
    assert "name" not in body  # the emoji is a valid name; other fields are missing


@pytest.mark.django_db
@pytest.mark.parametrize(
    ("content_type", "body"),
    [
        ("application/json", b'{"name": "' + b"x" * (20 * 1024 * 1024) + b'"}'),
        ("application/x-www-form-urlencoded", b"name=" + b"x" * (20 * 1024 * 1024)),
    ],
    ids=["json", "form"],
)
def test_a_20_mb_body_is_refused_with_413_json(owner, content_type, body):
    response = client_for(owner).post("/api/experiments/", body, content_type=content_type)

    detail = assert_json_error(response, 413)["detail"]
    assert "FEDLENS_MAX_REQUEST_MB" in detail


@pytest.mark.django_db
def test_a_20_mb_multipart_field_is_refused_with_413_json(owner):
    response = client_for(owner).post(
        "/api/experiments/", {"name": "x" * (20 * 1024 * 1024)}, format="multipart"
    )

    assert "FEDLENS_MAX_REQUEST_MB" in assert_json_error(response, 413)["detail"]


@pytest.mark.django_db
def test_a_20_mb_body_to_the_anonymous_token_endpoint_is_refused_with_413_json():
    response = APIClient().post(
        "/api/auth/token/", b"x" * (20 * 1024 * 1024), content_type="application/json"
    )

    assert_json_error(response, 413)


@pytest.mark.django_db
def test_a_body_within_the_limit_is_read(owner, settings):
    settings.FEDLENS_MAX_REQUEST_MB = 1
    settings.DATA_UPLOAD_MAX_MEMORY_SIZE = 1024 * 1024
    body = json.dumps({"name": "x" * (1024 * 1024 - 100)})

    response = client_for(owner).post("/api/experiments/", body, content_type="application/json")

    assert "name" in assert_json_error_fields(response)  # too long for the field, but parsed


@pytest.mark.django_db
def test_too_many_form_fields_are_refused_with_json(owner):
    body = "&".join(f"field{number}=1" for number in range(5000))

    response = client_for(owner).post(
        "/api/experiments/", body, content_type="application/x-www-form-urlencoded"
    )

    assert "fields" in assert_json_error(response, 400)["detail"]


@pytest.mark.django_db
def test_an_unknown_api_path_is_a_json_404(owner):
    response = client_for(owner).get("/api/no-such-thing/")

    assert_json_error(response, 404)


@pytest.mark.django_db
def test_an_unknown_page_is_still_an_html_404(owner):
    browser = Client()
    browser.force_login(owner)

    response = browser.get("/no-such-page/")

    assert response.status_code == 404
    assert response["Content-Type"].startswith("text/html")


@pytest.mark.django_db
def test_an_error_escaping_an_api_view_is_a_json_500_without_details(rf):
    from flproject.api_errors import server_error

    response = server_error(rf.get("/api/experiments/"))

    assert response.status_code == 500
    assert response["Content-Type"].startswith("application/json")
    assert "Traceback" not in response.content.decode()


async def close_code_of(path: str) -> int:
    communicator = WebsocketCommunicator(websocket_application(), path)
    connected, _ = await communicator.connect()
    assert connected  # accepted first, so that the browser sees the close code
    message = await communicator.receive_output(timeout=5)
    await communicator.disconnect()
    assert message["type"] == "websocket.close"
    return message["code"]


@pytest.mark.django_db(transaction=True)
def test_an_unknown_websocket_path_is_closed_with_4404_and_nothing_logged_as_an_error(caplog):
    code = async_to_sync(close_code_of)("/ws/no-such-stream/")

    assert code == 4404
    assert not [record for record in caplog.records if record.levelname in {"ERROR", "CRITICAL"}]


@pytest.mark.django_db(transaction=True)
def test_a_known_websocket_path_still_reaches_its_consumer():
    experiment = ExperimentFactory()

    # Anonymous: the experiment's own consumer closes with its "sign in" code.
    assert async_to_sync(close_code_of)(f"/ws/experiments/{experiment.pk}/") == 4401


# --- Through a real server: uvicorn, Django's ASGI handler and Channels ---------------------


@pytest.fixture
def served(tmp_path):
    env = service_env(
        DJANGO_SETTINGS_MODULE="flproject.settings.local",
        DATABASE_URL=None,
        REDIS_URL=None,
        FEDLENS_DATA_DIR=str(tmp_path),
        LOG_FORMAT="plain",
    )
    manage(env, "migrate", "--noinput")
    server = Server(env)
    server.start()
    yield server
    server.stop()


def post_to(server, path: str, body: bytes) -> tuple[int, str, dict]:
    request = urllib.request.Request(  # noqa: S310 - the test's own server
        f"{server.url}{path}", data=body, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:  # noqa: S310 - local
            return answer.status, answer.headers["Content-Type"], json.loads(answer.read())
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], json.loads(error.read())


def test_a_real_server_answers_bad_bodies_with_json_and_closes_unknown_sockets(served):
    too_large = post_to(served, "/api/auth/token/", b"[" + b"0," * (10 * 1024 * 1024) + b"0]")
    too_deep = post_to(served, "/api/auth/token/", nested_json(100_000).encode())
    with (
        websocket_connect(f"ws://127.0.0.1:{served.port}/ws/no-such-stream/") as socket,
        pytest.raises(ConnectionClosed) as closed,
    ):
        socket.recv(timeout=10)
    served.stop()
    log = served.log.read_text(errors="replace")

    assert too_large[0] == 413 and too_large[1] == "application/json"
    assert "FEDLENS_MAX_REQUEST_MB" in too_large[2]["detail"]
    assert too_deep[0] == 400 and "nested" in too_deep[2]["detail"]
    assert closed.value.rcvd.code == 4404
    assert "Exception" not in log and "Traceback" not in log, log
