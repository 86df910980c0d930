"""Celery wiring: safe settings, routing by queue, the embedded worker and a real worker."""

import os
import uuid

import pytest
from django.conf import settings

from flproject.celery import app
from tests.conftest import service_env, start_celery_worker, stop_process, wait_for_worker
from training.queues import site_queue
from workers.embedded import EmbeddedWorker
from workers.routing import route_task
from workers.tasks import ping


def test_messages_are_json_only():
    assert app.conf.accept_content == ["json"]
    assert app.conf.task_serializer == "json"
    assert app.conf.result_serializer == "json"


def test_tasks_are_acknowledged_late_one_at_a_time_with_time_limits():
    assert app.conf.task_acks_late is True
    assert app.conf.task_reject_on_worker_lost is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert 0 < app.conf.task_soft_time_limit < app.conf.task_time_limit


def test_redis_redelivers_only_after_the_longest_task_could_have_run():
    visibility = app.conf.broker_transport_options["visibility_timeout"]

    assert visibility > app.conf.task_time_limit


def test_ping_is_routed_to_the_training_queue():
    assert route_task("workers.tasks.ping", (), {}, {}) == {"queue": "training"}
    assert route_task("unknown.task", (), {}, {}) is None


def test_site_queues_are_named_after_the_site():
    assert site_queue("st-mary") == "site.st-mary"


def test_embedded_worker_runs_tasks_through_celery_in_this_process(in_memory_app):
    with EmbeddedWorker(in_memory_app, name="embedded-test@local"):
        results = [in_memory_app.tasks["workers.tasks.ping"].delay() for _ in range(20)]
        replies = [result.get(timeout=10) for result in results]

    assert [(reply["reply"], reply["worker"]) for reply in replies] == [
        ("pong", "embedded-test@local")
    ] * 20
    assert {reply["pid"] for reply in replies} == {os.getpid()}


def test_a_worker_stopped_without_waiting_leaves_tasks_to_the_next_one(in_memory_app):
    # Given a worker stopped without waiting for its consumers, whose last poll goes on
    stopped = EmbeddedWorker(in_memory_app, name="embedded-stopped@local").start()
    consumers = [thread for _, thread in stopped._consumers]
    stopped.stop(wait_for_idle=False)
    assert any(thread.is_alive() for thread in consumers)
    # When tasks are sent during that poll
    results = [in_memory_app.tasks["workers.tasks.ping"].delay() for _ in range(10)]
    # Then the stopped worker runs none of them: the worker started next runs them all
    with EmbeddedWorker(in_memory_app, name="embedded-next@local"):
        workers = {result.get(timeout=10)["worker"] for result in results}
    assert workers == {"embedded-next@local"}


def test_embedded_worker_ignores_queues_it_was_not_given(in_memory_app):
    with EmbeddedWorker(in_memory_app, queues=("training",), name="embedded-q@local"):
        elsewhere = in_memory_app.tasks["workers.tasks.ping"].apply_async(queue="site.far-away")
        here = in_memory_app.tasks["workers.tasks.ping"].apply_async(queue="training")

        assert here.get(timeout=10)["pid"] == os.getpid()
        assert elsewhere.status == "PENDING"


@pytest.mark.redis
@pytest.mark.worker
@pytest.mark.skipif(settings.FEDLENS_EMBEDDED, reason="needs Redis (CI=true makes it required)")
def test_ping_goes_through_a_real_worker_process_over_redis():
    name = f"ping-{uuid.uuid4().hex[:8]}@test"
    queue = site_queue(f"ping-{uuid.uuid4().hex[:8]}")
    worker = start_celery_worker(name, queue, service_env())
    try:
        wait_for_worker(app, name, worker)

        reply = ping.apply_async(queue=queue).get(timeout=30)
    finally:
        stop_process(worker)

    assert reply["worker"] == name
    assert reply["pid"] not in (os.getpid(), worker.pid)  # a prefork child of that worker
