"""A site's Redis ACL user: it consumes its own queue with kombu and touches nothing else.

Against a redis-server of the test's own (the suite's Redis has no ACL users to spare).
"""

import contextlib
import hashlib
import json
import secrets
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
import redis
from kombu import Connection, Exchange, Queue

from tests.conftest import PROJECT_ROOT, free_port, service_env
from training.site_broker import (
    SiteSlugError,
    acl_rules,
    acl_user_rules,
    broker_username,
    queue_keys,
    transport_options,
)

pytestmark = [
    pytest.mark.redis,
    pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs redis-server"),
]

PASSWORD = {"a": secrets.token_hex(16), "b": secrets.token_hex(16), "a-b": secrets.token_hex(16)}


def user_rules(slug: str) -> list[str]:
    # Site b's user is made from the password's hash, the way the server stores it.
    if slug == "b":
        digest = hashlib.sha256(PASSWORD[slug].encode()).hexdigest()
        return acl_user_rules(slug, password_sha256=digest)
    return acl_user_rules(slug, PASSWORD[slug])


class OwnRedis:
    def __init__(self) -> None:
        self.port = free_port()
        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--daemonize", "no"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self.admin = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                self.admin.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def url(self, slug: str | None = None) -> str:
        if slug is None:
            return f"redis://127.0.0.1:{self.port}/0"
        return f"redis://{broker_username(slug)}:{PASSWORD[slug]}@127.0.0.1:{self.port}/0"

    def as_site(self, slug: str) -> redis.Redis:
        return redis.Redis(port=self.port, username=broker_username(slug), password=PASSWORD[slug])

    def stop(self) -> None:
        self.admin.close()
        self.process.terminate()
        self.process.wait(10)


@pytest.fixture(scope="module")
def broker() -> Iterator[OwnRedis]:
    server = OwnRedis()
    for slug in PASSWORD:
        server.admin.execute_command("ACL", "SETUSER", broker_username(slug), *user_rules(slug))
    yield server
    server.stop()


@pytest.fixture(autouse=True)
def empty_broker(broker: OwnRedis) -> None:
    broker.admin.flushall()


def site_queue_declaration(slug: str) -> Queue:
    """The queue as Celery declares a queue it is given by name."""
    name = f"site.{slug}"
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


def publish_as_admin(broker: OwnRedis, slug: str, body: dict, priority: int | None = None) -> None:
    with Connection(broker.url()) as connection:
        queue = site_queue_declaration(slug)
        connection.Producer().publish(
            body, exchange=queue.exchange, routing_key=queue.routing_key, declare=[queue],
            serializer="json", priority=priority,
        )  # fmt: skip


def site_connection(broker: OwnRedis, slug: str, visibility_timeout: float = 3600) -> Connection:
    # Restore sweeps on every poll, so that a test need not wait ten polls for one.
    options = {**transport_options(slug, visibility_timeout), "unacked_restore_throttle": 1}
    return Connection(broker.url(slug), transport_options=options)


def receive(connection: Connection, slug: str, timeout: float = 10) -> list:
    received = []
    with connection.Consumer(
        site_queue_declaration(slug), accept=["json"],
        callbacks=[lambda body, message: received.append((body, message))],
    ):  # fmt: skip
        deadline = time.monotonic() + timeout
        while not received and time.monotonic() < deadline:
            with contextlib.suppress(TimeoutError):
                connection.drain_events(timeout=0.5)
    return received


def test_the_site_user_receives_and_acks_messages_of_its_queue_at_any_priority(broker):
    publish_as_admin(broker, "a", {"n": 1})
    publish_as_admin(broker, "a", {"n": 2}, priority=5)

    bodies = []
    with site_connection(broker, "a") as connection:
        for _ in range(2):
            [(body, message)] = receive(connection, "a")
            message.ack()
            bodies.append(body)

    assert sorted(body["n"] for body in bodies) == [1, 2]
    assert not any(broker.admin.exists(key) for key in queue_keys("a"))
    assert broker.admin.hlen("site.a.unacked") == 0
    assert broker.admin.zcard("site.a.unacked_index") == 0
    assert broker.admin.acl_log() == []  # nothing the consumer tried was refused


CONSUME_AND_HANG = """
import sys, time
from kombu import Connection, Exchange, Queue
from training.site_broker import transport_options
connection = Connection(sys.argv[1], transport_options=transport_options("a", 3600))
queue = Queue("site.a", Exchange("site.a", type="direct"), routing_key="site.a")
def hang(body, message):
    print("received", flush=True)
    time.sleep(600)
with connection.Consumer(queue, accept=["json"], callbacks=[hang]):
    connection.drain_events(timeout=30)
"""


def test_a_message_left_unacked_by_a_killed_consumer_is_delivered_again(broker):
    publish_as_admin(broker, "a", {"n": 7})
    killed = subprocess.Popen(
        [sys.executable, "-c", CONSUME_AND_HANG, broker.url("a")], cwd=PROJECT_ROOT,
        env=service_env(), stdout=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        assert killed.stdout.readline().strip() == "received"
    finally:
        killed.send_signal(signal.SIGKILL)
        killed.wait(10)
    # The message waits in the site's own unacked hash, not in kombu's shared one.
    assert broker.admin.hlen("site.a.unacked") == 1
    assert not broker.admin.exists("unacked")

    time.sleep(1.2)  # past the next consumer's visibility timeout
    with site_connection(broker, "a", visibility_timeout=1) as connection:
        [(body, message)] = receive(connection, "a")
        message.ack()

    assert body == {"n": 7}
    assert message.delivery_info.get("redelivered") or message.headers.get("redelivered")
    assert broker.admin.acl_log() == []


@pytest.mark.parametrize(
    "command",
    [
        ("BRPOP", "site.b", "0.1"),
        ("LRANGE", "site.b", "0", "-1"),
        ("LPUSH", "site.b", "x"),
        ("RPOP", "site.b\x06\x163"),
        ("HGET", "site.b.unacked", "tag"),
        ("ZRANGE", "site.b.unacked_index", "0", "-1"),
        ("SMEMBERS", "_kombu.binding.site.b"),
        ("HGET", "unacked", "tag"),  # kombu's shared default keys
        ("LPUSH", "site.a-b", "x"),  # a slug that starts like this one
        ("BRPOP", "site.a-b", "0.1"),
        ("HGET", "site.a-b.unacked", "tag"),
        ("SADD", "_kombu.binding.site.a-b", "x"),
        ("KEYS", "*"),
        ("SCAN", "0"),
        ("RANDOMKEY",),
        ("ACL", "LIST"),
        ("ACL", "SETUSER", "site.a", "+@all"),
        ("CONFIG", "GET", "*"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("INFO",),
        ("MONITOR",),
        ("PUBLISH", "/0.celery.pidbox", "x"),
        ("EVAL", "return 1", "0"),
        ("SCRIPT", "FLUSH"),
        ("CLIENT", "LIST"),
    ],
    ids=lambda command: " ".join(command)[:40].replace("\x06\x16", "<sep>"),
)
def test_the_site_user_is_refused_everything_beyond_its_own_keys(broker, command):
    broker.admin.lpush("site.b", "secret")
    broker.admin.hset("site.b.unacked", "tag", "secret")
    site_a = broker.as_site("a")

    with pytest.raises(redis.exceptions.NoPermissionError):
        site_a.execute_command(*command)

    assert broker.admin.lrange("site.b", 0, -1) == [b"secret"]
    assert broker.admin.exists("site.a-b") == 0


def test_a_script_runs_with_the_site_users_permissions(broker):
    # EVALSHA is granted for kombu's lock; Redis checks what the script does against the
    # caller's ACL, so a cached script cannot reach another site's queue either.
    broker.admin.lpush("site.b", "secret")
    sha = broker.admin.script_load("return redis.call('RPOP', KEYS[1])")
    undeclared = broker.admin.script_load("return redis.call('RPOP', 'site.b')")

    with pytest.raises(redis.exceptions.ResponseError, match=r"no permissions|can't access"):
        broker.as_site("a").evalsha(sha, 1, "site.b")
    with pytest.raises(redis.exceptions.ResponseError, match=r"no permissions|can't access"):
        broker.as_site("a").evalsha(undeclared, 0)
    assert broker.as_site("a").evalsha(sha, 1, "site.a") is None
    assert broker.admin.lrange("site.b", 0, -1) == [b"secret"]


def test_a_user_made_from_the_password_hash_logs_in_with_the_password(broker):
    assert broker.as_site("b").ping()
    with pytest.raises(redis.exceptions.AuthenticationError):
        redis.Redis(port=broker.port, username="site.b", password=PASSWORD["a"]).ping()


def test_the_site_user_subscribes_to_no_channel(broker):
    pubsub = broker.as_site("a").pubsub()

    with pytest.raises(redis.exceptions.NoPermissionError):
        pubsub.subscribe("/0.celery.pidbox")
        pubsub.get_message(timeout=1)
    pubsub.close()


def test_key_patterns_are_exact_key_names():
    patterns = [rule[1:] for rule in acl_rules("a-b") if rule.startswith("~")]

    assert not [pattern for pattern in patterns if set(pattern) & set("*?[]\\")]
    assert "site.a-b" in patterns
    assert "site.a-b.unacked" in patterns
    assert "+@all" not in acl_rules("a")
    assert json.dumps(transport_options("a", 60)["unacked_key"]) == '"site.a.unacked"'


@pytest.mark.parametrize("slug", ["a*", "a?b", "a[b]", "a b", "", "a.b", "a\\b"])
def test_a_slug_that_would_be_a_glob_pattern_is_refused(slug):
    with pytest.raises(SiteSlugError):
        acl_rules(slug)
