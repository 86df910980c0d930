"""ViewSets of the REST API. Visibility is decided by each queryset; changes by permissions."""

from django.db.models import Prefetch
from django.http import FileResponse, HttpResponse, JsonResponse
from django.utils.http import content_disposition_header
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import NotFound, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from training import services
from training.api.filters import (
    CheckpointFilter,
    ClientUpdateFilter,
    DatasetFilter,
    ExperimentFilter,
    RoundFilter,
    SiteFilter,
)
from training.api.permissions import IsOwnerOrStaffToChange, IsStaffOrReadOnly
from training.api.serializers import (
    CheckpointSerializer,
    ClientUpdateSerializer,
    DatasetSerializer,
    ExperimentSerializer,
    RoundSerializer,
    SiteSerializer,
)
from training.models import (
    Checkpoint,
    ClientUpdate,
    Dataset,
    Experiment,
    ExperimentStatus,
    InvalidTransition,
    Round,
    Site,
)
from visualization import reports


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


class SiteViewSet(viewsets.ModelViewSet):
    queryset = Site.objects.all()
    serializer_class = SiteSerializer
    permission_classes = [IsAuthenticated, IsStaffOrReadOnly]
    filterset_class = SiteFilter
    search_fields = ["name", "slug", "description"]
    ordering_fields = ["name", "slug", "created_at", "last_seen"]


class DatasetViewSet(viewsets.ModelViewSet):
    queryset = Dataset.objects.none()  # the schema's model; get_queryset filters
    serializer_class = DatasetSerializer
    permission_classes = [IsAuthenticated, IsOwnerOrStaffToChange]
    filterset_class = DatasetFilter
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at", "num_classes"]

    def get_queryset(self):
        return Dataset.objects.visible_to(self.request.user).select_related("owner")

    def perform_create(self, serializer):
        serializer.save(owner=self.request.user)


class ExperimentViewSet(viewsets.ModelViewSet):
    queryset = Experiment.objects.none()  # the schema's model; get_queryset filters
    serializer_class = ExperimentSerializer
    permission_classes = [IsAuthenticated, IsOwnerOrStaffToChange]
    filterset_class = ExperimentFilter
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at", "status", "started_at", "finished_at"]

    def get_queryset(self):
        return (
            Experiment.objects.visible_to(self.request.user)
            .select_related("owner", "dataset")
            .prefetch_related("members", Prefetch("sites", queryset=Site.objects.only("slug")))
        )

    def perform_create(self, serializer):
        serializer.save(owner=self.request.user)

    def perform_update(self, serializer):
        if serializer.instance.status != ExperimentStatus.DRAFT:
            raise InvalidTransition(
                f"Experiment {serializer.instance.pk} is {serializer.instance.status}; "
                "only a draft can be edited. Create a new experiment instead."
            )
        serializer.save()

    def perform_destroy(self, instance):
        if instance.status in (ExperimentStatus.QUEUED, ExperimentStatus.RUNNING):
            raise InvalidTransition(
                f"Experiment {instance.pk} is {instance.status}; stop it before deleting it."
            )
        instance.delete()

    @extend_schema(request=None, responses={200: ExperimentSerializer, 409: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["post"])
    def start(self, request, pk=None):
        """Start a draft experiment: it becomes running and round 1 opens."""
        experiment = services.start_experiment(self.get_object().pk)
        return Response(self.get_serializer(self.get_queryset().get(pk=experiment.pk)).data)

    @extend_schema(request=None, responses={200: ExperimentSerializer, 409: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        """Stop a queued or running experiment; the open round is marked failed."""
        experiment = services.stop_experiment(self.get_object().pk)
        return Response(self.get_serializer(self.get_queryset().get(pk=experiment.pk)).data)

    # Report and metric downloads. training/api/urls.py routes them because their URLs end in
    # a file name, not a slash. They answer whatever Accept asks for; their errors stay JSON.
    download_actions = frozenset(
        {"report_png", "report_svg", "report_pdf", "metrics_csv", "metrics_json"}
    )

    def perform_content_negotiation(self, request, force=False):
        force = force or self.action in self.download_actions
        return super().perform_content_negotiation(request, force=force)

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
                "round's held-out evaluation, repeated on each of its rows.",
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


class ExperimentLedgerViewSet(viewsets.ReadOnlyModelViewSet):
    """Read-only ledger rows, visible when their experiment is."""

    experiment_lookup = "experiment"

    def visible_experiments(self):
        return Experiment.objects.visible_to(self.request.user).values("pk")

    def get_queryset(self):
        return self.ledger_queryset().filter(
            **{f"{self.experiment_lookup}__in": self.visible_experiments()}
        )


class RoundViewSet(ExperimentLedgerViewSet):
    queryset = Round.objects.none()  # the schema's model; get_queryset filters
    serializer_class = RoundSerializer
    filterset_class = RoundFilter
    ordering_fields = ["number", "opened_at", "closed_at"]

    def ledger_queryset(self):
        return Round.objects.select_related("checkpoint")


class ClientUpdateViewSet(ExperimentLedgerViewSet):
    queryset = ClientUpdate.objects.none()  # the schema's model; get_queryset filters
    serializer_class = ClientUpdateSerializer
    filterset_class = ClientUpdateFilter
    ordering_fields = ["started_at", "finished_at", "status"]
    experiment_lookup = "round__experiment"

    def ledger_queryset(self):
        return ClientUpdate.objects.select_related("round", "site")


class CheckpointViewSet(ExperimentLedgerViewSet):
    queryset = Checkpoint.objects.none()  # the schema's model; get_queryset filters
    serializer_class = CheckpointSerializer
    filterset_class = CheckpointFilter
    ordering_fields = ["created_at", "size_bytes"]

    def ledger_queryset(self):
        return Checkpoint.objects.select_related("round")

    @extend_schema(
        responses={
            (200, "application/octet-stream"): OpenApiResponse(
                OpenApiTypes.BINARY, description="The weights as a safetensors file."
            )
        }
    )
    @action(detail=True, methods=["get"])
    def download(self, request, pk=None):
        """Download the checkpoint's weights (safetensors); X-Checksum-SHA256 gives its hash."""
        checkpoint = self.get_object()
        try:
            handle = checkpoint.file.open("rb")
        except FileNotFoundError as exc:
            raise NotFound(
                "The checkpoint's file is missing from the model store; restore it from backup."
            ) from exc
        round_part = f"round-{checkpoint.round.number}" if checkpoint.round else "initial"
        response = FileResponse(
            handle,
            as_attachment=True,
            filename=f"experiment-{checkpoint.experiment_id}-{round_part}.safetensors",
            content_type="application/octet-stream",
        )
        response["X-Checksum-SHA256"] = checkpoint.sha256
        return response
