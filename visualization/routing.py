"""WebSocket routes, served by the ASGI application (flproject/asgi.py)."""

from django.urls import path

from visualization.consumers import ExperimentConsumer

websocket_urlpatterns = [
    path("ws/experiments/<int:experiment_id>/", ExperimentConsumer.as_asgi()),
]
