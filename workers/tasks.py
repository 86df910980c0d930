"""Celery tasks. They take ids, re-read the database, and never carry weights."""

import os

from celery import shared_task


@shared_task(name="workers.tasks.ping", bind=True, ignore_result=False)
def ping(self) -> dict[str, str | int]:
    """Say which worker and process answered: proves who consumes the queue pinged."""
    return {"reply": "pong", "worker": self.request.hostname or "", "pid": os.getpid()}
