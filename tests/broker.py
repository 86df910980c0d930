"""What the code under test left in the suite's broker."""

from flproject.celery import app as celery_app


def tasks_waiting_in_the_broker(queue: str, task_name: str) -> list[list]:
    """Take every message from `queue`; return the arguments of those of `task_name`."""
    arguments = []
    with celery_app.connection_for_read() as connection:
        waiting = connection.SimpleQueue(queue)
        while True:
            try:
                message = waiting.get(timeout=0.5)
            except waiting.Empty:
                break
            message.ack()
            if message.headers.get("task") == task_name:
                arguments.append(message.payload[0])
        waiting.close()
    return arguments
