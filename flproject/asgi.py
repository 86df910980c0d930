"""ASGI entry point: HTTP through Django, WebSockets through Channels.

In embedded mode (no REDIS_URL) this process also runs the Celery worker, so that a single
`uvicorn` serves the site and trains with no other services.
"""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "flproject.settings.local")

from flproject.startup import exit_on_bad_settings

exit_on_bad_settings()
# Django must be set up before anything imports models (Channels routing, consumers).
django_asgi_app = get_asgi_application()

from channels.routing import ProtocolTypeRouter  # noqa: E402
from django.conf import settings  # noqa: E402

from flproject.websocket_routes import websocket_application  # noqa: E402

application = ProtocolTypeRouter({"http": django_asgi_app, "websocket": websocket_application()})

if settings.FEDLENS_EMBEDDED:
    from workers.embedded import start_embedded_worker

    start_embedded_worker()
