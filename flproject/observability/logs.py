"""Log lines that a collector can parse and join up.

With LOG_FORMAT=json (see settings) every line is one JSON object: `timestamp` (UTC, ISO 8601),
`level`, `logger`, `message`, then `request_id` (the HTTP request it belongs to), `task_id` and
`task_name` (the Celery task), null outside one, and any `extra` fields of the call. Federated
events (training/log_events.py) add `event` (round.opened, client.finished, ...) with
`experiment`, `round` and `site`.

The request id travels in a context variable, which asgiref carries between the async and sync
parts of a request, so every line written while handling it carries the id. The Celery task
comes from Celery's own record of the task that runs in this thread.
"""

import logging
import re
import uuid
from contextvars import ContextVar

from celery._state import get_current_task
from pythonjsonlogger.json import JsonFormatter

REQUEST_ID_HEADER = "X-Request-ID"
# An id from the client or the proxy is kept only if it looks like one: it goes into every
# log line of the request and back into a response header.
SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")

request_id: ContextVar[str | None] = ContextVar("request_id", default=None)


class RequestIdMiddleware:
    """Give each request an id (the incoming X-Request-ID if sane), and echo it back."""

    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        current = incoming if SANE_REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        # Left set after the response: Django logs a 4xx reply ("Not Found") once the
        # middleware has returned. Under ASGI each request runs in a context of its own.
        request_id.set(current)
        response = self.get_response(request)
        response[REQUEST_ID_HEADER] = current
        return response


class LogContextFilter(logging.Filter):
    """Adds request_id, task_id and task_name to every record a handler writes."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.request_id = request_id.get()
        task = get_current_task()
        record.task_id = task.request.id if task else None
        record.task_name = task.name if task else None
        return True


# A secret in a query string, as an old client may still send it (the server refuses it).
SECRET_IN_QUERY = re.compile(r"([?&](?:token|ticket|key|password)=)[^&\s\"']*", re.IGNORECASE)


class RedactSecretsFilter(logging.Filter):
    """Blanks secrets in query strings of every line (uvicorn's access and WebSocket lines
    print the whole URL), so that no token is written to a log."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if SECRET_IN_QUERY.search(message):
            record.msg = SECRET_IN_QUERY.sub(r"\1[redacted]", message)
            record.args = None
        return True


def json_formatter() -> JsonFormatter:
    return JsonFormatter(
        ["levelname", "name", "message"],
        rename_fields={"levelname": "level", "name": "logger"},
        timestamp=True,
    )
