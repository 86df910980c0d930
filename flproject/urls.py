"""Top-level URL configuration: dashboard, REST API and its schema, admin.

/health, /healthz, /readyz and /metrics are answered before the URLconf, by
flproject.observability.endpoints (see there why).
"""

from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    path("", include("visualization.urls")),
    path("", include("visualization.viewer.urls")),
    path("accounts/", include("django.contrib.auth.urls")),
    path("admin/", admin.site.urls),
    # Before training's API: sign-in, the audit log and site operators' routes.
    path("api/", include("accounts.urls")),
    path("api/", include("training.api.urls")),
    path("api/", include("visualization.api.urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="api-docs"),
]

# JSON under /api/, the usual pages elsewhere.
handler400 = "flproject.api_errors.bad_request"
handler403 = "flproject.api_errors.permission_denied"
handler404 = "flproject.api_errors.page_not_found"
handler500 = "flproject.api_errors.server_error"
