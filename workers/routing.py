"""Queue names and the task router; work is routed by queue, never by host name.

`training` holds simulated clients' local training, `aggregation` the server-side work,
and `site.<slug>` the local training of a real site, consumed only by that site's workers.
"""

TRAINING_QUEUE = "training"
AGGREGATION_QUEUE = "aggregation"
SITE_QUEUE_PREFIX = "site."

# Task name to its default queue; a caller may still name a site's queue explicitly.
TASK_QUEUES = {
    "workers.tasks.ping": TRAINING_QUEUE,
    "workers.tasks.train_client": TRAINING_QUEUE,
    "workers.tasks.aggregate_round": AGGREGATION_QUEUE,
    "workers.tasks.close_overdue_rounds": AGGREGATION_QUEUE,
    "workers.tasks.export_to_tracking": AGGREGATION_QUEUE,
}


def site_queue(slug: str) -> str:
    return f"{SITE_QUEUE_PREFIX}{slug}"


def route_task(name, args, kwargs, options, task=None, **kw):
    """Celery router (CELERY_TASK_ROUTES): the queue for a task that names none."""
    queue = TASK_QUEUES.get(name)
    return {"queue": queue} if queue else None
