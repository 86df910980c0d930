"""Task and queue names: the contract between the ledger, the server's workers and the
site agents. Defined here once; everything that sends, routes or consumes tasks uses them.

`training` holds simulated clients' work, `aggregation` the server-side work, and
`site.<slug>` a real site's work, consumed only by that site's agent. No Django imports:
the site agent reads this module too.
"""

TRAINING_QUEUE = "training"
AGGREGATION_QUEUE = "aggregation"
SITE_QUEUE_PREFIX = "site."

PING_TASK = "workers.tasks.ping"
TRAIN_CLIENT_TASK = "workers.tasks.train_client"
AGGREGATE_ROUND_TASK = "workers.tasks.aggregate_round"
CLOSE_OVERDUE_ROUNDS_TASK = "workers.tasks.close_overdue_rounds"
EXPORT_TO_TRACKING_TASK = "workers.tasks.export_to_tracking"
SYNC_SITE_BROKER_USERS_TASK = "workers.tasks.sync_site_broker_users"

# Task name to its default queue; a caller may still name a site's queue explicitly.
TASK_QUEUES = {
    PING_TASK: TRAINING_QUEUE,
    TRAIN_CLIENT_TASK: TRAINING_QUEUE,
    AGGREGATE_ROUND_TASK: AGGREGATION_QUEUE,
    CLOSE_OVERDUE_ROUNDS_TASK: AGGREGATION_QUEUE,
    EXPORT_TO_TRACKING_TASK: AGGREGATION_QUEUE,
    SYNC_SITE_BROKER_USERS_TASK: AGGREGATION_QUEUE,
}


def site_queue(slug: str) -> str:
    return f"{SITE_QUEUE_PREFIX}{slug}"
