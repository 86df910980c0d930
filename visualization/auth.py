"""WebSocket authentication by DRF token, for scripts: `?token=<key>` or an
`Authorization: Token <key>` header. Browsers are authenticated by their session."""

from urllib.parse import parse_qs

from channels.db import database_sync_to_async
from channels.middleware import BaseMiddleware
from channels.security.websocket import OriginValidator
from django.conf import settings
from rest_framework.authtoken.models import Token


@database_sync_to_async
def user_for_token(key: str):
    token = Token.objects.select_related("user").filter(key=key).first()
    return token.user if token is not None and token.user.is_active else None


def token_in(scope) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"authorization":
            kind, _, key = value.decode("latin-1").partition(" ")
            if kind.lower() == "token" and key:
                return key.strip()
    keys = parse_qs(scope.get("query_string", b"").decode()).get("token")
    return keys[0] if keys else None


class TokenAuthMiddleware(BaseMiddleware):
    """Sets scope["user"] from a token when one is given; otherwise leaves the session's."""

    async def __call__(self, scope, receive, send):
        key = token_in(scope)
        if key is not None:
            user = await user_for_token(key)
            if user is not None:
                scope = {**scope, "user": user}
            else:
                from django.contrib.auth.models import AnonymousUser

                scope = {**scope, "user": AnonymousUser()}
        return await super().__call__(scope, receive, send)


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
