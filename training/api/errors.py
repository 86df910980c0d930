"""Errors of the domain turned into HTTP answers, in one place for every view."""

from django.db.models import ProtectedError
from rest_framework import status
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

from training.models import InvalidTransition


def exception_handler(exc, context):
    if isinstance(exc, InvalidTransition):
        return Response({"detail": str(exc)}, status=status.HTTP_409_CONFLICT)
    if isinstance(exc, ProtectedError):
        users = sorted({f"{obj._meta.verbose_name} {obj.pk}" for obj in exc.protected_objects})
        return Response(
            {"detail": f"Still in use by {', '.join(users[:5])}; delete or change those first."},
            status=status.HTTP_409_CONFLICT,
        )
    return drf_exception_handler(exc, context)
