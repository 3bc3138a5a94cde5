"""API rate limits, read from the settings at each request (so they can be changed per deployment
and per test): 429 with a Retry-After header when exceeded."""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import UserRateThrottle

from ..services import rates


class ApiRateThrottle(UserRateThrottle):
    """Every API call, per user (or per address when anonymous)."""

    scope = "api"

    def get_rate(self):
        return settings.API_RATE_LIMIT or None


class UploadRateThrottle(UserRateThrottle):
    """Uploads, per user: each photo costs a model run, so a batch of n photos counts n times. The count is
    the one portal uploads take from too (services.rates, scope "uploads")."""

    scope = "uploads"

    def get_rate(self):
        return settings.API_UPLOAD_RATE_LIMIT or None

    def allow_request(self, request, view):
        if self.rate is None or not request.user.is_authenticated:
            return True
        cost = max(1, len(request.FILES.getlist("images"))) if hasattr(request, "FILES") else 1
        try:
            rates.take("uploads", request.user.pk, settings.API_UPLOAD_RATE_LIMIT, cost=cost)
        except rates.RateExceeded as exc:
            self._wait = exc.retry_after
            return False
        return True

    def wait(self):
        return getattr(self, "_wait", None)
