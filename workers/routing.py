"""The Celery task router; work is routed by queue (training/queues.py), never by host name."""

from training.queues import TASK_QUEUES


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router (CELERY_TASK_ROUTES): the queue for a task that names none."""
    queue = TASK_QUEUES.get(name)
    return {"queue": queue} if queue else None
