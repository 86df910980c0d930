from django.urls import include, path
from rest_framework.authtoken.views import obtain_auth_token
from rest_framework.routers import DefaultRouter

from training.api import views

router = DefaultRouter()
router.register("sites", views.SiteViewSet, basename="site")
router.register("datasets", views.DatasetViewSet, basename="dataset")
router.register("experiments", views.ExperimentViewSet, basename="experiment")
router.register("rounds", views.RoundViewSet, basename="round")
router.register("client-updates", views.ClientUpdateViewSet, basename="client-update")
router.register("checkpoints", views.CheckpointViewSet, basename="checkpoint")


def experiment_download(method: str):
    """ExperimentViewSet's `method` for GET at a URL ending in a file name, with no slash."""
    return views.ExperimentViewSet.as_view({"get": method}, detail=True, basename="experiment")


# The router would add a trailing slash and redirect to it; a download keeps its file name.
downloads = [
    path(f"experiments/<int:pk>/{filename}", experiment_download(method), name=name)
    for filename, method, name in (
        ("report.png", "report_png", "experiment-report-png"),
        ("report.svg", "report_svg", "experiment-report-svg"),
        ("report.pdf", "report_pdf", "experiment-report-pdf"),
        ("metrics.csv", "metrics_csv", "experiment-metrics-csv"),
        ("metrics.json", "metrics_json", "experiment-metrics-json"),
    )
]

urlpatterns = [
    path("auth/token/", obtain_auth_token, name="auth-token"),
    *downloads,
    path("", include(router.urls)),
]
