"""Ledger writes that outlive a dropped database connection.

A client's report and an aggregation's completion carry work that took minutes or hours.
When the database connection breaks under them (a database restart or failover, a proxy
that cut an idle connection, pg_terminate_backend), the write is tried again on a new
connection instead of throwing that work away. Each write retried here is idempotent: a
conditional UPDATE that the first try may already have committed (the connection can
break after the COMMIT reached the server, before its answer came back), so the callers
recognise their own earlier commit (see record_client_result and complete_round).
"""

import logging
import time
from collections.abc import Callable
from typing import TypeVar

from django.conf import settings
from django.db import InterfaceError, OperationalError, connection

logger = logging.getLogger(__name__)

Result = TypeVar("Result")

LOST_CONNECTION_ERRORS = (OperationalError, InterfaceError)


def retry_on_lost_connection(write: Callable[[], Result], *, what: str) -> Result:
    """Run `write`; when the connection is lost, close it and run it again, up to
    FEDLENS_LEDGER_WRITE_ATTEMPTS times, waiting 0.5 s, 1 s, 2 s, ... in between."""
    attempts = settings.FEDLENS_LEDGER_WRITE_ATTEMPTS
    attempt = 1
    while True:
        try:
            return write()
        except LOST_CONNECTION_ERRORS as error:
            # Inside a caller's transaction a new connection would not see (or keep) what
            # the transaction did so far: only the outermost caller can start over.
            if connection.in_atomic_block or attempt >= attempts:
                raise
            logger.warning(
                "%s: the database connection failed (%s); trying again (%d of %d)",
                what,
                error,
                attempt + 1,
                attempts,
            )
            connection.close()
            time.sleep(0.5 * 2 ** (attempt - 1))
            attempt += 1
