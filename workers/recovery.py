"""The watchdog's eyes: which of the tasks the ledger expects (training/recovery.py) are
still somewhere, and which were lost.

A task is somewhere when it waits in the broker (its queue's lists) or a live worker holds
it (reserved, running or scheduled). Live workers are asked with Celery's remote control,
`inspect().query_task(ids)`: one broadcast, answered by each worker's main process within
milliseconds even while its prefork pool trains. Not with worker heartbeats: they are
events that only a long-lived receiver (Flower) collects, not a beat task that runs for a
moment every 15 s, and they say that a worker lives, not what it holds, so a worker that
came back under the same name would seem to hold the task its previous life lost. A message
delivered to a worker that then died stays in the broker's unacknowledged set until the
visibility timeout hands it back: that is the hour this replaces, so it counts as lost.

Real sites' agents answer no broadcast (their broker user may only consume their own
queue): a site's task counts as held when it waits in the site's queue, or sits in the
site's own unacknowledged set while the agent's heartbeats say that it lives.

Embedded mode (the in-memory transport) is not watched: its broker and its only worker live
and die with the process that runs the watchdog, so nothing is lost while the watchdog can
look, and its solo pool could not answer a broadcast sent from its own task. What a dead
embedded process left is taken up again when it resumes.
"""

import json
import logging
import time
from collections.abc import Iterable, Mapping
from typing import TypeVar

import redis
from django.conf import settings
from kombu.transport.redis import Channel as RedisChannel

from flproject.celery import app as celery_app
from training import site_broker
from training.recovery import ExpectedTask

logger = logging.getLogger(__name__)

Key = TypeVar("Key")

# Workers answer a broadcast within milliseconds; a loaded machine may take longer.
INSPECT_TIMEOUT_SECONDS = 1.0
BROKER_TIMEOUT_SECONDS = 2.0


def is_watched() -> bool:
    return not settings.FEDLENS_EMBEDDED


def queue_lists(queue: str) -> list[str]:
    """kombu's Redis lists of a queue: one per priority step (see metrics.queue_depths)."""
    steps = [step for step in RedisChannel.priority_steps if step]
    return [queue, *(f"{queue}{RedisChannel.sep}{step}" for step in steps)]


def task_id_of(message: object) -> str | None:
    """The task id in a kombu message as the Redis transport stores it."""
    try:
        return message["headers"]["id"]  # type: ignore[index]
    except (KeyError, TypeError):
        return None  # not a Celery task message


def tasks_in_the_broker(queues: Iterable[str], connected_sites: Iterable[str]) -> set[str]:
    """Ids of the tasks waiting in `queues`, and of those delivered to the agents of
    `connected_sites` (slugs) and not yet acknowledged."""
    lists = [name for queue in queues for name in queue_lists(queue)]
    # kombu's ack emulation keeps each delivered message as [message, exchange, routing key].
    unacked = [site_broker.unacked_keys(slug)["unacked_key"] for slug in connected_sites]
    broker = redis.Redis.from_url(
        settings.CELERY_BROKER_URL,
        socket_timeout=BROKER_TIMEOUT_SECONDS,
        socket_connect_timeout=BROKER_TIMEOUT_SECONDS,
    )
    with broker, broker.pipeline(transaction=False) as pipeline:
        for name in lists:
            pipeline.lrange(name, 0, -1)
        for name in unacked:
            pipeline.hvals(name)
        replies = pipeline.execute()
    waiting = [json.loads(raw) for reply in replies[: len(lists)] for raw in reply]
    delivered = [json.loads(raw)[0] for reply in replies[len(lists) :] for raw in reply]
    return {task_id for task_id in map(task_id_of, waiting + delivered) if task_id}


def tasks_held_by_live_workers(task_ids: Iterable[str]) -> set[str]:
    replies = celery_app.control.inspect(timeout=INSPECT_TIMEOUT_SECONDS).query_task(*task_ids)
    return {task_id for held in (replies or {}).values() for task_id in held}


def missing(expected: Mapping[Key, ExpectedTask]) -> set[Key]:
    """The keys of the tasks found neither in the broker nor at a live worker."""
    if not expected:
        return set()
    tasks = expected.values()
    sites = {task.site_slug for task in tasks if task.site_connected}
    found = tasks_in_the_broker({task.queue for task in tasks}, sites)
    unseen = {task.task_id for task in tasks} - found
    if unseen:
        found |= tasks_held_by_live_workers(unseen)
    return {key for key, task in expected.items() if task.task_id not in found}


def lost(expected: Mapping[Key, ExpectedTask]) -> set[Key]:
    """The keys of the tasks missing twice, FEDLENS_RECOVERY_CONFIRM_SECONDS apart: a task
    sent just after the ledger was read, or passing from the broker to a worker between the
    two looks, is found the second time."""
    suspects = missing(expected)
    if not suspects:
        return set()
    time.sleep(settings.FEDLENS_RECOVERY_CONFIRM_SECONDS)
    return missing({key: expected[key] for key in suspects})
