"""Downloads of an experiment's report figure and metrics, drawn from its round ledger."""

from django.http import HttpResponse, JsonResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import viewsets
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated

from training.api.permissions import RolePermission
from training.models import Experiment
from visualization import evaluations, reports


def report_schema(fmt: str, content_type: str, description: str):
    """The OpenAPI description shared by the three report downloads."""
    return extend_schema(
        operation_id=f"experiments_report_{fmt}",
        parameters=[
            OpenApiParameter(
                "round",
                int,
                description="Show this round's confusion matrix and ROC curve; "
                "by default the last closed round with a held-out evaluation.",
            )
        ],
        responses={
            (200, content_type): OpenApiResponse(OpenApiTypes.BINARY, description=description),
            400: OpenApiResponse(
                OpenApiTypes.OBJECT, description="`round` names no round of this experiment."
            ),
        },
    )


class ExperimentDownloadViewSet(viewsets.GenericViewSet):
    """Files of one experiment, visible to whoever may see the experiment. Routed by
    visualization/api/urls.py, as their URLs end in a file name, not a slash."""

    queryset = Experiment.objects.none()  # the schema's model; get_queryset filters
    permission_classes = [IsAuthenticated, RolePermission]
    filter_backends = []  # one experiment, named by its id: the list filters do not apply

    def get_queryset(self):
        return Experiment.objects.visible_to(self.request.user).select_related("dataset")

    def perform_content_negotiation(self, request, force=False):
        # A download answers whatever Accept asks for; its errors stay JSON.
        return super().perform_content_negotiation(request, force=True)

    @report_schema("png", "image/png", "The report figure, 150 dpi.")
    def report_png(self, request, pk=None):
        """The experiment's report as a PNG image: per-round global and per-site metrics,
        confusion matrix and ROC curve."""
        return self.report_download(request, "png")

    @report_schema("svg", "image/svg+xml", "The report figure.")
    def report_svg(self, request, pk=None):
        """The experiment's report as an SVG image (see report.png)."""
        return self.report_download(request, "svg")

    @report_schema("pdf", "application/pdf", "The report figure on one page.")
    def report_pdf(self, request, pk=None):
        """The experiment's report as a one-page PDF (see report.png)."""
        return self.report_download(request, "pdf")

    @extend_schema(
        operation_id="experiments_metrics_csv",
        responses={
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR,
                description="A header row, then one row per round and client, with the "
                "columns " + ", ".join(reports.METRIC_COLUMNS) + ". Global metrics are the "
                "round's held-out evaluation, repeated on each of its rows. A segmentation "
                "experiment's columns are "
                + ", ".join(reports.metric_columns("segmentation"))
                + ", with one global_dice_<class name> per foreground class after global_hd95.",
            )
        },
    )
    def metrics_csv(self, request, pk=None):
        """Every client update's metrics, with its round's global metrics, as CSV."""
        experiment = self.get_object()
        table = HttpResponse(
            reports.metrics_csv(experiment), content_type="text/csv; charset=utf-8"
        )
        return self.as_download(table, f"experiment-{experiment.pk}-metrics.csv")

    @extend_schema(
        operation_id="experiments_metrics_json",
        responses={
            (200, "application/json"): OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="`experiment`: the set-up; `rounds`: each round's status, "
                "held-out evaluation (`global`) and client means (`clients`); `clients`: "
                "one object per round and client, with the columns of metrics.csv.",
            )
        },
    )
    def metrics_json(self, request, pk=None):
        """The experiment's set-up, per-round global metrics and per-client metrics."""
        experiment = self.get_object()
        document = JsonResponse(reports.metrics_json(experiment))
        return self.as_download(document, f"experiment-{experiment.pk}-metrics.json")

    @extend_schema(
        operation_id="experiments_cross_site",
        parameters=[
            OpenApiParameter(
                "format",
                str,
                enum=["json", "csv"],
                description="csv: one row per model and site, then one per model over all "
                "sites (weighted by their validation samples); default json.",
            )
        ],
        responses={
            (200, "application/json"): OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="The cross-site evaluation: `models` (rows: `global`, then "
                "each site's last local model by slug), `sites` (columns: whose validation "
                "data), `cells[model][site]` (metrics, or null where the site has none), "
                "`weighted[model]` (over the sites, by samples), the round's `round` and "
                "`status` (both null before it opened), `personalized` (the global model "
                "was evaluated with each site's own local layers, FedBN), and each site's "
                "task `status` and `error` in `clients`.",
            ),
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR,
                description="Columns "
                + ", ".join(evaluations.CSV_COLUMNS)
                + " (segmentation: "
                + ", ".join(evaluations.csv_columns("segmentation"))
                + ").",
            ),
            400: OpenApiResponse(OpenApiTypes.OBJECT, description="`format` is not json or csv."),
        },
    )
    def cross_site(self, request, pk=None):
        """The cross-site evaluation: every model on every site's validation data."""
        experiment = self.get_object()
        fmt = request.query_params.get("format", "json")
        if fmt == "csv":
            return self.cross_site_table(experiment)
        if fmt != "json":
            raise ValidationError({"format": [f"Give json or csv, not {fmt!r}."]})
        return JsonResponse(evaluations.cross_site_document(experiment))

    @extend_schema(
        operation_id="experiments_cross_site_csv",
        responses={
            (200, "text/csv"): OpenApiResponse(
                OpenApiTypes.STR,
                description="The cross-site evaluation (see cross-site/): columns "
                + ", ".join(evaluations.CSV_COLUMNS)
                + " (segmentation: "
                + ", ".join(evaluations.csv_columns("segmentation"))
                + ").",
            )
        },
    )
    def cross_site_csv(self, request, pk=None):
        """The cross-site evaluation as CSV, one row per model and site."""
        return self.cross_site_table(self.get_object())

    def cross_site_table(self, experiment: Experiment) -> HttpResponse:
        table = HttpResponse(
            evaluations.cross_site_csv(experiment), content_type="text/csv; charset=utf-8"
        )
        return self.as_download(table, f"experiment-{experiment.pk}-cross-site.csv")

    def report_download(self, request, fmt: str) -> HttpResponse:
        experiment = self.get_object()
        # Checked after get_object, so that a hidden experiment is a 404 whatever ?round= says.
        round_number = self.requested_round(request)
        try:
            figure = reports.render_report(experiment, fmt, round_number=round_number)
        except reports.UnknownRound as exc:
            raise ValidationError({"round": [str(exc)]}) from exc
        image = HttpResponse(figure, content_type=reports.REPORT_CONTENT_TYPES[fmt])
        return self.as_download(image, f"experiment-{experiment.pk}-report.{fmt}")

    @staticmethod
    def requested_round(request) -> int | None:
        raw = request.query_params.get("round")
        if raw is None:
            return None
        if not (raw.isascii() and raw.isdecimal()) or int(raw) < 1:
            raise ValidationError({"round": [f"Give a round number (1, 2, ...), not {raw!r}."]})
        return int(raw)

    @staticmethod
    def as_download(response: HttpResponse, filename: str) -> HttpResponse:
        response["Content-Disposition"] = content_disposition_header(True, filename)
        return response
