"""The WebSocket half of the ASGI application (flproject/asgi.py), in one place for tests too."""

from channels.auth import AuthMiddlewareStack
from channels.generic.websocket import AsyncWebsocketConsumer
from channels.routing import URLRouter
from django.urls import re_path

from visualization.auth import TokenAuthMiddleware, allowed_hosts_origin_validator
from visualization.routing import websocket_urlpatterns

# Like HTTP's 404, in the range of codes that applications define (4000-4999).
UNKNOWN_PATH_CLOSE_CODE = 4404


class UnknownPathConsumer(AsyncWebsocketConsumer):
    """Closes a socket opened on a path no route serves.

    Channels' URLRouter raises an exception for such a path, which the server logs as an
    application error; a scanner or a mistyped URL is not one.
    """

    async def connect(self):
        await self.accept()  # accept first: a close code reaches the browser only after it
        await self.close(code=UNKNOWN_PATH_CLOSE_CODE)


def websocket_application():
    return allowed_hosts_origin_validator(
        AuthMiddlewareStack(
            TokenAuthMiddleware(
                URLRouter([*websocket_urlpatterns, re_path(r"", UnknownPathConsumer.as_asgi())])
            )
        )
    )
