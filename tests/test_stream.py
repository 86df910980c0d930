"""The experiment stream: who may listen, the snapshot first, then events in order."""

import asyncio
import contextlib
import time
import uuid

import pytest
from asgiref.sync import async_to_sync
from channels.auth import AuthMiddlewareStack
from channels.layers import get_channel_layer
from channels.routing import URLRouter
from channels.testing import WebsocketCommunicator
from django.conf import settings
from django.db import connection

from tests.conftest import WorkerProcess, needs_redis, new_experiment
from tests.factories import ExperimentFactory, RoundFactory, UserFactory, api_token
from training import services
from visualization.auth import (
    TOKEN_SUBPROTOCOL,
    TokenAuthMiddleware,
    allowed_hosts_origin_validator,
)
from visualization.events import publish
from visualization.routing import websocket_urlpatterns

# The WebSocket half of flproject.asgi.application.
application = allowed_hosts_origin_validator(
    AuthMiddlewareStack(TokenAuthMiddleware(URLRouter(websocket_urlpatterns)))
)


# Longer than two of the channel layer's 5 s blocking pops.
QUIET_SECONDS = 11


def connect(path: str, headers=None, *, token: str | None = None) -> WebsocketCommunicator:
    """A client of the stream; with a token, sent as the subprotocol API clients use."""
    subprotocols = [TOKEN_SUBPROTOCOL, token] if token is not None else None
    return WebsocketCommunicator(
        application, path, headers=headers or [], subprotocols=subprotocols
    )


async def close_code(communicator: WebsocketCommunicator) -> int:
    connected, _ = await communicator.connect()
    assert connected
    message = await communicator.receive_output(timeout=5)
    await communicator.disconnect()
    assert message["type"] == "websocket.close"
    return message["code"]


@pytest.mark.django_db(transaction=True)
def test_a_page_of_another_site_cannot_open_the_stream():
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    evil_origin = [(b"origin", b"https://evil.example.com")]
    listener = connect(f"/ws/experiments/{experiment.pk}/", evil_origin, token=api_token(owner))

    connected, _ = async_to_sync(listener.connect)()

    assert not connected


@pytest.mark.django_db(transaction=True)
def test_a_page_of_this_site_may_open_the_stream(client):
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    client.force_login(owner)
    headers = [(b"origin", b"http://localhost"),
               (b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]  # fmt: skip

    messages = async_to_sync(first_message)(connect(f"/ws/experiments/{experiment.pk}/", headers))

    assert messages["first"]["type"] == "snapshot"


@pytest.mark.django_db(transaction=True)
def test_a_visitor_without_login_is_refused_with_4401():
    experiment = ExperimentFactory()

    code = async_to_sync(close_code)(connect(f"/ws/experiments/{experiment.pk}/"))

    assert code == 4401


@pytest.mark.django_db(transaction=True)
def test_a_user_who_may_not_see_the_experiment_is_refused_with_4403():
    experiment = ExperimentFactory()
    stranger = api_token(UserFactory())

    code = async_to_sync(close_code)(connect(f"/ws/experiments/{experiment.pk}/", token=stranger))

    assert code == 4403


@pytest.mark.django_db(transaction=True)
def test_an_unknown_experiment_is_refused_with_4403():
    token = api_token(UserFactory())

    assert async_to_sync(close_code)(connect("/ws/experiments/999999/", token=token)) == 4403


@pytest.mark.django_db(transaction=True)
def test_a_wrong_token_is_refused_with_4401():
    experiment = ExperimentFactory()

    code = async_to_sync(close_code)(connect(f"/ws/experiments/{experiment.pk}/", token="nope"))

    assert code == 4401


async def first_message(communicator: WebsocketCommunicator) -> dict:
    connected, _ = await communicator.connect()
    assert connected
    message = await communicator.receive_json_from(timeout=5)
    await communicator.send_json_to({"type": "ping"})
    pong = await communicator.receive_json_from(timeout=5)
    await communicator.disconnect()
    return {"first": message, "pong": pong}


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("how", ["subprotocol", "header", "session"])
def test_a_member_first_receives_a_snapshot_of_the_ledger(how, client):
    member = UserFactory()
    experiment = ExperimentFactory(members=[member], status="running", current_round=2)
    RoundFactory(experiment=experiment, number=1, status="closed", metrics={"global": None})
    RoundFactory(experiment=experiment, number=2)
    path, headers, token = f"/ws/experiments/{experiment.pk}/", [], None
    if how == "subprotocol":
        token = api_token(member)
    elif how == "header":
        headers = [(b"authorization", f"Token {api_token(member)}".encode())]
    else:
        client.force_login(member)
        headers = [(b"cookie", f"sessionid={client.cookies['sessionid'].value}".encode())]

    messages = async_to_sync(first_message)(connect(path, headers, token=token))

    snapshot = messages["first"]
    assert snapshot["type"] == "snapshot"
    assert snapshot["experiment"]["id"] == experiment.pk
    assert snapshot["experiment"]["status"] == "running"
    assert [r["number"] for r in snapshot["rounds"]] == [1, 2]
    assert messages["pong"] == {"type": "pong"}


@pytest.mark.django_db(transaction=True)
def test_published_events_reach_every_listener():
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    token = api_token(owner)

    async def listen_twice():
        listeners = [connect(f"/ws/experiments/{experiment.pk}/", token=token)
                     for _ in range(2)]  # fmt: skip
        for listener in listeners:
            await listener.connect()
            assert (await listener.receive_json_from(timeout=5))["type"] == "snapshot"
        await asyncio.get_running_loop().run_in_executor(
            None, publish, experiment.pk, {"type": "round.opened", "round": {"number": 1}}
        )
        received = [await listener.receive_json_from(timeout=5) for listener in listeners]
        for listener in listeners:
            await listener.disconnect()
        return received

    received = async_to_sync(listen_twice)()

    assert received == [{"type": "round.opened", "round": {"number": 1}}] * 2


@needs_redis
@pytest.mark.django_db(transaction=True)
def test_a_listener_still_hears_events_after_a_quiet_spell():
    """The Redis channel layer waits for messages in 5 s blocking pops; a client socket
    timeout no longer than that (redis-py 8's default is 5 s) broke quiet connections."""
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    token = api_token(owner)

    async def listen_after_silence():
        listener = connect(f"/ws/experiments/{experiment.pk}/", token=token)
        await listener.connect()
        assert (await listener.receive_json_from(timeout=5))["type"] == "snapshot"
        assert await listener.receive_nothing(timeout=QUIET_SECONDS, interval=0.5)
        await asyncio.get_running_loop().run_in_executor(
            None, publish, experiment.pk, {"type": "round.opened", "round": {"number": 1}}
        )
        received = await listener.receive_json_from(timeout=5)
        await listener.disconnect()
        return received

    assert async_to_sync(listen_after_silence)() == {
        "type": "round.opened",
        "round": {"number": 1},
    }


@needs_redis
def test_a_cancelled_receive_on_the_channel_layer_stops_at_once():
    """A consumer's receive is cancelled when its browser goes; with a read timeout on the
    layer's connections, some cancellations early in a receive were lost and the receive
    went on polling Redis for ever (a test's event loop then never closed)."""

    async def cancel_receives() -> list[float]:
        layer = get_channel_layer()
        seconds = []
        for attempt in range(40):
            receive = asyncio.ensure_future(layer.receive(await layer.new_channel()))
            await asyncio.sleep(attempt % 4 * 0.0005)
            receive.cancel()
            started = time.monotonic()
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(asyncio.shield(receive), timeout=8)
            seconds.append(time.monotonic() - started)
        return seconds

    assert max(async_to_sync(cancel_receives)()) < 1


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_events_arrives_whole_and_in_order_in_fewer_layer_messages(monkeypatch):
    owner = UserFactory()
    experiment = ExperimentFactory(owner=owner)
    token = api_token(owner)
    layer_messages = []
    layer = get_channel_layer()
    original_group_send = layer.group_send

    async def counting_group_send(group, message):
        layer_messages.append(len(message["events"]))
        await original_group_send(group, message)

    monkeypatch.setattr(layer, "group_send", counting_group_send)

    async def listen():
        listener = connect(f"/ws/experiments/{experiment.pk}/", token=token)
        await listener.connect()
        assert (await listener.receive_json_from(timeout=5))["type"] == "snapshot"
        for sequence in range(30):
            publish(experiment.pk, {"type": "client.finished", "sequence": sequence})
        received = [await listener.receive_json_from(timeout=5) for _ in range(30)]
        await listener.disconnect()
        return received

    received = async_to_sync(listen)()

    assert [event["sequence"] for event in received] == list(range(30))
    assert sum(layer_messages) == 30
    assert len(layer_messages) < 30


def start(experiment_id: int) -> None:
    """Start the experiment from a thread of the executor, closing that thread's connection."""
    try:
        services.start_experiment(experiment_id)
    finally:
        connection.close()


@pytest.mark.e2e
@pytest.mark.redis
@pytest.mark.worker
@needs_redis
@pytest.mark.django_db(transaction=True)
def test_events_arrive_in_order_during_a_real_run(lesions_dataset, worker_env):
    experiment = new_experiment(lesions_dataset, num_rounds=2, clients_per_round=2, min_clients=2)
    token = api_token(experiment.owner)
    worker = WorkerProcess(f"stream-{uuid.uuid4().hex[:6]}@test", worker_env)

    async def watch():
        listener = connect(f"/ws/experiments/{experiment.pk}/", token=token)
        await listener.connect()
        received = [await listener.receive_json_from(timeout=10)]
        await asyncio.get_running_loop().run_in_executor(None, start, experiment.pk)
        deadline = time.monotonic() + 120
        while received[-1]["type"] != "experiment.finished":
            assert time.monotonic() < deadline, [event["type"] for event in received]
            received.append(await listener.receive_json_from(timeout=60))
        await listener.disconnect()
        return received

    try:
        received = async_to_sync(watch)()
    finally:
        worker.stop()

    kinds = [event["type"] for event in received]
    assert kinds[0] == "snapshot" and kinds[-1] == "experiment.finished"
    # Two training rounds, then the cross-site round: two clients each
    assert kinds.count("round.opened") == kinds.count("round.closed") == 3
    assert kinds.count("client.started") == kinds.count("client.finished") == 6
    for number in (1, 2, 3):
        opened = next(
            i
            for i, e in enumerate(received)
            if e["type"] == "round.opened" and e["round"]["number"] == number
        )
        closed = next(
            i
            for i, e in enumerate(received)
            if e["type"] == "round.closed" and e["round"]["number"] == number
        )
        clients = [i for i, e in enumerate(received)
                   if e["type"].startswith("client.")
                   and e["client_update"]["round_number"] == number]  # fmt: skip
        assert opened < min(clients) and max(clients) < closed
        if number < 3:
            assert received[closed]["round"]["metrics"]["global"]["accuracy"] is not None
    assert received[closed]["round"]["kind"] == "evaluate"
    assert received[closed]["checkpoint"] is None
    # Each training round's federated evaluation arrives once the next round has closed.
    evaluated = [(i, e["round"]) for i, e in enumerate(received) if e["type"] == "round.evaluated"]
    assert [fl_round["number"] for _, fl_round in evaluated] == [1, 2]
    assert all(fl_round["federated_evaluation"]["weighted"]["num_sites"] == 2
               for _, fl_round in evaluated)  # fmt: skip
    finished = [e["client_update"] for e in received if e["type"] == "client.finished"]
    trained = [update for update in finished if update["round_number"] < 3]
    assert len(trained) == 4
    assert all(update["metrics"]["update_norm"] > 0 for update in trained)
    assert settings.CHANNEL_LAYERS["default"]["BACKEND"].endswith("RedisChannelLayer")
