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
    """Uploads, per user: each photo costs a model run, so a batch of n photos counts n times."""

    scope = "uploads"

    def get_rate(self):
        return settings.API_UPLOAD_RATE_LIMIT or None

    def allow_request(self, request, view):
        if self.rate is None:
            return True
        self.key = self.get_cache_key(request, view)
        if self.key is None:
            return True
        self.history = self.cache.get(self.key, [])
        self.now = self.timer()
        while self.history and self.history[-1] <= self.now - self.duration:
            self.history.pop()
        cost = max(1, len(request.FILES.getlist("images"))) if hasattr(request, "FILES") else 1
        if len(self.history) + cost > self.num_requests:
            return self.throttle_failure()
        self.history[:0] = [self.now] * cost
        self.cache.set(self.key, self.history, self.duration)
        return True
