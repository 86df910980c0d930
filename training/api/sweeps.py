"""Sweeps over the REST API: create a grid of queued experiments, list them, compare them."""

from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import extend_schema, extend_schema_field
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import ValidationError
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response

from training import comparison, sweeps
from training.api.permissions import RolePermission
from training.models import Experiment, Sweep


class SweepExperimentSerializer(serializers.ModelSerializer):
    class Meta:
        model = Experiment
        fields = ["id", "name", "status", "strategy", "partition", "seed", "current_round",
                  "num_rounds", "failure_reason"]  # fmt: skip


@extend_schema_field(
    {
        "type": "object",
        "description": "Experiment setting -> list of values; one experiment per combination. "
        'e.g. {"strategy": ["fedavg", "fedprox"], "partition": ["iid", "dirichlet:0.1"], '
        '"seed": [0, 1, 2]}. Any setting of an experiment, strategy_params included.',
        "additionalProperties": {"type": "array", "minItems": 1, "items": {}},
    }
)
class GridField(serializers.JSONField):
    pass


@extend_schema_field(
    {
        "type": "object",
        "description": "The experiment settings every combination shares (as POST "
        "/api/experiments/ takes them: dataset, sites, num_rounds, ...).",
        "additionalProperties": True,
    }
)
class BaseSettingsField(serializers.JSONField):
    pass


class SweepSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    base_settings = BaseSettingsField()
    grid = GridField()
    experiments = SweepExperimentSerializer(many=True, read_only=True)

    class Meta:
        model = Sweep
        fields = ["id", "name", "description", "owner", "base_settings", "grid", "max_running",
                  "target_metric", "target_value", "created_at", "experiments"]  # fmt: skip
        read_only_fields = ["created_at"]

    def create(self, validated_data):
        try:
            return sweeps.create_sweep(self.context["request"].user, **validated_data)
        except sweeps.SettingsError as refused:
            raise ValidationError(refused.as_api_errors()) from refused


class SweepViewSet(
    mixins.CreateModelMixin,
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    viewsets.GenericViewSet,
):
    """A sweep: one experiment per combination of the grid, queued and started up to
    max_running at a time. Staff see every sweep; others their own."""

    queryset = Sweep.objects.none()  # the schema's model; get_queryset filters
    serializer_class = SweepSerializer
    permission_classes = [IsAuthenticated, RolePermission]
    ordering_fields = ["created_at", "name"]
    search_fields = ["name", "description"]

    def get_queryset(self):
        sweeps_seen = Sweep.objects.select_related("owner").prefetch_related("experiments")
        if self.request.user.is_staff:
            return sweeps_seen
        return sweeps_seen.filter(owner=self.request.user)

    def create(self, request, *args, **kwargs):
        serializer = self.get_serializer(data=request.data)
        serializer.is_valid(raise_exception=True)
        sweep = serializer.save()
        fresh = self.get_serializer(self.get_queryset().get(pk=sweep.pk))
        return Response(fresh.data, status=status.HTTP_201_CREATED)

    @extend_schema(responses={200: OpenApiTypes.OBJECT})
    @action(detail=True, methods=["get"])
    def comparison(self, request, pk=None):
        """The sweep's experiments grouped by their grid values except the seed: final
        metrics, rounds to reach the target metric (mean ± std over seeds), final metrics
        per site, and the learning curve of the target metric."""
        return Response(comparison.sweep_comparison(self.get_object()))
