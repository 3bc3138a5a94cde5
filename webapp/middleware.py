"""Security headers the settings cannot express."""

from __future__ import annotations

from django.conf import settings

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
