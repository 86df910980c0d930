"""What a locked-out sign-in gets: JSON under /api/, a page elsewhere; 429 both."""

from axes.helpers import get_cool_off
from django.conf import settings
from django.http import HttpResponse, JsonResponse
from django.shortcuts import render


def lockout_message(request) -> str:
    cool_off = get_cool_off(request)
    minutes = max(1, round(cool_off.total_seconds() / 60)) if cool_off else None
    wait = f"try again in {minutes} minutes" if minutes else "ask an administrator to unlock it"
    return (
        f"Too many failed sign-ins for this username from your address "
        f"({settings.AXES_FAILURE_LIMIT} in a row): sign-in is locked; {wait}, or ask an "
        "administrator to lift the lock (manage.py axes_reset_username USERNAME)."
    )


def lockout_response(request, original_response=None, credentials=None) -> HttpResponse:
    message = lockout_message(request)
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": message}, status=settings.AXES_HTTP_RESPONSE_CODE)
    return render(
        request,
        "accounts/locked_out.html",
        {"message": message},
        status=settings.AXES_HTTP_RESPONSE_CODE,
    )
