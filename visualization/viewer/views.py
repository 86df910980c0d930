"""The viewer's API and page. A dataset is visible to its owner and to staff only.

Images are patient data: every answer says `Cache-Control: private`, so that no shared
proxy keeps a copy, and requests can only name an image by its index in the dataset.
"""

import math

from django.contrib.auth.decorators import login_required
from django.http import Http404, HttpResponse
from django.shortcuts import render
from django.urls import reverse
from django.utils.cache import patch_cache_control
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import status
from rest_framework.exceptions import APIException, NotFound
from rest_framework.generics import ListAPIView
from rest_framework.permissions import IsAuthenticated
from rest_framework.renderers import JSONRenderer
from rest_framework.response import Response
from rest_framework.views import APIView

from training import metric_catalog
from training.api.pagination import StandardPagination
from training.models import Checkpoint, Dataset, Experiment, Task
from visualization.viewer import rendering
from visualization.viewer.images import (
    Catalog,
    DataUnavailable,
    ImageRecord,
    catalog_for,
    class_name,
    class_names_of,
    read_raw_image,
    stored_shape,
)
from visualization.viewer.overlay import (
    NotSegmentation,
    check_segmentation,
    class_legend,
    overlay,
)
from visualization.viewer.prediction import CheckpointUnusable, predict
from visualization.viewer.serializers import (
    DatasetStatisticsSerializer,
    ImageDetailSerializer,
    ImageSummarySerializer,
    PredictionSerializer,
    ViewerErrorSerializer,
)
from visualization.viewer.statistics import dataset_statistics

# Rendered images do not change: the user's own browser may keep them while scrolling.
PNG_MAX_AGE_SECONDS = 300
BROWSER_PAGE_SIZE = 24


class BadParameter(APIException):
    status_code = status.HTTP_400_BAD_REQUEST
    default_detail = "A query parameter is not valid."
    default_code = "bad_parameter"


class DataUnreadable(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The dataset's data cannot be read on this server."
    default_code = "data_unreadable"


def _query_number(request, name: str, convert: type, meaning: str):
    raw = request.query_params.get(name, "").strip()
    if not raw:
        return None
    try:
        value = convert(raw)
    except ValueError:
        raise BadParameter(f"{name} must be {meaning}, got {raw!r}.") from None
    if isinstance(value, float) and not math.isfinite(value):
        raise BadParameter(f"{name} must be a finite number, got {raw!r}.")
    return value


DATASET_ID = OpenApiParameter("dataset_id", int, OpenApiParameter.PATH, description="Dataset id.")
INDEX = OpenApiParameter(
    "index", int, OpenApiParameter.PATH, description="The image's number in the dataset."
)
ERRORS = {
    401: OpenApiResponse(ViewerErrorSerializer, description="Not signed in."),
    404: OpenApiResponse(ViewerErrorSerializer, description="No such dataset or image for you."),
    409: OpenApiResponse(
        ViewerErrorSerializer, description="The data cannot be read on this server."
    ),
}
BAD_PARAMETER = {400: OpenApiResponse(ViewerErrorSerializer, description="A parameter to fix.")}


class DatasetViewerMixin:
    """Finds the dataset and image of the URL among those the user may see."""

    permission_classes = [IsAuthenticated]

    def get_dataset(self) -> Dataset:
        try:
            return Dataset.objects.visible_to(self.request.user).get(pk=self.kwargs["dataset_id"])
        except Dataset.DoesNotExist:
            raise NotFound("No dataset with this id that you may see.") from None

    def get_catalog(self, dataset: Dataset) -> Catalog:
        try:
            return catalog_for(dataset)
        except DataUnavailable as error:
            raise DataUnreadable(str(error)) from None

    def get_record(self, dataset: Dataset) -> ImageRecord:
        catalog = self.get_catalog(dataset)
        index = self.kwargs["index"]
        record = catalog.record(index)
        if record is None:
            raise NotFound(
                f"No image {index}: this dataset has {len(catalog)} images, "
                f"numbered 0 to {len(catalog) - 1}."
            )
        return record

    def finalize_response(self, request, response, *args, **kwargs):
        response = super().finalize_response(request, response, *args, **kwargs)
        patch_cache_control(response, private=True)
        return response


def summary_of(dataset: Dataset, record: ImageRecord) -> dict:
    return {
        "index": record.index,
        "site": record.site,
        "label": record.label,
        "class_name": class_name(dataset, record.label),
        "path": record.relative_path,
        "shape": stored_shape(record),
    }


class DatasetImageListView(DatasetViewerMixin, ListAPIView):
    """The dataset's images, page by page, optionally of one site and one class."""

    serializer_class = ImageSummarySerializer
    pagination_class = StandardPagination
    filter_backends: list = []

    @extend_schema(
        operation_id="dataset_images_list",
        parameters=[
            DATASET_ID,
            OpenApiParameter("site", str, description="Only images of this site."),
            OpenApiParameter("label", int, description="Only images of this class label."),
        ],
        responses={200: ImageSummarySerializer(many=True), **BAD_PARAMETER, **ERRORS},
    )
    def get(self, request, *args, **kwargs):
        dataset = self.get_dataset()
        catalog = self.get_catalog(dataset)
        site = request.query_params.get("site") or None
        if site is not None and site not in catalog.sites:
            raise BadParameter(
                f"Unknown site {site!r}; this dataset's sites are: {', '.join(catalog.sites)}."
            )
        label = _query_number(request, "label", int, "a whole number")
        if label is not None and not 0 <= label < dataset.num_classes:
            raise BadParameter(f"label must be from 0 to {dataset.num_classes - 1}, got {label}.")
        page = self.paginate_queryset(catalog.filtered(site=site, label=label))
        rows = [summary_of(dataset, record) for record in page]
        return self.get_paginated_response(self.get_serializer(rows, many=True).data)


class DatasetImageView(DatasetViewerMixin, APIView):
    """One image's geometry, label, site and stored intensity range."""

    @extend_schema(
        operation_id="dataset_image_retrieve",
        parameters=[DATASET_ID, INDEX],
        responses={200: ImageDetailSerializer, **ERRORS},
    )
    def get(self, request, dataset_id: int, index: int):
        dataset = self.get_dataset()
        record = self.get_record(dataset)
        try:
            image = read_raw_image(dataset, record)
        except DataUnavailable as error:
            raise DataUnreadable(str(error)) from None
        details = {**summary_of(dataset, record), **rendering.describe_image(image)}
        return Response(ImageDetailSerializer(details).data)


class DatasetImagePNGView(DatasetViewerMixin, APIView):
    """One slice of one image rendered for display, with a window/level."""

    @extend_schema(
        operation_id="dataset_image_png",
        parameters=[
            DATASET_ID,
            INDEX,
            OpenApiParameter(
                "slice", int, description="Slice of a volume along `plane`; the middle by default."
            ),
            OpenApiParameter(
                "plane", str, enum=rendering.PLANES, description="Volumes only; axial by default."
            ),
            OpenApiParameter(
                "preset",
                str,
                enum=rendering.PRESETS,
                description="Window preset; mr-auto spans the 1st-99th percentile, auto the "
                f"full range. {rendering.DEFAULT_PRESET} when neither a preset nor window and "
                "level are given.",
            ),
            OpenApiParameter("window", float, description="Window width; give level too."),
            OpenApiParameter("level", float, description="Window centre; give window too."),
            OpenApiParameter(
                "size",
                int,
                description=f"Longest side in pixels, {rendering.MIN_OUTPUT_SIDE} to "
                f"{rendering.MAX_OUTPUT_SIDE} (the default).",
            ),
        ],
        responses={
            (200, "image/png"): OpenApiResponse(
                OpenApiTypes.BINARY,
                description="An 8-bit PNG (grey, or RGB for colour images) with the physical "
                "aspect of the pixels; X-Window-Width and X-Window-Level give the window applied.",
            ),
            **{(code, "application/json"): answer for code, answer in BAD_PARAMETER.items()},
            **{(code, "application/json"): answer for code, answer in ERRORS.items()},
        },
    )
    def get(self, request, dataset_id: int, index: int):
        dataset = self.get_dataset()
        record = self.get_record(dataset)
        preset = request.query_params.get("preset") or None
        size = _query_number(request, "size", int, "a whole number")
        options = {
            "plane": request.query_params.get("plane") or "axial",
            "slice_index": _query_number(request, "slice", int, "a whole number"),
            "preset": preset,
            "window": _query_number(request, "window", float, "a number"),
            "level": _query_number(request, "level", float, "a number"),
            "max_side": rendering.MAX_OUTPUT_SIDE if size is None else size,
        }
        try:
            if preset is not None:
                rendering.check_preset(preset)  # before the image is read
            image = read_raw_image(dataset, record)
            png, window = rendering.render_png(image, **options)
        except rendering.RenderError as error:
            raise BadParameter(str(error)) from None
        except DataUnavailable as error:
            raise DataUnreadable(str(error)) from None
        response = HttpResponse(png, content_type="image/png")
        response["X-Window-Width"] = f"{window.width:.6g}"
        response["X-Window-Level"] = f"{window.level:.6g}"
        patch_cache_control(response, max_age=PNG_MAX_AGE_SECONDS)
        return response

    def perform_content_negotiation(self, request, force=False):
        # The image is a plain HttpResponse; errors are JSON even for a client that asked
        # for image/png only, rather than a 406 that hides what to fix.
        return JSONRenderer(), JSONRenderer.media_type


class DatasetImageOverlayView(DatasetViewerMixin, APIView):
    """A segmentation image's masks over one slice: the ground truth and, with a
    checkpoint, its prediction, each a transparent PNG coloured per class, with the legend
    and the prediction's Dice and HD95 on this image."""

    @extend_schema(
        operation_id="dataset_image_overlay",
        parameters=[
            DATASET_ID,
            INDEX,
            OpenApiParameter(
                "checkpoint",
                int,
                description="A checkpoint of an experiment on this dataset that you may see; "
                "without one, the ground truth only.",
            ),
            OpenApiParameter(
                "plane", str, enum=rendering.PLANES, description="Volumes only; axial by default."
            ),
            OpenApiParameter(
                "slice", int, description="Slice of a volume along `plane`; the middle by default."
            ),
            OpenApiParameter(
                "size",
                int,
                description=f"Longest side in pixels, as for the image's PNG "
                f"({rendering.MAX_OUTPUT_SIDE} by default).",
            ),
        ],
        responses={
            200: OpenApiResponse(
                OpenApiTypes.OBJECT,
                description="`ground_truth` and `prediction`: PNG data URLs the size of the "
                "image's PNG of the same slice (null without a mask or checkpoint); `classes`: "
                "value, name and colour of each foreground class; `dice` (mean over the "
                "foreground classes), `dice_per_class`, `hd95` (mm) of the prediction; "
                "`plane`, `slice`, `slices_per_plane`.",
            ),
            **BAD_PARAMETER,
            **ERRORS,
        },
    )
    def get(self, request, dataset_id: int, index: int):
        dataset = self.get_dataset()
        checkpoint_id = _query_number(request, "checkpoint", int, "a checkpoint id")
        size = _query_number(request, "size", int, "a whole number")
        options = {
            "plane": request.query_params.get("plane") or "axial",
            "slice_index": _query_number(request, "slice", int, "a whole number"),
            "max_side": rendering.MAX_OUTPUT_SIDE if size is None else size,
        }
        checkpoint = (
            None if checkpoint_id is None else visible_checkpoint(request, dataset, checkpoint_id)
        )
        try:
            check_segmentation(dataset)  # before its data is read
        except NotSegmentation as error:
            raise BadParameter(str(error)) from None
        record = self.get_record(dataset)
        try:
            answer = overlay(dataset, record, checkpoint=checkpoint, **options)
        except (NotSegmentation, rendering.RenderError) as error:
            raise BadParameter(str(error)) from None
        except (DataUnavailable, CheckpointUnusable) as error:
            raise DataUnreadable(str(error)) from None
        return Response(answer)


def visible_checkpoint(request, dataset: Dataset, checkpoint_id: int) -> Checkpoint:
    """The checkpoint of an experiment on `dataset` that the user may see, or a 404."""
    checkpoint = (
        Checkpoint.objects.select_related("experiment__dataset", "round")
        .filter(
            pk=checkpoint_id,
            experiment__dataset=dataset,
            experiment__in=Experiment.objects.visible_to(request.user),
        )
        .first()
    )
    if checkpoint is None:
        raise NotFound(
            f"No checkpoint {checkpoint_id} of an experiment on this dataset that you may see."
        )
    return checkpoint


class DatasetImagePredictionView(DatasetViewerMixin, APIView):
    """What a checkpoint's network predicts for the image, preprocessed as in training."""

    @extend_schema(
        operation_id="dataset_image_prediction",
        parameters=[
            DATASET_ID,
            INDEX,
            OpenApiParameter(
                "checkpoint",
                int,
                required=True,
                description="A checkpoint of an experiment on this dataset that you may see.",
            ),
        ],
        responses={200: PredictionSerializer, **BAD_PARAMETER, **ERRORS},
    )
    def get(self, request, dataset_id: int, index: int):
        dataset = self.get_dataset()
        checkpoint_id = _query_number(request, "checkpoint", int, "a checkpoint id")
        if checkpoint_id is None:
            raise BadParameter(
                "Give checkpoint=<id>, a checkpoint of an experiment on this dataset."
            )
        checkpoint = visible_checkpoint(request, dataset, checkpoint_id)
        record = self.get_record(dataset)
        try:
            outcome = predict(checkpoint, dataset, record)
        except (DataUnavailable, CheckpointUnusable) as error:
            raise DataUnreadable(str(error)) from None
        probabilities = outcome["probabilities"]
        predicted, true_label = outcome["predicted_label"], outcome["true_label"]
        answer = {
            "index": record.index,
            "checkpoint": checkpoint.pk,
            "experiment": checkpoint.experiment_id,
            "experiment_name": checkpoint.experiment.name,
            "round": checkpoint.round.number if checkpoint.round_id else None,
            "true_label": true_label,
            "true_class_name": class_name(dataset, true_label),
            "predicted_label": predicted,
            "predicted_class_name": class_name(dataset, predicted),
            "probability": probabilities[predicted],
            "correct": predicted == true_label,
            "probabilities": [
                {"label": label, "name": class_name(dataset, label), "probability": p}
                for label, p in enumerate(probabilities)
            ],
        }
        return Response(PredictionSerializer(answer).data)


class DatasetStatisticsView(DatasetViewerMixin, APIView):
    """Per-site class counts, intensity histograms, sizes and spacings, and the sites whose
    data differ from the others (computed once per server process)."""

    @extend_schema(
        operation_id="dataset_statistics",
        parameters=[DATASET_ID],
        responses={200: DatasetStatisticsSerializer, **ERRORS},
    )
    def get(self, request, dataset_id: int):
        dataset = self.get_dataset()
        try:
            statistics = dataset_statistics(dataset)
        except DataUnavailable as error:
            raise DataUnreadable(str(error)) from None
        return Response(DatasetStatisticsSerializer({**statistics, "dataset": dataset.pk}).data)


def checkpoint_choice_label(checkpoint: Checkpoint) -> str:
    stage = f"round {checkpoint.round.number}" if checkpoint.round_id else "initial weights"
    primary = metric_catalog.get_metric(metric_catalog.primary_metric(checkpoint.experiment.task))
    score = (checkpoint.metrics.get("global") or {}).get(primary.name)
    extras = [f"{primary.label} {score:.1%}"] if isinstance(score, int | float) else []
    if checkpoint.is_best:
        extras.append("best")
    suffix = f" ({', '.join(extras)})" if extras else ""
    return f"{checkpoint.experiment.name}: {stage}{suffix}"


@login_required
def dataset_viewer(request, dataset_id: int):
    """The viewer page; its script reads everything else from the API above."""
    try:
        dataset = Dataset.objects.visible_to(request.user).get(pk=dataset_id)
    except Dataset.DoesNotExist:
        raise Http404("No dataset with this id that you may see.") from None
    checkpoints = (
        Checkpoint.objects.filter(
            experiment__dataset=dataset,
            experiment__in=Experiment.objects.visible_to(request.user),
        )
        .select_related("experiment", "round")
        .order_by("experiment__name", "experiment_id", "created_at")
    )
    try:
        catalog = catalog_for(dataset)
        problem = ""
    except DataUnavailable as error:
        catalog, problem = None, str(error)
    images_url = reverse("dataset-images", args=[dataset.pk])
    config = {
        "imagesUrl": images_url,
        "statisticsUrl": reverse("dataset-statistics", args=[dataset.pk]),
        "pageSize": BROWSER_PAGE_SIZE,
        "classNames": class_names_of(dataset),
        "presets": [
            {"name": name, "label": rendering.PRESET_LABELS[name]}
            for name in rendering.presets_for_modality(dataset.modality)
        ],
        "defaultPreset": rendering.presets_for_modality(dataset.modality)[0],
        # Segmentation: masks drawn over the slices (see DatasetImageOverlayView).
        "segmentation": dataset.task == Task.SEGMENTATION,
    }
    context = {
        "dataset": dataset,
        "problem": problem,
        "num_images": len(catalog) if catalog else 0,
        "sites": list(catalog.site_counts().items()) if catalog else [],
        "unavailable_sites": catalog.unavailable_sites if catalog else {},
        "class_names": class_names_of(dataset),
        "checkpoints": [(c.pk, checkpoint_choice_label(c)) for c in checkpoints],
        "presets": config["presets"],
        "viewer_config": config,
        "overlay_classes": class_legend(dataset) if config["segmentation"] else [],
    }
    response = render(request, "visualization/viewer.html", context)
    patch_cache_control(response, private=True)
    return response
