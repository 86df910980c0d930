"""WebSocket routes, served by the ASGI application (flproject/asgi.py).

The experiment stream (ws/experiments/<id>/) is added with the live dashboard.
"""

websocket_urlpatterns: list = []
