"""Serializers: what the API shows of the ledger and how it checks what users send."""

import math
from pathlib import Path

from django.conf import settings
from django.contrib.auth import get_user_model
from django.db.models import Q
from drf_spectacular.extensions import OpenApiSerializerFieldExtension
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from training.fl.data import (
    NORMALIZATION_FORMS,
    DatasetFormatError,
    ImageReadError,
    NormalizationError,
    check_normalization,
)
from training.fl.data.formats import FORMAT_NAMES, DatasetFormat, get_format
from training.fl.data.partition import parse_partition_spec
from training.models import (
    Checkpoint,
    ClientUpdate,
    Dataset,
    Experiment,
    NoiseLocation,
    Round,
    Site,
)
from training.sampling import clients_in_round


class SiteSerializer(serializers.ModelSerializer):
    queue = serializers.CharField(read_only=True, help_text="The site's Celery queue.")

    class Meta:
        model = Site
        fields = [
            "id",
            "name",
            "slug",
            "queue",
            "description",
            "is_active",
            "last_seen",
            "created_at",
        ]
        read_only_fields = ["last_seen", "created_at"]


def is_within_dataset_roots(path: Path) -> bool:
    return any(path == root or root in path.parents for root in settings.FEDLENS_DATASET_ROOTS)


NORMALIZATION_HELP = (
    f"Intensity normalization: {NORMALIZATION_FORMS}. Blank uses the format's default: "
    "zscore for image folders, mean-std:0.5,0.5 for 8-bit .npz (MedMNIST's convention, after "
    "dividing by 255), none for other .npz."
)
VALIDATION_FRACTION_HELP = (
    "The seeded share of each site's data kept for federated evaluation, from 0 to 0.9 "
    "(default 0.2)."
)


class DatasetSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    sites = serializers.SerializerMethodField(
        help_text="For a federated dataset: the slugs of the sites that declared it."
    )
    channels = serializers.IntegerField(
        required=False,
        help_text="Image channels the network takes: 1 (grey) or 3 (colour); grey images "
        "are repeated, colour ones collapsed by luma. Left out, it is read from the data.",
    )
    normalization = serializers.CharField(
        required=False,
        allow_blank=True,
        max_length=100,
        help_text=NORMALIZATION_HELP,
    )
    validation_fraction = serializers.FloatField(required=False, help_text=VALIDATION_FRACTION_HELP)
    num_classes = serializers.IntegerField(
        required=False,
        min_value=2,
        max_value=1000,
        help_text="Classes the labels hold; for segmentation including the background. "
        "Required for classification; a segmentation dataset's is read from its data.",
    )

    class Meta:
        model = Dataset
        fields = [
            "id",
            "name",
            "owner",
            "description",
            "modality",
            "storage_format",
            "task",
            "num_classes",
            "class_names",
            "channels",
            "image_shape",
            "spacing",
            "normalization",
            "validation_fraction",
            "path",
            "is_federated",
            "sites",
            "created_at",
        ]
        read_only_fields = ["is_federated", "task", "created_at"]

    @extend_schema_field(serializers.ListField(child=serializers.CharField()))
    def get_sites(self, dataset) -> list[str]:
        return [declaration.site.slug for declaration in dataset.declarations.all()]

    def validate_class_names(self, value):
        if not isinstance(value, list) or not all(
            isinstance(name, str) and name.strip() for name in value
        ):
            raise serializers.ValidationError("Give a list of non-empty class names.")
        if len(set(value)) != len(value):
            raise serializers.ValidationError("Class names must be unique.")
        return value

    def validate_image_shape(self, value):
        if value == []:
            return value
        if (
            not isinstance(value, list)
            or len(value) not in (2, 3)
            or not all(isinstance(size, int) and size > 0 for size in value)
        ):
            raise serializers.ValidationError(
                "Give 2 or 3 positive whole numbers, e.g. [64, 64] or [32, 64, 64]."
            )
        return value

    def validate_channels(self, value):
        if value not in (1, 3):
            raise serializers.ValidationError(
                "Give 1 (grey) or 3 (colour), or leave it out to read it from the data."
            )
        return value

    def validate_normalization(self, value):
        try:
            return check_normalization(value)
        except NormalizationError as error:
            raise serializers.ValidationError(str(error)) from None

    def validate_validation_fraction(self, value):
        if not (math.isfinite(value) and 0 <= value <= 0.9):
            raise serializers.ValidationError(
                "Give the share of each site's data kept for federated evaluation, from 0 "
                "to 0.9 (e.g. 0.2)."
            )
        return value

    def validate_spacing(self, value):
        if value == []:
            return value
        if not isinstance(value, list) or not all(
            isinstance(step, int | float) and not isinstance(step, bool) and step > 0
            for step in value
        ):
            raise serializers.ValidationError("Give positive numbers (millimetres per voxel).")
        return value

    def validate_path(self, value):
        if not value:
            return value
        path = Path(value)
        if not path.is_absolute():
            raise serializers.ValidationError("Give an absolute path on the server.")
        resolved = path.resolve()
        if not is_within_dataset_roots(resolved):
            roots = ", ".join(str(root) for root in settings.FEDLENS_DATASET_ROOTS)
            raise serializers.ValidationError(
                f"Datasets on the server must lie under {roots} (FEDLENS_DATASET_ROOTS)."
            )
        if not resolved.exists():
            raise serializers.ValidationError(f"Nothing exists at {resolved}.")
        if self._folder_of_another_owner(resolved):
            # Neither the other dataset nor its owner is named: the caller may not see them.
            raise serializers.ValidationError(
                "This folder holds, or lies inside, a dataset that another user registered; "
                "a folder belongs to one owner's datasets only. Choose a folder of your own "
                "(or upload the data: POST /api/datasets/upload/)."
            )
        return str(resolved)

    def _folder_of_another_owner(self, folder: Path) -> bool:
        """Whether `folder` is, contains or lies inside another owner's dataset folder."""
        if self.instance is not None:
            owner = self.instance.owner
        else:  # the command line names the owner; the API's is the requesting user
            owner = self.context.get("owner") or self.context["request"].user
        overlapping = (
            Q(path=str(folder))
            | Q(path__startswith=f"{folder}/")
            | Q(path__in=[str(parent) for parent in folder.parents])
        )
        return Dataset.objects.exclude(owner=owner).filter(overlapping).exists()

    def validate(self, attrs):
        merged = {**self._current_values(), **attrs}
        errors = {}
        if not merged.get("path") and not (self.instance and self.instance.is_federated):
            errors["path"] = (
                "Give the data's path on the server. Data that stays at hospitals is declared "
                "by their site agents (python -m workers.site datasets add), not here."
            )
        if not merged.get("storage_format") and not (self.instance and self.instance.is_federated):
            errors["storage_format"] = (
                f"Say how the data is stored: one of {', '.join(FORMAT_NAMES)}."
            )
        if errors:
            raise serializers.ValidationError(errors)
        data_format = get_format(merged["storage_format"]) if merged.get("storage_format") else None
        if data_format is not None:
            attrs["task"] = data_format.task
            if data_format.task == "segmentation" and self._data_changed(attrs):
                # What the request gives wins; the rest is read from the data.
                for field, value in self._described(data_format, merged).items():
                    if field not in attrs:
                        attrs[field] = merged[field] = value
        if not merged.get("num_classes"):
            errors["num_classes"] = "This field is required: how many classes the labels hold."
        class_names = merged.get("class_names") or []
        if class_names and len(class_names) != merged.get("num_classes"):
            errors["class_names"] = (
                f"Give exactly num_classes ({merged.get('num_classes')}) class names."
            )
        image_shape, spacing = merged.get("image_shape") or [], merged.get("spacing") or []
        if spacing and len(spacing) != len(image_shape):
            errors["spacing"] = "Give one spacing per image dimension (same length as image_shape)."
        if errors:
            raise serializers.ValidationError(errors)
        if "channels" not in merged:
            attrs["channels"] = merged["channels"] = self._channels_of_the_data(merged)
        try:
            check_normalization(merged.get("normalization") or "", channels=merged["channels"])
        except NormalizationError as error:
            raise serializers.ValidationError({"normalization": str(error)}) from None
        return attrs

    def _data_changed(self, attrs: dict) -> bool:
        """Whether the data must be read again: a new dataset, or a new path, format or
        classes. The register_dataset command reads it itself (context "described")."""
        if self.context.get("described"):
            return False
        return self.instance is None or bool({"path", "storage_format", "class_names"} & set(attrs))

    @staticmethod
    def _described(data_format: DatasetFormat, merged: dict) -> dict:
        """A segmentation dataset's facts, every mask checked; its errors name the file."""
        try:
            description = data_format.describe(
                Path(merged["path"]),
                class_names=merged.get("class_names") or None,
                max_voxels=settings.FEDLENS_MAX_VOLUME_VOXELS,
            )
        except (DatasetFormatError, ImageReadError, OSError) as error:
            raise serializers.ValidationError({"path": str(error)}) from None
        return description.ledger_fields()

    @staticmethod
    def _channels_of_the_data(merged: dict) -> int:
        """A new dataset's channels when not given: the stored images' (1 or 3). Data that
        cannot be read yet keeps the default of 1, as registration never required readable
        data; an experiment on it reports the read error."""
        from training.fl.data import native_channels

        try:
            return native_channels(merged["path"], merged["storage_format"])
        except (DatasetFormatError, ImageReadError, OSError, ValueError):
            return Dataset._meta.get_field("channels").default

    def _current_values(self) -> dict:
        if self.instance is None:
            return {}
        return {
            field: getattr(self.instance, field)
            for field in (
                "path",
                "storage_format",
                "class_names",
                "num_classes",
                "image_shape",
                "spacing",
                "channels",
                "normalization",
            )
        }


class VisibleDatasetField(serializers.PrimaryKeyRelatedField):
    """Only datasets the requesting user may use can be chosen; a clone may also keep the
    dataset of the experiment it copies (context "clone_of"), which its viewer can see."""

    def get_queryset(self):
        visible = Dataset.objects.visible_to(self.context["request"].user)
        source = self.context.get("clone_of")
        if source is not None:
            visible = visible | Dataset.objects.filter(pk=source.dataset_id)
        return visible


# The engine's catalogues of networks and strategies (and its checks of a network) are
# imported where they are used below: they load PyTorch, which a web process does not load
# until it validates an experiment.


def strategy_params_schema() -> dict:
    """OpenAPI: the parameters object of each strategy, with types, defaults and ranges."""
    from training.fl.strategies import describe_strategies

    variants = []
    for strategy in describe_strategies():
        properties = {}
        for parameter in strategy["parameters"]:
            schema = {
                "type": "integer" if parameter["type"] == "int" else "number",
                "default": parameter["default"],
                "description": parameter.get("description", ""),
            }
            for bound in ("minimum", "maximum"):
                if parameter.get(bound) is not None:
                    schema[bound] = parameter[bound]
            if parameter.get("exclusive_minimum"):
                schema["exclusiveMinimum"] = True
            properties[parameter["name"]] = schema
        variants.append(
            {
                "title": strategy["name"],
                "description": f"{strategy['title']} ({strategy['paper']})",
                "type": "object",
                "properties": properties,
                "additionalProperties": False,
            }
        )
    return {
        "type": "object",
        "description": "The chosen strategy's parameters; a missing one takes its default. "
        "One variant per strategy, titled by its name.",
        "anyOf": variants,
    }


class StrategyParamsField(serializers.JSONField):
    """A JSON object checked against the chosen strategy in ExperimentSerializer.validate."""


class StrategyParamsFieldSchema(OpenApiSerializerFieldExtension):
    """The schema of StrategyParamsField, built when a schema is generated."""

    target_class = StrategyParamsField

    def map_serializer_field(self, auto_schema, direction):
        return strategy_params_schema()


def strategy_choices() -> list[tuple[str, str]]:
    from training.fl.strategies import available_strategies, describe_strategies

    titles = {strategy["name"]: strategy["title"] for strategy in describe_strategies()}
    return [(name, titles.get(name, name)) for name in available_strategies()]


# The experiment settings a user chooses: what a clone copies and a sweep varies.
EXPERIMENT_SETTINGS = (
    "name", "description", "dataset", "sites", "network", "network_params", "strategy",
    "strategy_params", "partition", "num_rounds", "clients_per_round", "client_fraction",
    "min_clients", "aggregation_weighting", "local_epochs", "batch_size", "learning_rate",
    "optimizer", "seed", "round_timeout_seconds", "dp_clip", "dp_noise", "dp_delta", "dp_at",
    "local_dp_noise", "local_dp_clip", "patch_size",
)  # fmt: skip
# The network a segmentation experiment gets when none is named (cnn-small classifies).
DEFAULT_SEGMENTATION_NETWORK = "unet"


class ExperimentSerializer(serializers.ModelSerializer):
    owner = serializers.CharField(source="owner.username", read_only=True)
    members = serializers.SlugRelatedField(
        slug_field="username",
        many=True,
        required=False,
        queryset=get_user_model().objects.all(),
        help_text="Usernames of those who may watch this experiment.",
    )
    dataset = VisibleDatasetField()
    dataset_name = serializers.CharField(source="dataset.name", read_only=True)
    sites = serializers.SlugRelatedField(
        slug_field="slug",
        many=True,
        queryset=Site.objects.all(),
        help_text="Slugs of the sites that may be picked as clients.",
    )
    # Choices filled in by get_fields().
    network = serializers.ChoiceField(choices=(), default="cnn-small")
    strategy = serializers.ChoiceField(
        choices=(),
        default="fedavg",
        help_text="The aggregation strategy; GET /api/strategies/ describes each one.",
    )
    strategy_params = StrategyParamsField(required=False)
    # Declared here so that one message says the range, (0, 1], rather than the model's two.
    client_fraction = serializers.FloatField(
        required=False,
        allow_null=True,
        help_text="Clients per round as a share in (0, 1] of the experiment's sites: "
        "ceil(fraction * sites), picked reproducibly from the seed and round.",
    )

    class Meta:
        model = Experiment
        fields = [
            "id",
            *EXPERIMENT_SETTINGS,
            "owner",
            "members",
            "dataset_name",
            "cloned_from",
            "sweep",
            "status",
            "current_round",
            "failure_reason",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
        ]
        read_only_fields = [
            "cloned_from",
            "sweep",
            "status",
            "current_round",
            "failure_reason",
            "created_at",
            "updated_at",
            "started_at",
            "finished_at",
        ]
        extra_kwargs = {
            "clients_per_round": {
                "help_text": "Clients picked per round; ignored (set from the pool) when "
                "client_fraction is given."
            },
            "aggregation_weighting": {
                "help_text": "samples: each update weighs its number of samples; uniform: "
                "each update weighs the same."
            },
        }

    def get_fields(self):
        from training.fl.networks import available_networks

        fields = super().get_fields()
        fields["network"].choices = available_networks()
        fields["strategy"].choices = strategy_choices()
        return fields

    def validate_network_params(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError("Give an object of network parameters.")
        return value

    def validate_strategy_params(self, value):
        if not isinstance(value, dict):
            raise serializers.ValidationError(
                'Give an object of the strategy\'s parameters, e.g. {"mu": 0.01} for fedprox.'
            )
        return value

    def validate_patch_size(self, value):
        if not isinstance(value, list) or not all(
            isinstance(size, int) and not isinstance(size, bool) and size > 0 for size in value
        ):
            raise serializers.ValidationError(
                "Give a list of positive sizes, one per spatial axis in the order of the "
                "dataset's image_shape, e.g. [32, 64, 64] for volumes, or [] for whole images."
            )
        return value

    def validate_client_fraction(self, value):
        if value is not None and not 0 < value <= 1:
            raise serializers.ValidationError(
                "Give a share of the sites in (0, 1], e.g. 0.5 for half of them."
            )
        return value

    @staticmethod
    def network_error(network: str, params: dict, dataset) -> str | None:
        """Why the network cannot be built for this dataset, or None if it can."""
        from training.fl.networks import build_network

        try:
            build_network(
                network,
                in_channels=dataset.channels,
                num_classes=dataset.num_classes,
                spatial_dims=len(dataset.image_shape) if dataset.image_shape else 2,
                **params,
            )
        except (TypeError, ValueError) as exc:
            return str(exc)
        return None

    def validate_partition(self, value):
        try:
            spec = parse_partition_spec(value)
        except ValueError as exc:
            raise serializers.ValidationError(str(exc)) from exc
        if spec.kind == "file" and not is_within_dataset_roots(Path(spec.path).resolve()):
            raise serializers.ValidationError(
                "A partition file must lie under FEDLENS_DATASET_ROOTS."
            )
        return value

    def validate(self, attrs):
        from training.fl.strategies import validate_strategy_params

        merged = {**self._current_values(), **attrs}
        errors = {}
        try:
            attrs["strategy_params"] = validate_strategy_params(
                merged["strategy"], merged.get("strategy_params") or {}
            )
        except ValueError as exc:
            errors["strategy_params"] = str(exc)
        else:
            errors.update(self.krum_errors(merged["strategy"], attrs["strategy_params"], merged))
        if (
            self.instance is None
            and "network" not in self.initial_data
            and merged["dataset"].task == "segmentation"
        ):
            attrs["network"] = merged["network"] = DEFAULT_SEGMENTATION_NETWORK
        network_error = self.network_error(
            merged.get("network", "cnn-small"),
            merged.get("network_params") or {},
            merged["dataset"],
        )
        if network_error:
            errors["network_params"] = network_error
        else:
            errors.update(self.task_errors(merged))
            errors.update(self.fedbn_errors(merged))
        sites = merged.get("sites") or []
        errors.update(self.sampling_errors(merged, attrs, len(sites)))
        errors.update(self.site_partition_errors(merged, len(sites)))
        errors.update(self.privacy_errors(merged))
        dataset = merged["dataset"]
        if dataset.is_federated:
            declared = set(dataset.declarations.values_list("site_id", flat=True))
            missing = sorted(site.slug for site in sites if site.pk not in declared)
            if missing:
                errors["sites"] = (
                    f"Sites {', '.join(missing)} hold no data of {dataset.name!r}; choose among "
                    "the sites that declared it, or ask their operators to declare it."
                )
        if merged.get("client_fraction") is None and len(sites) < merged["clients_per_round"]:
            errors["sites"] = (
                f"Choose at least clients_per_round ({merged['clients_per_round']}) sites; "
                f"{len(sites)} given."
            )
        if errors:
            raise serializers.ValidationError(errors)
        return attrs

    @staticmethod
    def fedbn_errors(merged: dict) -> dict[str, str]:
        """FedBN keeps batch-norm layers at the sites: a network without any would silently
        run FedAvg."""
        if merged.get("strategy") != "fedbn":
            return {}
        from training.fl.networks import build_network
        from training.fl.strategies import batch_norm_parameters

        dataset, network = merged["dataset"], merged.get("network", "cnn-small")
        image_shape = dataset.image_shape or []
        built = build_network(
            network,
            in_channels=dataset.channels,
            num_classes=dataset.num_classes,
            spatial_dims=len(image_shape) if image_shape else 2,
            **(merged.get("network_params") or {}),
        )
        if batch_norm_parameters(built):
            return {}
        return {
            "strategy": f"fedbn keeps each site's batch-norm layers local, but {network} has "
            "none: choose fedavg, or a network with batch normalization (resnet18-small, "
            'densenet121, or unet with network_params {"norm": "batch"}).'
        }

    @staticmethod
    def task_errors(merged: dict) -> dict[str, str]:
        """The network must learn the dataset's task; a segmentation patch must fit the
        images and the network's downsampling; local DP-SGD cannot train segmentation."""
        from training.fl.networks import (
            SEGMENTATION_NETWORKS,
            build_network,
            check_input_shape,
            network_task,
            spatial_divisor,
        )
        from training.fl.privacy import dp_sgd_problem

        dataset, network = merged["dataset"], merged.get("network", "cnn-small")
        params = merged.get("network_params") or {}
        patch_size = merged.get("patch_size") or []
        image_shape = list(dataset.image_shape or [])
        learns = network_task(network)
        if learns != dataset.task:
            if dataset.task == "segmentation":
                fix = f"choose one of {', '.join(SEGMENTATION_NETWORKS)}"
            else:
                fix = "choose a classification network, e.g. cnn-small or densenet121"
            return {
                "network": f"{network} is a {learns} network but dataset {dataset.name!r} is "
                f"for {dataset.task}: {fix}."
            }
        if dataset.task != "segmentation":
            if patch_size:
                return {"patch_size": "Patches are for segmentation: leave patch_size empty."}
            if image_shape:
                try:
                    check_input_shape(network, image_shape, **params)
                except ValueError as exc:
                    return {"network": f"{exc}; or register the dataset with a larger image_shape."}
            if merged.get("local_dp_noise") is not None:
                problem = dp_sgd_problem(
                    build_network(
                        network,
                        in_channels=dataset.channels,
                        num_classes=dataset.num_classes,
                        spatial_dims=len(image_shape) if image_shape else 2,
                        **params,
                    )
                )
                if problem is not None:
                    return {"local_dp_noise": f"Local DP-SGD: {problem}."}
            return {}
        errors = {}
        if merged.get("local_dp_noise") is not None:
            errors["local_dp_noise"] = (
                "Local DP-SGD is not available for segmentation networks (Opacus has no "
                "per-sample gradients for their layers): leave local_dp_noise and "
                "local_dp_clip empty, and use client-level DP (dp_clip, dp_noise) instead."
            )
        spatial_dims = len(image_shape) if image_shape else 2
        if patch_size:
            if len(patch_size) != spatial_dims:
                errors["patch_size"] = (
                    f"Give {spatial_dims} sizes, one per spatial axis of {dataset.name!r}'s "
                    f"images (image_shape {image_shape or 'of 2 axes'}), e.g. "
                    f"{[64] * spatial_dims}."
                )
            elif image_shape and any(p > s for p, s in zip(patch_size, image_shape, strict=True)):
                errors["patch_size"] = (
                    f"Patch {patch_size} is larger than the images {image_shape} along some "
                    "axis: give sizes no larger than image_shape."
                )
            else:
                try:
                    check_input_shape(network, patch_size, **params)
                except ValueError as exc:
                    errors["patch_size"] = f"{exc}."
        elif image_shape:
            # Whole images are padded up to the network's multiple, which must still leave
            # more than one voxel at its lowest level.
            divisor = spatial_divisor(network, **params)
            padded = [-(-size // divisor) * divisor for size in image_shape]
            try:
                check_input_shape(network, padded, **params)
            except ValueError as exc:
                errors["patch_size"] = f"Whole images are too small: {exc}."
        return errors

    @staticmethod
    def krum_errors(strategy: str, params: dict, merged: dict) -> dict[str, str]:
        """Krum scores need more than 2f + 2 updates: a round that may close with fewer
        would fail at aggregation, so the settings are refused now."""
        if strategy not in ("krum", "multikrum"):
            return {}
        needed = 2 * params["f"] + 3
        if merged["min_clients"] < needed:
            return {
                "min_clients": f"{strategy} with f={params['f']} needs at least {needed} "
                f"updates per round (2f + 3): raise min_clients to {needed} (and clients per "
                "round with it), or lower f."
            }
        return {}

    @staticmethod
    def site_partition_errors(merged: dict, num_sites: int) -> dict[str, str]:
        """The site partition gives each acquisition site in the server's data to one of
        the experiment's sites: they must be as many, or every client fails at run time."""
        dataset = merged["dataset"]
        try:
            kind = parse_partition_spec(merged.get("partition") or "iid").kind
        except ValueError:
            return {}  # validate_partition said why
        if kind != "site" or dataset.is_federated or not dataset.path:
            return {}
        from training import federation

        try:
            data_sites = federation.open_dataset_at(dataset, dataset.path).sites
        except (ValueError, OSError) as exc:
            return {"partition": f"The site partition reads the dataset's sites: {exc}"}
        if data_sites is None:
            return {
                "partition": f"Dataset {dataset.name!r} has no site column, so it cannot be "
                "split by site: choose iid, dirichlet:<alpha> or quantity:<alpha>."
            }
        names = sorted(set(data_sites))
        if len(names) != num_sites:
            shown = ", ".join(names[:10]) + (", ..." if len(names) > 10 else "")
            return {
                "partition": f"The site partition gives each of the dataset's sites to one "
                f"client: {dataset.name!r} has {len(names)} sites ({shown}), but "
                f"{num_sites} sites were chosen. Choose exactly {len(names)} sites (on the "
                f"command line, --clients {len(names)}), or another partition such as iid."
            }
        return {}

    @staticmethod
    def sampling_errors(merged: dict, attrs: dict, num_sites: int) -> dict[str, str]:
        """min_clients against the clients a round will have; with a fraction, the stored
        clients_per_round becomes that number (so the row's own constraint holds)."""
        fraction = merged.get("client_fraction")
        if fraction is None:
            per_round, what = merged["clients_per_round"], "clients_per_round"
        else:
            per_round = clients_in_round(
                num_sites, clients_per_round=0, client_fraction=fraction, min_clients=0
            )
            attrs["clients_per_round"] = max(per_round, 1)
            what = f"the clients a round will have (ceil({fraction} x {num_sites} sites))"
        if merged["min_clients"] > per_round:
            return {"min_clients": f"Must not exceed {what} ({per_round})."}
        return {}

    @staticmethod
    def privacy_errors(merged: dict) -> dict[str, str]:
        """Client-level DP needs a clipping norm (the noise is a multiple of it) and a
        usable delta; local DP-SGD needs both its noise and its clipping norm."""
        errors = {}
        clip, noise = merged.get("dp_clip"), merged.get("dp_noise") or 0.0
        if clip is not None and clip <= 0:
            errors["dp_clip"] = "Give a positive L2 norm, or leave it empty for no clipping."
        elif clip is None and noise > 0:
            errors["dp_clip"] = (
                "Noise is dp_noise x dp_clip: give a clipping norm (dp_clip) with dp_noise."
            )
        elif clip is None and merged.get("dp_at") == NoiseLocation.CLIENT:
            errors["dp_at"] = "Noise at the clients needs a clipping norm (dp_clip)."
        delta = merged.get("dp_delta")
        if noise > 0 and (delta is None or not 0 < delta < 1):
            errors["dp_delta"] = "Give a delta in (0, 1) for the privacy accounting, e.g. 1e-5."
        local_noise, local_clip = merged.get("local_dp_noise"), merged.get("local_dp_clip")
        if (local_noise is None) != (local_clip is None):
            missing = "local_dp_clip" if local_clip is None else "local_dp_noise"
            errors[missing] = (
                "Local DP-SGD needs both local_dp_noise (noise multiplier) and local_dp_clip "
                "(per-sample gradient norm); give both or neither."
            )
        elif local_clip is not None and local_clip <= 0:
            errors["local_dp_clip"] = "Give a positive per-sample gradient norm."
        return errors

    def _current_values(self) -> dict:
        defaults = {"strategy": "fedavg", "min_clients": 1, "clients_per_round": 2,
                    "dp_noise": 0.0, "dp_delta": 1e-5, "dp_at": NoiseLocation.SERVER}  # fmt: skip
        if self.instance is None:
            return defaults
        fields = ("strategy", "strategy_params", "min_clients", "clients_per_round", "network",
                  "network_params", "dataset", "client_fraction", "dp_clip", "dp_noise",
                  "dp_delta", "dp_at", "local_dp_noise", "local_dp_clip",
                  "patch_size")  # fmt: skip
        current = {field: getattr(self.instance, field) for field in fields}
        current["sites"] = list(self.instance.sites.all())
        return current


class ExperimentSummarySerializer(serializers.ModelSerializer):
    """What a live page needs to know of an experiment's state (events carry it)."""

    class Meta:
        model = Experiment
        fields = ["id", "name", "status", "current_round", "num_rounds", "failure_reason",
                  "started_at", "finished_at"]  # fmt: skip


class CheckpointSummarySerializer(serializers.ModelSerializer):
    """A checkpoint without request-dependent links (sent over the WebSocket)."""

    round_number = serializers.IntegerField(
        source="round.number", read_only=True, default=None, allow_null=True
    )

    class Meta:
        model = Checkpoint
        fields = ["id", "round", "round_number", "sha256", "size_bytes", "num_parameters",
                  "is_best", "created_at"]  # fmt: skip


# The columns CheckpointSummarySerializer reads, for .only() on querysets of many rows: a
# whole row decodes its metrics and its round's JSON columns, unsent.
CHECKPOINT_SUMMARY_COLUMNS = (
    "id", "round__number", "sha256", "size_bytes", "num_parameters", "is_best", "created_at",
)  # fmt: skip


class CheckpointSerializer(CheckpointSummarySerializer):
    """The REST API's checkpoint: the summary plus its experiment, metrics and download link."""

    download_url = serializers.HyperlinkedIdentityField(view_name="checkpoint-download")

    class Meta(CheckpointSummarySerializer.Meta):
        fields = [*CheckpointSummarySerializer.Meta.fields, "experiment", "metrics",
                  "download_url"]  # fmt: skip


class RoundSerializer(serializers.ModelSerializer):
    checkpoint = serializers.PrimaryKeyRelatedField(read_only=True, allow_null=True)

    class Meta:
        model = Round
        fields = [
            "id",
            "experiment",
            "number",
            "kind",
            "status",
            "opened_at",
            "closed_at",
            "deadline",
            "metrics",
            "epsilon",
            "federated_evaluation",
            "checkpoint",
        ]


class ClientUpdateSerializer(serializers.ModelSerializer):
    experiment = serializers.IntegerField(source="round.experiment_id", read_only=True)
    round_number = serializers.IntegerField(source="round.number", read_only=True)
    site = serializers.SlugRelatedField(slug_field="slug", read_only=True)

    class Meta:
        model = ClientUpdate
        fields = [
            "id",
            "experiment",
            "round",
            "round_number",
            "site",
            "status",
            "task_id",
            "worker",
            "num_samples",
            "metrics",
            "started_at",
            "finished_at",
            "error",
            "update_sha256",
        ]


# The columns ClientUpdateSerializer reads, for .only() on querysets of many rows. Whole rows
# decoded, for each of them, its evaluation and its round's metrics and federated
# evaluation (an entry per site): 0.75 s of JSON for the 500 rows of a 50-site snapshot.
CLIENT_UPDATE_COLUMNS = (
    "id", "status", "task_id", "worker", "num_samples", "metrics", "started_at",
    "finished_at", "error", "update_sha256", "round__number", "round__experiment",
    "site__slug",
)  # fmt: skip
