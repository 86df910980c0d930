"""POST /api/datasets/upload/: a dataset sent as one archive of images plus labels.csv.

The archive is streamed to a temporary file (never whole in memory), unpacked into a
folder of the uploader's own under FEDLENS_UPLOADS_DIR by training.uploads (which refuses
traversal, links, bombs and files that are not images), then registered as a folder
dataset owned by the uploader, with its facts read from the data like register_dataset.
"""

import shutil
import tempfile
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from django.conf import settings
from django.core.files.uploadhandler import TemporaryFileUploadHandler
from django.utils.text import slugify
from drf_spectacular.utils import OpenApiResponse, extend_schema
from rest_framework import serializers, status
from rest_framework.exceptions import APIException, ValidationError
from rest_framework.parsers import MultiPartParser
from rest_framework.permissions import IsAuthenticated
from rest_framework.response import Response
from rest_framework.views import APIView

from training.api.errors import save_dataset_unless_name_taken
from training.api.permissions import RolePermission
from training.api.serializers import (
    NORMALIZATION_HELP,
    VALIDATION_FRACTION_HELP,
    DatasetSerializer,
)
from training.fl.data import DatasetFormatError, ImageReadError
from training.management.commands.register_dataset import describe
from training.models import Modality, StorageFormat
from training.uploads import ArchiveRefused, ArchiveTooLarge, UnpackLimits, unpack_dataset_archive

MEGABYTE = 1024 * 1024
# The form's other fields and multipart boundaries, beyond the archive itself.
FORM_OVERHEAD_BYTES = 64 * 1024


class UploadTooLarge(APIException):
    status_code = status.HTTP_413_REQUEST_ENTITY_TOO_LARGE
    default_code = "upload_too_large"

    def __init__(self):
        super().__init__(
            f"The archive is larger than {settings.FEDLENS_MAX_UPLOAD_MB} MB "
            "(FEDLENS_MAX_UPLOAD_MB); split the dataset or ask an admin to raise the limit."
        )


class SizeCappedUploadHandler(TemporaryFileUploadHandler):
    """Writes the upload to a temporary file and stops reading past the limit, whatever
    Content-Length said (a chunked body has none)."""

    def __init__(self, request, *, limit_bytes: int):
        super().__init__(request)
        self.limit_bytes = limit_bytes

    def receive_data_chunk(self, raw_data, start):
        if start + len(raw_data) > self.limit_bytes:
            raise UploadTooLarge()
        return super().receive_data_chunk(raw_data, start)


class DatasetUploadSerializer(serializers.Serializer):
    archive = serializers.FileField(
        help_text="A .zip, .tar, .tar.gz, .tgz, .tar.bz2 or .tar.xz of images (PNG, NIfTI, "
        "NRRD, MetaImage .mha, DICOM) and a labels.csv with the columns path,label[,site], "
        "at its top or in its one top-level folder."
    )
    name = serializers.CharField(max_length=100)
    description = serializers.CharField(required=False, allow_blank=True, default="")
    modality = serializers.ChoiceField(choices=Modality.choices, default=Modality.OTHER)
    class_names = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Comma-separated, in label order; left out: class 0, class 1, ...",
    )
    normalization = serializers.CharField(
        required=False,
        allow_blank=True,
        default="",
        max_length=100,
        help_text=NORMALIZATION_HELP,
    )
    validation_fraction = serializers.FloatField(required=False, help_text=VALIDATION_FRACTION_HELP)

    # The dataset's own checks, before the work of unpacking (channels are checked after).
    def validate_normalization(self, value):
        return DatasetSerializer().validate_normalization(value)

    def validate_validation_fraction(self, value):
        return DatasetSerializer().validate_validation_fraction(value)


class UploadErrorSerializer(serializers.Serializer):
    """A refused archive has `detail` and `member`; refused form fields are named instead,
    each with its messages (as every 400 of the API)."""

    detail = serializers.CharField(required=False)
    member = serializers.CharField(
        required=False,
        allow_null=True,
        help_text="The archive member to fix, when one is at fault.",
    )


def refusal(message: str, *, member: str | None = None, code: int = 400) -> Response:
    return Response({"detail": message, "member": member}, status=code)


def hide_folder(message: str, folder: Path) -> str:
    """Messages from the data readers name server paths; the uploader knows only the archive's."""
    return message.replace(f"{folder}/", "").replace(str(folder), "the archive")


@contextmanager
def archive_on_disk(uploaded) -> Iterator[Path]:
    """The uploaded archive's file: the upload handler's, or a copy of a small one that
    Django's default handlers kept in memory (when the form was read before this view)."""
    if hasattr(uploaded, "temporary_file_path"):
        yield Path(uploaded.temporary_file_path())
        return
    with tempfile.NamedTemporaryFile(suffix=".upload") as copy:
        for chunk in uploaded.chunks():
            copy.write(chunk)
        copy.flush()
        yield Path(copy.name)


class DatasetUploadView(APIView):
    permission_classes = [IsAuthenticated, RolePermission]
    # Registering a dataset: the roles that may create datasets (accounts/rules.py).
    role_action, role_model = "create", "dataset"
    throttle_scope = "upload"
    parser_classes = [MultiPartParser]

    def initial(self, request, *args, **kwargs):
        # Before authentication: the session's CSRF check already reads the form.
        limit_bytes = settings.FEDLENS_MAX_UPLOAD_MB * MEGABYTE
        try:
            declared = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            declared = 0
        if declared > limit_bytes + FORM_OVERHEAD_BYTES:
            raise UploadTooLarge()
        if not hasattr(request._request, "_files"):  # no middleware has read the form yet
            request._request.upload_handlers = [
                SizeCappedUploadHandler(request._request, limit_bytes=limit_bytes)
            ]
        super().initial(request, *args, **kwargs)

    @extend_schema(
        operation_id="dataset_upload",
        request={"multipart/form-data": DatasetUploadSerializer},
        responses={
            201: DatasetSerializer,
            400: OpenApiResponse(
                UploadErrorSerializer,
                description="A field, the archive or one of its members to fix.",
            ),
            413: OpenApiResponse(
                UploadErrorSerializer,
                description="The archive, or what it unpacks to, is larger than allowed.",
            ),
        },
        tags=["datasets"],
    )
    def post(self, request):
        """Upload a dataset: an archive of images and labels.csv, registered as your own."""
        form = DatasetUploadSerializer(data=request.data)
        form.is_valid(raise_exception=True)
        fields = form.validated_data
        self.check_name_is_free(fields["name"])

        user_folder = settings.FEDLENS_UPLOADS_DIR / f"user-{request.user.pk}"
        destination = user_folder / f"{slugify(fields['name']) or 'dataset'}-{uuid.uuid4().hex[:8]}"
        limits = UnpackLimits(
            max_unpacked_bytes=settings.FEDLENS_UPLOAD_MAX_UNPACKED_MB * MEGABYTE,
            max_ratio=settings.FEDLENS_UPLOAD_MAX_RATIO,
            max_files=settings.FEDLENS_UPLOAD_MAX_FILES,
        )
        try:
            with archive_on_disk(fields["archive"]) as archive_path:
                folder = unpack_dataset_archive(archive_path, destination, limits)
        except ArchiveTooLarge as refused:
            return refusal(str(refused), member=refused.member, code=413)
        except ArchiveRefused as refused:
            return refusal(str(refused), member=refused.member)

        names = [name.strip() for name in fields["class_names"].split(",") if name.strip()]
        try:
            facts = describe(folder, StorageFormat.FOLDER, names)
        except (DatasetFormatError, ImageReadError, ValueError, OSError) as error:
            shutil.rmtree(destination, ignore_errors=True)
            return refusal(hide_folder(str(error), folder))
        dataset = DatasetSerializer(
            data={
                "name": fields["name"],
                "description": fields["description"],
                "modality": fields["modality"],
                "normalization": fields["normalization"],
                "path": str(folder),
                **facts,
                **(
                    {"validation_fraction": fields["validation_fraction"]}
                    if "validation_fraction" in fields
                    else {}
                ),
            },
            context={"request": request},
        )
        if not dataset.is_valid():
            shutil.rmtree(destination, ignore_errors=True)
            raise ValidationError(dataset.errors)
        try:
            save_dataset_unless_name_taken(dataset, owner=request.user)
        except ValidationError:
            shutil.rmtree(destination, ignore_errors=True)
            raise
        return Response(dataset.data, status=status.HTTP_201_CREATED)

    @staticmethod
    def check_name_is_free(name: str) -> None:
        """Before the work of unpacking: a taken name would fail registration at the end."""
        try:
            DatasetSerializer().fields["name"].run_validation(name)
        except ValidationError as error:
            raise ValidationError({"name": error.detail}) from None
