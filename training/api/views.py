"""ViewSets of the REST API. Visibility is decided by each queryset; changes by permissions."""

from django.db.models import Prefetch
from django.http import FileResponse
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiResponse, extend_schema, inline_serializer
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action, api_view, permission_classes
from rest_framework.exceptions import NotFound, PermissionDenied, ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from training import audit, services, sweeps
from training.api.errors import save_dataset_unless_name_taken
from training.api.filters import (
    CheckpointFilter,
    ClientUpdateFilter,
    DatasetFilter,
    ExperimentFilter,
    RoundFilter,
    SiteFilter,
)
from training.api.permissions import RolePermission
from training.api.serializers import (
    CLIENT_UPDATE_COLUMNS,
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
from training.resume import resume_experiment

# The slug names the site's queue and its agents' credentials; is_active decides whether
# experiments may use it.
ADMIN_ONLY_SITE_FIELDS = ("slug", "is_active")


class SiteViewSet(viewsets.ModelViewSet):
    queryset = Site.objects.all()
    serializer_class = SiteSerializer
    permission_classes = [IsAuthenticated, RolePermission]
    filterset_class = SiteFilter
    search_fields = ["name", "slug", "description"]
    ordering_fields = ["name", "slug", "created_at", "last_seen"]

    def perform_update(self, serializer):
        changing = [
            field
            for field in ADMIN_ONLY_SITE_FIELDS
            if field in serializer.validated_data
            and serializer.validated_data[field] != getattr(serializer.instance, field)
        ]
        if changing and not self.request.user.has_perm("fedlens.administer_site"):
            raise PermissionDenied(
                f"Only an admin may change a site's {' or '.join(changing)}; you may change "
                "its name and description. Ask a FedLens admin for the rest."
            )
        serializer.save()


class DatasetViewSet(viewsets.ModelViewSet):
    queryset = Dataset.objects.none()  # the schema's model; get_queryset filters
    serializer_class = DatasetSerializer
    permission_classes = [IsAuthenticated, RolePermission]
    filterset_class = DatasetFilter
    search_fields = ["name", "description"]
    ordering_fields = ["name", "created_at", "num_classes"]

    def get_queryset(self):
        return (
            Dataset.objects.visible_to(self.request.user)
            .select_related("owner")
            .prefetch_related("declarations__site")
        )

    def perform_create(self, serializer):
        save_dataset_unless_name_taken(serializer, owner=self.request.user)

    def perform_update(self, serializer):
        save_dataset_unless_name_taken(serializer)


class ExperimentViewSet(viewsets.ModelViewSet):
    queryset = Experiment.objects.none()  # the schema's model; get_queryset filters
    serializer_class = ExperimentSerializer
    permission_classes = [IsAuthenticated, RolePermission]
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
        audit.record(experiment, "start", actor=request.user, status=experiment.status)
        return Response(self.get_serializer(self.get_queryset().get(pk=experiment.pk)).data)

    @extend_schema(
        request=OpenApiTypes.OBJECT,
        responses={201: ExperimentSerializer, 400: OpenApiTypes.OBJECT},
        description="Run again with changes: a new draft of yours with this experiment's "
        "settings and the ones in the body (any experiment setting, e.g. "
        '{"strategy": "fedprox", "seed": 1}); its cloned_from is this experiment. Anyone who '
        "can see the experiment may clone it.",
    )
    @action(detail=True, methods=["post"], permission_classes=[IsAuthenticated, RolePermission])
    def clone(self, request, pk=None):
        """Clone the experiment into a new draft of the requesting user, with changes."""
        if not isinstance(request.data, dict):
            raise ValidationError({"detail": "Give an object of the settings to change."})
        try:
            clone = sweeps.clone_experiment(self.get_object(), request.user, dict(request.data))
        except sweeps.SettingsError as refused:
            raise ValidationError(refused.as_api_errors()) from refused
        return Response(
            self.get_serializer(self.get_queryset().get(pk=clone.pk)).data,
            status=status.HTTP_201_CREATED,
        )

    @extend_schema(
        request=None,
        responses={
            200: ExperimentSerializer,
            409: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description='Not resumable; "detail" says why (not running, or a live '
                "embedded process still runs it).",
            ),
        },
        description="Continue a running experiment from its last closed round, after the "
        "process that ran it died: the open round's unfinished clients are sent again, or "
        "its aggregation. Only a running experiment resumes; in embedded mode, only when no "
        "live process runs it. Needs the right to start it.",
    )
    @action(detail=True, methods=["post"])
    def resume(self, request, pk=None):
        """Resume a running experiment whose process died."""
        resumed = resume_experiment(self.get_object().pk)
        audit.record(resumed.experiment, "resume", actor=request.user, sent=resumed.what)
        return Response(self.get_serializer(self.get_queryset().get(pk=resumed.experiment.pk)).data)

    @extend_schema(request=None, responses={200: ExperimentSerializer, 409: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["post"])
    def stop(self, request, pk=None):
        """Stop a queued or running experiment; the open round is marked failed."""
        experiment = services.stop_experiment(self.get_object().pk)
        audit.record(experiment, "stop", actor=request.user)
        return Response(self.get_serializer(self.get_queryset().get(pk=experiment.pk)).data)


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
        return ClientUpdate.objects.select_related("round", "site").only(*CLIENT_UPDATE_COLUMNS)


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


@extend_schema(
    responses={
        200: inline_serializer(
            name="StrategyDescription",
            fields={
                "name": serializers.CharField(),
                "title": serializers.CharField(),
                "paper": serializers.CharField(),
                "description": serializers.CharField(),
                "parameters": serializers.ListField(
                    child=serializers.DictField(),
                    help_text="Each parameter's name, type, default, description and range.",
                ),
            },
            many=True,
        )
    }
)
@api_view(["GET"])
@permission_classes([IsAuthenticated])
def strategy_list(request):
    """Every aggregation strategy: its paper, and each parameter's type, default and range."""
    # The engine's catalogue loads PyTorch: imported by the request that reads it.
    from training.fl.strategies import describe_strategies

    return Response(describe_strategies())
