"""What the Site API accepts from a site's agent and what it answers."""

import json
import math

from django.conf import settings
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from training.models import ApprovalStatus, ExperimentApproval, Site, SiteDataset, StorageFormat

MAX_DEVICES = 64
MAX_METRICS = 64
MAX_EXTRAS_BYTES = 64 * 1024
MAX_EVALUATION_BYTES = 256 * 1024
MAX_STATISTICS_BYTES = 256 * 1024
MAX_ERROR_CHARACTERS = 4000


def json_size(value) -> int:
    return len(json.dumps(value, allow_nan=False))


class DeviceSerializer(serializers.Serializer):
    kind = serializers.ChoiceField(choices=["cuda", "cpu", "mps"])
    name = serializers.CharField(max_length=200)
    memory_mb = serializers.IntegerField(min_value=0, required=False, allow_null=True)
    threads = serializers.IntegerField(min_value=1, required=False, allow_null=True)


class AgentStateSerializer(serializers.Serializer):
    agent_version = serializers.CharField(max_length=50)
    devices = DeviceSerializer(many=True, max_length=MAX_DEVICES)


class EnrolmentSerializer(AgentStateSerializer):
    token = serializers.CharField(max_length=200, trim_whitespace=True)
    hostname = serializers.CharField(max_length=255, required=False, allow_blank=True)


class HeartbeatSerializer(AgentStateSerializer):
    requires_approval = serializers.BooleanField()


class SiteIdentitySerializer(serializers.ModelSerializer):
    class Meta:
        model = Site
        fields = ["slug", "name"]


class IssuedCredentialSerializer(serializers.Serializer):
    site = SiteIdentitySerializer()
    credential = serializers.CharField(
        source="key", help_text="Send as 'Authorization: Site <credential>'. Shown once."
    )
    broker_url = serializers.CharField(help_text="The site's own broker user. Shown once.")
    queue = serializers.CharField(source="site.queue")
    visibility_timeout = serializers.SerializerMethodField(
        help_text="Seconds after which the broker delivers an unacknowledged task again; the "
        "agent's consumer must use the server's value."
    )

    def get_visibility_timeout(self, issued) -> int:
        return settings.CELERY_BROKER_TRANSPORT_OPTIONS["visibility_timeout"]


class SiteDatasetSerializer(serializers.ModelSerializer):
    """A site's declaration of its part of a federated dataset: metadata, never a path."""

    name = serializers.CharField(source="dataset.name", read_only=True)
    dataset = serializers.IntegerField(source="dataset_id", read_only=True)
    num_classes = serializers.IntegerField(min_value=2, max_value=1000, write_only=True)
    class_names = serializers.ListField(
        child=serializers.CharField(max_length=100), max_length=1000, write_only=True
    )
    channels = serializers.ChoiceField(choices=[1, 3], write_only=True)
    storage_format = serializers.ChoiceField(choices=StorageFormat.choices)
    num_samples = serializers.IntegerField(min_value=1, max_value=100_000_000)
    counts_per_class = serializers.ListField(
        child=serializers.IntegerField(min_value=0), max_length=1000
    )
    image_shape = serializers.ListField(
        child=serializers.IntegerField(min_value=1, max_value=100_000), max_length=3
    )
    spacing = serializers.ListField(
        child=serializers.FloatField(min_value=0, max_value=1000), max_length=3
    )
    statistics = serializers.JSONField(required=False)

    class Meta:
        model = SiteDataset
        fields = ["name", "dataset", "num_classes", "class_names", "channels", "storage_format",
                  "num_samples", "counts_per_class", "image_shape", "spacing", "statistics",
                  "declared_at", "updated_at"]  # fmt: skip
        read_only_fields = ["declared_at", "updated_at"]

    def validate_statistics(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("Give an object of statistics.")
        if json_size(value) > MAX_STATISTICS_BYTES:
            raise serializers.ValidationError(
                f"Statistics over {MAX_STATISTICS_BYTES // 1024} KiB; send a summary."
            )
        return value

    def validate(self, attrs):
        errors = {}
        if len(attrs["counts_per_class"]) != attrs["num_classes"]:
            errors["counts_per_class"] = (
                f"Give one count per class ({attrs['num_classes']}), in class order."
            )
        elif sum(attrs["counts_per_class"]) != attrs["num_samples"]:
            errors["counts_per_class"] = "The counts per class must add up to num_samples."
        if attrs["class_names"] and len(attrs["class_names"]) != attrs["num_classes"]:
            errors["class_names"] = f"Give exactly num_classes ({attrs['num_classes']}) names."
        if len(set(attrs["class_names"])) != len(attrs["class_names"]):
            errors["class_names"] = "Class names must be unique."
        if attrs["image_shape"] and len(attrs["image_shape"]) not in (2, 3):
            errors["image_shape"] = "Give 2 or 3 sizes, e.g. [64, 64] or [32, 64, 64]."
        if attrs["spacing"] and len(attrs["spacing"]) != len(attrs["image_shape"]):
            errors["spacing"] = "Give one spacing per image dimension."
        if errors:
            raise serializers.ValidationError(errors)
        return attrs


class ApprovalSerializer(serializers.ModelSerializer):
    experiment = serializers.IntegerField(source="experiment_id", read_only=True)
    name = serializers.CharField(source="experiment.name", read_only=True)
    owner = serializers.CharField(source="experiment.owner.username", read_only=True)
    dataset = serializers.CharField(source="experiment.dataset.name", read_only=True)
    network = serializers.CharField(source="experiment.network", read_only=True)
    strategy = serializers.CharField(source="experiment.strategy", read_only=True)
    rounds = serializers.IntegerField(source="experiment.num_rounds", read_only=True)

    class Meta:
        model = ExperimentApproval
        fields = ["experiment", "name", "owner", "dataset", "network", "strategy", "rounds",
                  "status", "reason", "requested_at", "decided_at"]  # fmt: skip
        read_only_fields = fields


class ApprovalDecisionSerializer(serializers.Serializer):
    decision = serializers.ChoiceField(choices=["approve", "refuse"])
    reason = serializers.CharField(max_length=2000, required=False, allow_blank=True)

    def validate(self, attrs):
        if attrs["decision"] == "refuse" and not attrs.get("reason", "").strip():
            raise serializers.ValidationError({"reason": "Say why the experiment is refused."})
        attrs["status"] = (
            ApprovalStatus.APPROVED if attrs["decision"] == "approve" else ApprovalStatus.REFUSED
        )
        return attrs


class ClaimSerializer(serializers.Serializer):
    round = serializers.IntegerField(min_value=1, help_text="The round id in the task's message.")
    worker = serializers.CharField(max_length=255, required=False, allow_blank=True)


class ClientReportSerializer(serializers.Serializer):
    num_samples = serializers.IntegerField(min_value=1, max_value=100_000_000)
    metrics = serializers.DictField(help_text="Numbers (loss, accuracy, ...) or short strings.")
    extras = serializers.DictField(required=False, help_text="Per-client results (JSON).")
    evaluation = serializers.DictField(
        required=False,
        help_text="Metrics on the site's validation split: of the round's starting model in a "
        "train task; {model label: metrics} in an evaluate task.",
    )

    def validate_metrics(self, value):
        if len(value) > MAX_METRICS:
            raise serializers.ValidationError(f"At most {MAX_METRICS} metrics.")
        for name, number in value.items():
            if len(name) > 100:
                raise serializers.ValidationError("Metric names are at most 100 characters.")
            if isinstance(number, str):
                if len(number) > 200:
                    raise serializers.ValidationError(f"Metric {name!r} is too long a text.")
            elif (
                isinstance(number, bool)
                or not isinstance(number, int | float)
                or not math.isfinite(number)
            ):
                raise serializers.ValidationError(f"Metric {name!r} must be a finite number.")
        return value

    def validate_extras(self, value):
        if json_size(value) > MAX_EXTRAS_BYTES:
            raise serializers.ValidationError(f"Extras over {MAX_EXTRAS_BYTES // 1024} KiB.")
        return value

    def validate_evaluation(self, value):
        try:
            size = json_size(value)
        except ValueError:
            raise serializers.ValidationError("Give finite numbers as metrics.") from None
        if size > MAX_EVALUATION_BYTES:
            raise serializers.ValidationError(
                f"Evaluation over {MAX_EVALUATION_BYTES // 1024} KiB; send a summary."
            )
        return value


class ClientFailureSerializer(serializers.Serializer):
    error = serializers.CharField(max_length=MAX_ERROR_CHARACTERS)


class RecordedSerializer(serializers.Serializer):
    recorded = serializers.BooleanField()
    detail = serializers.CharField(required=False)


class UploadedSerializer(serializers.Serializer):
    sha256 = serializers.CharField()
    size_bytes = serializers.IntegerField()


class SiteStateSerializer(serializers.ModelSerializer):
    queue = serializers.CharField(read_only=True)
    datasets = serializers.SerializerMethodField(help_text="Names of the declared datasets.")

    class Meta:
        model = Site
        fields = ["slug", "name", "queue", "requires_approval", "last_seen", "agent_version",
                  "datasets"]  # fmt: skip

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_datasets(self, site) -> list[str]:
        return sorted(site.declared_datasets.values_list("dataset__name", flat=True))
