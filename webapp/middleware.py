"""Security headers the settings cannot express."""

from __future__ import annotations

from django.conf import settings
from django.http import HttpResponse, JsonResponse

# The portal loads only its own script, styles and images (photos, heatmaps); the inline styles
# are a few opacity attributes. The admin (Evidently's report, inline SVG) and the API's docs page
# (Swagger UI) have their own needs and are left to their defaults.
PORTAL_CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; img-src 'self' data: blob:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'self'; form-action 'self'; "
    "frame-ancestors 'none'"
)
UNCOVERED = ("/admin/", "/api/")


class SecurityHeadersMiddleware:
    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        response = self.get_response(request)
        content_type = response.get("Content-Type", "")
        if content_type.startswith("text/html") and not request.path.startswith(UNCOVERED):
            response.setdefault("Content-Security-Policy", PORTAL_CSP)
        if request.path.startswith("/api/v1/"):
            response.setdefault("Cache-Control", "private, no-store")  # patient data: never cached
        if response.status_code == 429 and not response.has_header("Retry-After"):
            # django-axes' lockout page: say when to try again.
            response["Retry-After"] = str(int(settings.AXES_COOLOFF_TIME.total_seconds()))
        return response


SINGLE_UPLOAD_PATHS = ("/api/v1/images/",)  # one photo per request: MAX_UPLOAD_BYTES and its form's overhead
MULTIPART_OVERHEAD = 256 * 1024


def body_limit(path: str) -> int:
    if path in SINGLE_UPLOAD_PATHS:
        return min(settings.MAX_REQUEST_BYTES, settings.MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD)
    return settings.MAX_REQUEST_BYTES


class RequestSizeLimitMiddleware:
    """Refuse a body over its limit before reading any of it: 413 with a JSON error when its
    Content-Length is over (a 315 MB upload used to be streamed to a temporary file in full before the
    upload's own size check refused it). A chunked body (no Content-Length) gets 411: Django reads no
    body without a length, and gunicorn would otherwise read the whole of it to find the next request.
    Under gunicorn both answers close the connection (its pre_request hook), so the unread body is never
    read. The reverse proxy should refuse
    them even earlier (docs/deployment.md: client_max_body_size)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        if "chunked" in request.META.get("HTTP_TRANSFER_ENCODING", "").lower():
            message = "Send the request with a Content-Length header: chunked request bodies are not accepted."
            return refused(request, 411, "length_required", message)
        limit = body_limit(request.path)
        try:
            length = int(request.META.get("CONTENT_LENGTH") or 0)
        except ValueError:
            length = 0
        if length > limit:
            return refused(request, 413, "request_too_large",
                           f"The request is larger than the {limit / 1e6:.0f} MB this address accepts. Each photo "
                           f"may be at most {settings.MAX_UPLOAD_BYTES / 1e6:.0f} MB.")  # fmt: skip
        return self.get_response(request)


def refused(request, status: int, code: str, message: str):
    if request.path.startswith("/api/") or "json" in request.headers.get("Accept", ""):
        response = JsonResponse({"detail": message, "code": code}, status=status)
    else:
        response = HttpResponse(message, status=status, content_type="text/plain; charset=utf-8")
    # No Connection header: WSGI forbids hop-by-hop headers (runserver refuses them with a 500). Under
    # gunicorn the pre_request hook of webapp/gunicorn.conf.py closes the connection instead.
    return response
