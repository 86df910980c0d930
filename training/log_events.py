"""Log lines for the ledger's events (round.opened, client.finished, site.enrolled, ...).

Each carries `event` and the ids it is about (`experiment`, `round`, `site`) as fields of
its record, which the JSON log format (flproject/observability/logs.py) writes out.
"""

import logging

from django.db import transaction


def log_event(logger: logging.Logger, event: str, *, level: int = logging.INFO, **fields) -> None:
    """One line for a federated event, once the transaction commits (when browsers hear of
    it too): the fields as JSON fields, and in the message for plain-text readers."""
    if not logger.isEnabledFor(level):  # a worker logging warnings only skips the work below
        return
    details = " ".join(f"{name}={value}" for name, value in fields.items())
    transaction.on_commit(
        lambda: logger.log(level, "%s %s", event, details, extra={"event": event, **fields})
    )
