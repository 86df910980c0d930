"""WebSocket authentication. Browsers are signed in by their session cookie. Scripts send
their API token in a header, never in the URL (URLs end up in access logs and proxies):
offer the subprotocols ["fedlens.token", "<token>"] (the server answers "fedlens.token"),
or send `Authorization: Token <token>` where the client can set headers. A URL with
`?token=` is refused with close code 4400."""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from django.contrib.auth.models import AnonymousUser
from knox.auth import TokenAuthentication
from rest_framework.exceptions import AuthenticationFailed

TOKEN_SUBPROTOCOL = "fedlens.token"  # noqa: S105 - a protocol name, not a secret
# Like HTTP's 400, in the range of codes that applications define (4000-4999).
TOKEN_IN_URL_CLOSE_CODE = 4400


@database_sync_to_async
def user_for_token(key: str):
    try:
        user, _ = TokenAuthentication().authenticate_credentials(key.encode())
    except (AuthenticationFailed, UnicodeError):
        return None
    return user


def token_in(scope) -> tuple[str | None, bool]:
    """(the token, whether it came as a subprotocol) from the handshake's headers."""
    subprotocols = list(scope.get("subprotocols") or [])
    if TOKEN_SUBPROTOCOL in subprotocols:
        position = subprotocols.index(TOKEN_SUBPROTOCOL)
        if position + 1 < len(subprotocols):
            return subprotocols[position + 1], True
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            kind, _, key = value.decode("latin-1").partition(" ")
            if kind.lower() == "token" and key:
                return key.strip(), False
    return None, False


def token_in_url(scope) -> bool:
    query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
    return "token" in query


async def refuse_token_in_url(receive, send) -> None:
    message = await receive()
    if message["type"] == "websocket.connect":
        # Accepted first: a close code reaches the client only after the handshake.
        await send({"type": "websocket.accept"})
        await send({"type": "websocket.close", "code": TOKEN_IN_URL_CLOSE_CODE})


class TokenAuthMiddleware(BaseMiddleware):
    """Sets scope["user"] from a token when one is given; otherwise leaves the session's."""

    async def __call__(self, scope, receive, send):
        if token_in_url(scope):
            return await refuse_token_in_url(receive, send)
        key, as_subprotocol = token_in(scope)
        if key is None:
            return await super().__call__(scope, receive, send)
        user = await user_for_token(key)
        scope = {**scope, "user": user or AnonymousUser()}
        if as_subprotocol:
            send = answering_with_subprotocol(send)
        return await super().__call__(scope, receive, send)


def answering_with_subprotocol(send):
    """A client that offered subprotocols fails the handshake unless the server picks one."""

    async def send_accepting_token_subprotocol(message):
        if message["type"] == "websocket.accept" and not message.get("subprotocol"):
            message = {**message, "subprotocol": TOKEN_SUBPROTOCOL}
        await send(message)

    return send_accepting_token_subprotocol


class BrowserOriginValidator(OriginValidator):
    """Refuse WebSockets opened by pages of other sites, and only those.

    Browsers always send Origin on a WebSocket, so a page elsewhere cannot ride on a
    user's session. Scripts send none and sign in with a token, which no other site can make
    a browser send; Channels' own validator would refuse them.
    """

    def valid_origin(self, parsed_origin) -> bool:
        return parsed_origin is None or super().valid_origin(parsed_origin)


def allowed_hosts_origin_validator(application):
    return BrowserOriginValidator(application, settings.ALLOWED_HOSTS)
