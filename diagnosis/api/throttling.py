"""API rate limits, read from the settings at each request (so they can be changed per deployment
and per test): 429 with a Retry-After header when exceeded."""

from __future__ import annotations

from django.conf import settings
from rest_framework.throttling import UserRateThrottle


class ApiRateThrottle(UserRateThrottle):
    """Every API call, per user (or per address when anonymous)."""

    scope = "api"

    def get_rate(self):
        return settings.API_RATE_LIMIT or None


class UploadRateThrottle(UserRateThrottle):
    """Uploads, per user: each one costs a model run."""

    scope = "uploads"

    def get_rate(self):
        return settings.API_UPLOAD_RATE_LIMIT or None
