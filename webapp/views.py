"""Error pages: JSON under /api/, HTML elsewhere."""

from django.http import JsonResponse
from django.views import defaults

from diagnosis.api.errors import json_not_found, json_server_error


def not_found(request, exception=None):
    if request.path.startswith("/api/"):
        return json_not_found(request, exception)
    return defaults.page_not_found(request, exception)


def bad_request(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Bad request (too many fields or too large a body).", "code": "bad_request"},
                            status=400)  # fmt: skip
    if "application/json" in request.headers.get("Accept", ""):  # the portal's upload script
        message = "The upload could not be read: a file name may be too long, or too many files were sent at once."
        return JsonResponse({"error": message, "files": []}, status=400)
    return defaults.bad_request(request, exception)


def permission_denied(request, exception=None):
    if request.path.startswith("/api/"):
        return JsonResponse({"detail": "Permission denied.", "code": "permission_denied"}, status=403)
    return defaults.permission_denied(request, exception)


def server_error(request):
    if request.path.startswith("/api/"):
        return json_server_error(request)
    return defaults.server_error(request)
