"""API tokens that expire and are revoked, the WebSocket's token kept out of URLs and logs,
login lockout (django-axes) and request throttling (DRF)."""

import logging
import subprocess
import sys
import time
import urllib.request
from datetime import timedelta

import pytest
import time_machine
from asgiref.sync import async_to_sync
from django.core.cache import cache
from django.utils import timezone
from knox.models import AuthToken

from tests.conftest import PROJECT_ROOT, free_port, needs_redis, service_env, stop_process
from tests.factories import ExperimentFactory, UserFactory, api_token
from tests.test_settings import PRODUCTION_ENV
from tests.test_settings import manage as settings_manage
from tests.test_stream import close_code, connect, first_message
from visualization.auth import TOKEN_IN_URL_CLOSE_CODE, TOKEN_SUBPROTOCOL

pytestmark = pytest.mark.django_db
PASSWORD = "correct horse battery staple"


def sign_in(api_client, username: str, password: str = PASSWORD):
    return api_client.post("/api/auth/token/", {"username": username, "password": password})


def with_token(api_client, token: str):
    api_client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    return api_client


# --- Tokens ------------------------------------------------------------------------------


def test_each_sign_in_gives_a_new_token_with_its_expiry(api_client, settings):
    UserFactory(username="ana")

    first, second = sign_in(api_client, "ana"), sign_in(api_client, "ana")

    assert first.status_code == second.status_code == 200
    assert first.json()["token"] != second.json()["token"]
    expiry = timezone.datetime.fromisoformat(first.json()["expiry"])
    expected = timezone.now() + settings.REST_KNOX["TOKEN_TTL"]
    assert abs((expiry - expected).total_seconds()) < 60
    # Only the hash is stored: the database does not hold the token.
    assert not AuthToken.objects.filter(digest=first.json()["token"]).exists()


def test_a_token_stops_working_when_it_expires(api_client, settings):
    settings.REST_KNOX = {**settings.REST_KNOX, "TOKEN_TTL": timedelta(minutes=5)}
    UserFactory(username="ana")
    with time_machine.travel(timezone.now(), tick=False) as clock:
        token = sign_in(api_client, "ana").json()["token"]
        with_token(api_client, token)
        clock.shift(timedelta(minutes=4))
        assert api_client.get("/api/experiments/").status_code == 200

        clock.shift(timedelta(minutes=2))
        response = api_client.get("/api/experiments/")

    assert response.status_code == 401
    assert not AuthToken.objects.exists()  # an expired token is deleted when presented


def test_a_password_change_revokes_every_token_of_the_user(api_client):
    ana = UserFactory(username="ana")
    other = UserFactory(username="bo")
    tokens = [api_token(ana), api_token(ana)]
    others_token = api_token(other)

    ana.set_password("a brand new passphrase")
    ana.save()

    for token in tokens:
        assert with_token(api_client, token).get("/api/experiments/").status_code == 401
    assert with_token(api_client, others_token).get("/api/experiments/").status_code == 200


def test_saving_a_user_without_a_new_password_keeps_their_tokens(api_client):
    ana = UserFactory(username="ana")
    token = api_token(ana)

    ana.email = "ana@example.com"
    ana.save()

    assert with_token(api_client, token).get("/api/experiments/").status_code == 200


def test_signing_out_ends_that_token_only_and_all_ends_every_one(api_client):
    ana = UserFactory(username="ana")
    kept, ended, another = api_token(ana), api_token(ana), api_token(ana)

    assert with_token(api_client, ended).post("/api/auth/logout/").status_code == 204
    assert with_token(api_client, ended).get("/api/experiments/").status_code == 401
    assert with_token(api_client, kept).get("/api/experiments/").status_code == 200

    assert with_token(api_client, kept).post("/api/auth/logout/?all=true").status_code == 204
    assert with_token(api_client, another).get("/api/experiments/").status_code == 401


def test_a_wrong_password_gets_no_token_and_says_nothing_of_the_account(api_client):
    UserFactory(username="ana")

    wrong_password = sign_in(api_client, "ana", "guess")
    no_such_user = sign_in(api_client, "nobody", "guess")

    assert wrong_password.status_code == no_such_user.status_code == 400
    assert wrong_password.json() == no_such_user.json()
    assert not AuthToken.objects.exists()


# --- WebSocket ---------------------------------------------------------------------------


@pytest.mark.django_db(transaction=True)
def test_a_token_offered_as_subprotocol_opens_the_stream_and_the_server_names_it():
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    listener = connect(f"/ws/experiments/{experiment.pk}/", token=api_token(owner))

    async def handshake():
        connected, subprotocol = await listener.connect()
        snapshot = await listener.receive_json_from(timeout=5)
        await listener.disconnect()
        return connected, subprotocol, snapshot

    connected, subprotocol, snapshot = async_to_sync(handshake)()

    assert connected
    assert subprotocol == TOKEN_SUBPROTOCOL
    assert snapshot["type"] == "snapshot"


@pytest.mark.django_db(transaction=True)
def test_a_token_in_the_url_is_refused_even_when_it_is_valid():
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    token = api_token(owner)

    code = async_to_sync(close_code)(connect(f"/ws/experiments/{experiment.pk}/?token={token}"))

    assert code == TOKEN_IN_URL_CLOSE_CODE


@pytest.mark.django_db(transaction=True)
def test_an_expired_token_does_not_open_the_stream(settings):
    settings.REST_KNOX = {**settings.REST_KNOX, "TOKEN_TTL": timedelta(minutes=5)}
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    with time_machine.travel(timezone.now(), tick=False) as clock:
        token = api_token(owner)
        assert async_to_sync(first_message)(
            connect(f"/ws/experiments/{experiment.pk}/", token=token)
        )["first"]["type"] == "snapshot"  # fmt: skip
        clock.shift(timedelta(minutes=6))

        code = async_to_sync(close_code)(connect(f"/ws/experiments/{experiment.pk}/", token=token))

    assert code == 4401


def test_secrets_in_query_strings_are_blanked_in_every_log_handler(settings):
    """The filter sits on every handler, so uvicorn's lines pass through it too."""
    from flproject.observability.logs import RedactSecretsFilter

    assert all("redact" in handler["filters"] for handler in settings.LOGGING["handlers"].values())
    record = logging.LogRecord(
        "uvicorn.error", logging.INFO, __file__, 1, '%s - "WebSocket %s" [accepted]',
        ("127.0.0.1:5000", "/ws/experiments/1/?page=2&token=s3cr3t-value"), None,
    )  # fmt: skip

    RedactSecretsFilter().filter(record)

    assert "s3cr3t-value" not in record.getMessage()
    assert "?page=2&token=[redacted]" in record.getMessage()


@pytest.mark.django_db(transaction=True)
def test_a_real_server_refuses_a_token_in_the_url_and_logs_no_token(tmp_path):
    """uvicorn prints every WebSocket URL it serves; the token must not reach its log."""
    import websockets.sync.client

    port = free_port()
    log_file = tmp_path / "server.log"
    env = service_env(LOG_FORMAT="plain", LOG_LEVEL="INFO")
    with log_file.open("w") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "flproject.asgi:application", "--port", str(port)],
            cwd=PROJECT_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    secret = "do-not-log-" + "x" * 40
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                assert time.monotonic() < deadline, log_file.read_text()
                time.sleep(0.3)
        url = f"ws://127.0.0.1:{port}/ws/experiments/1/?token={secret}"
        with (
            websockets.sync.client.connect(url, open_timeout=10) as socket,
            pytest.raises(websockets.ConnectionClosed) as closed,
        ):
            socket.recv(timeout=10)
    finally:
        stop_process(server)

    assert closed.value.rcvd.code == TOKEN_IN_URL_CLOSE_CODE
    log = log_file.read_text()
    assert "token=[redacted]" in log
    assert secret not in log


# --- Lockout (django-axes) ---------------------------------------------------------------


@pytest.fixture
def lockout_after_three(settings):
    settings.AXES_FAILURE_LIMIT = 3
    settings.AXES_COOLOFF_TIME = timedelta(minutes=15)


def test_the_api_locks_a_username_out_after_too_many_wrong_passwords(
    api_client, lockout_after_three
):
    UserFactory(username="ana")

    wrong = [sign_in(api_client, "ana", f"guess-{n}").status_code for n in range(3)]
    locked = sign_in(api_client, "ana")  # the right password, but too late

    # The third failure is the one that locks: it is answered as a lockout already.
    assert wrong == [400, 400, 429]
    assert locked.status_code == 429
    assert locked["Content-Type"] == "application/json"
    assert "Too many failed sign-ins" in locked.json()["detail"]
    assert "15 minutes" in locked.json()["detail"]
    assert not AuthToken.objects.exists()
    # Another username from the same address is not locked.
    UserFactory(username="bo")
    assert sign_in(api_client, "bo").status_code == 200


def test_the_lockout_ends_after_the_cool_off(api_client, lockout_after_three):
    UserFactory(username="ana")
    with time_machine.travel(timezone.now(), tick=False) as clock:
        for n in range(3):
            sign_in(api_client, "ana", f"guess-{n}")
        assert sign_in(api_client, "ana").status_code == 429

        clock.shift(timedelta(minutes=16))

        assert sign_in(api_client, "ana").status_code == 200


@pytest.mark.parametrize("url", ["/accounts/login/", "/admin/login/"])
def test_the_login_page_and_the_admin_lock_out_too(client, lockout_after_three, url):
    UserFactory(username="ana", is_staff=True)
    wrong = [client.post(url, {"username": "ana", "password": f"guess-{n}"}).status_code
             for n in range(3)]  # fmt: skip

    locked = client.post(url, {"username": "ana", "password": PASSWORD})

    assert wrong == [200, 200, 429]  # the form again with its error, then the lockout

    assert locked.status_code == 429
    assert "Too many failed sign-ins" in locked.content.decode()
    assert "_auth_user_id" not in client.session


# --- Throttling (DRF) --------------------------------------------------------------------


@pytest.fixture
def low_rates(settings):
    """Low rates for this test only; the cache holds the counts."""
    cache.clear()
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {
            **settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"],
            "anon": "4/minute",
            "user": "5/minute",
            "login": "3/minute",
        },
    }
    yield
    cache.clear()


def test_a_user_beyond_their_rate_gets_429_json_with_retry_after(api_client, low_rates):
    with_token(api_client, api_token(UserFactory()))

    answers = [api_client.get("/api/experiments/") for _ in range(6)]

    assert [answer.status_code for answer in answers] == [200] * 5 + [429]
    assert answers[-1]["Content-Type"] == "application/json"
    assert "throttled" in answers[-1].json()["detail"].lower()
    assert int(answers[-1]["Retry-After"]) > 0


def test_each_user_has_a_rate_of_their_own(api_client, low_rates):
    first, second = api_token(UserFactory()), api_token(UserFactory())
    for _ in range(5):
        with_token(api_client, first).get("/api/experiments/")

    assert with_token(api_client, first).get("/api/experiments/").status_code == 429
    assert with_token(api_client, second).get("/api/experiments/").status_code == 200


def test_sign_ins_have_a_stricter_rate(api_client, low_rates):
    UserFactory(username="ana")

    answers = [sign_in(api_client, "ana").status_code for _ in range(4)]

    assert answers == [200, 200, 200, 429]


def test_anonymous_requests_are_counted_per_address(api_client, low_rates, settings):
    """Anonymous requests reach a throttle where no login is needed (elsewhere: 401)."""
    rates = settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]
    settings.REST_FRAMEWORK = {
        **settings.REST_FRAMEWORK,
        "DEFAULT_THROTTLE_RATES": {**rates, "login": "100/minute"},
    }

    answers = [sign_in(api_client, "nobody", "guess").status_code for _ in range(5)]

    assert answers == [400] * 4 + [429]


# --- Settings ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("env", "sentence"),
    [
        ({"FEDLENS_THROTTLE_USER": "lots"}, "FEDLENS_THROTTLE_USER must be a number of requests"),
        ({"FEDLENS_THROTTLE_LOGIN": "5/fortnight"}, "FEDLENS_THROTTLE_LOGIN must be a number"),
        ({"FEDLENS_DEFAULT_ROLE": "admin"}, "FEDLENS_DEFAULT_ROLE must be researcher or viewer"),
        ({"FEDLENS_API_TOKEN_HOURS": "0"}, "FEDLENS_API_TOKEN_HOURS must be a whole number"),
        ({"FEDLENS_LOGIN_FAILURE_LIMIT": "x"}, "FEDLENS_LOGIN_FAILURE_LIMIT must be a whole"),
    ],
)
def test_a_bad_people_setting_stops_start_up_naming_it(env, sentence):
    result = settings_manage("check", DJANGO_SETTINGS_MODULE="flproject.settings.local", **env)

    assert result.returncode != 0
    assert result.stderr.strip().startswith(f"FedLens cannot start: {sentence}")


SET_COUNT = "from django.core.cache import cache; cache.set('throttle-probe', 7, 60)"
GET_COUNT = "from django.core.cache import cache; print(cache.get('throttle-probe'))"


@needs_redis
def test_production_processes_share_their_request_counts(settings):
    """uvicorn's workers are processes: a count kept in one must be seen by the others."""
    env = {**PRODUCTION_ENV, "REDIS_URL": settings.REDIS_URL}

    writer = settings_manage("shell", "--no-imports", "-c", SET_COUNT, **env)
    reader = settings_manage("shell", "--no-imports", "-c", GET_COUNT, **env)

    assert writer.returncode == 0, writer.stderr
    assert reader.stdout.strip() == "7", reader.stderr
