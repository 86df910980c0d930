"""The experiment downloads, under /api/ (see flproject/urls.py)."""

from django.urls import path

from visualization.api.views import ExperimentDownloadViewSet

# Not a router's routes: it would add a trailing slash and redirect to it, and a download
# keeps its file name.
urlpatterns = [
    path(
        f"experiments/<int:pk>/{filename}",
        ExperimentDownloadViewSet.as_view({"get": method}, detail=True),
        name=name,
    )
    for filename, method, name in (
        ("report.png", "report_png", "experiment-report-png"),
        ("report.svg", "report_svg", "experiment-report-svg"),
        ("report.pdf", "report_pdf", "experiment-report-pdf"),
        ("metrics.csv", "metrics_csv", "experiment-metrics-csv"),
        ("metrics.json", "metrics_json", "experiment-metrics-json"),
        ("cross-site/", "cross_site", "experiment-cross-site"),
        ("cross-site.csv", "cross_site_csv", "experiment-cross-site-csv"),
    )
]
