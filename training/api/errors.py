"""Errors of the domain turned into HTTP answers, in one place for every view."""

from django.core.exceptions import RequestDataTooBig, TooManyFieldsSent, TooManyFilesSent
from django.db import IntegrityError, transaction
from django.db.models import ProtectedError
from rest_framework import status
from rest_framework.exceptions import ValidationError
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from training.models import Dataset, InvalidTransition

# Names are unique across all users: the message confirms only the name the caller chose.
DATASET_NAME_TAKEN = "A dataset with this name already exists; choose another name."


def save_dataset_unless_name_taken(serializer, **fields):
    """Save a dataset serializer; a name taken meanwhile is the caller's 400, not a 500.

    Two requests for one name can both pass the serializer's uniqueness check before either
    inserts; the database's unique index then refuses the second.
    """
    try:
        with transaction.atomic():
            return serializer.save(**fields)
    except IntegrityError:
        name = serializer.validated_data.get("name")
        if name is None or not Dataset.objects.filter(name=name).exists():
            raise
        raise ValidationError({"name": [DATASET_NAME_TAKEN]}) from None


def request_too_large_answer(exc: Exception) -> tuple[str, int] | None:
    """What to tell a client whose request Django refused for its size, or None.

    Django raises these while reading the body (SuspiciousOperation), which DRF does not
    handle and Django would answer with an HTML page.
    """
    if isinstance(exc, RequestDataTooBig):
        return (
            "The request body is larger than this server accepts "
            "(FEDLENS_MAX_REQUEST_MB); send less, or upload datasets through "
            "/api/datasets/upload/.",
            status.HTTP_413_REQUEST_ENTITY_TOO_LARGE,
        )
    if isinstance(exc, TooManyFieldsSent):
        return (
            "The request has more form fields than this server accepts "
            "(FEDLENS_MAX_FORM_FIELDS); send fewer.",
            status.HTTP_400_BAD_REQUEST,
        )
    if isinstance(exc, TooManyFilesSent):
        return (
            "The request has more files than this server accepts; send one archive instead.",
            status.HTTP_400_BAD_REQUEST,
        )
    return None


def exception_handler(exc, context):
    if isinstance(exc, InvalidTransition):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, ProtectedError):
        users = sorted({f"{obj._meta.verbose_name} {obj.pk}" for obj in exc.protected_objects})
        return Response(
            {"detail": f"Still in use by {', '.join(users[:5])}; delete or change those first."},
            status=status.HTTP_409_CONFLICT,
        )
    too_large = request_too_large_answer(exc)
    if too_large is not None:
        detail, code = too_large
        return Response({"detail": detail}, status=code)
    response = drf_exception_handler(exc, context)
    if response is not None and isinstance(response.data, list):
        # A ValidationError raised without a field (a filter's, a parser's) is a bare list;
        # every error of the API is an object, with `detail` when no field is at fault.
        response.data = {"detail": " ".join(str(message) for message in response.data)}
    return response
