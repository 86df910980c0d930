"""The endpoints of machines: /health, /healthz, /readyz (flproject/health.py) and /metrics.

They are answered here, ahead of the rest of the middleware and of the URLconf, because their
callers address a container or pod by IP address: Kubernetes probes and Prometheus (one target
per pod or container) send that address as Host, which ALLOWED_HOSTS does not list, and
CommonMiddleware would refuse it with 400. The replies use nothing of the Host header and need
no session, CSRF check or HTTPS redirect; django-prometheus counts them only in its totals.
"""

from flproject.health import health, healthz, readyz
from flproject.observability.metrics import metrics_view

VIEWS = {"/health": health, "/healthz": healthz, "/readyz": readyz, "/metrics": metrics_view}


class MachineEndpointsMiddleware:
    def __init__(self, get_response) -> None:
        self.get_response = get_response

    def __call__(self, request):
        view = VIEWS.get(request.path_info)
        return view(request) if view is not None else self.get_response(request)
