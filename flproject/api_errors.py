"""Django's error views, answering JSON under /api/ and the usual pages elsewhere.

DRF answers the errors raised inside its views. These cover what it never sees: URLs no
route serves, bodies Django refuses in a middleware, and exceptions that escape a view.
A script calling the API then always gets {"detail": ...} rather than an HTML page.
"""

from django.http import JsonResponse
from django.views import defaults

from training.api.errors import request_too_large_answer

API_PREFIX = "/api/"


def is_api_request(request) -> bool:
    return request.path.startswith(API_PREFIX)


def bad_request(request, exception):
    if not is_api_request(request):
        return defaults.bad_request(request, exception)
    too_large = request_too_large_answer(exception)
    if too_large is not None:
        detail, status = too_large
        return JsonResponse({"detail": detail}, status=status)
    return JsonResponse(
        {"detail": "The request is malformed; check its headers and body."}, status=400
    )


def permission_denied(request, exception):
    if not is_api_request(request):
        return defaults.permission_denied(request, exception)
    return JsonResponse({"detail": "You may not do this."}, status=403)


def page_not_found(request, exception):
    if not is_api_request(request):
        return defaults.page_not_found(request, exception)
    return JsonResponse(
        {"detail": f"No endpoint at {request.path}; the API's endpoints are listed at /api/."},
        status=404,
    )


def server_error(request):
    if not is_api_request(request):
        return defaults.server_error(request)
    # The log has the traceback, under this request's id.
    return JsonResponse(
        {"detail": "The server failed to answer this request; it has been logged."},
        status=500,
    )
