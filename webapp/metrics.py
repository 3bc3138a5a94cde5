"""GET /metrics: the web tier's Prometheus metrics (django-prometheus), summed over every gunicorn
process in multiprocess mode (PROMETHEUS_MULTIPROC_DIR, set up by webapp/gunicorn.conf.py).

With METRICS_TOKEN set, only `Authorization: Bearer <METRICS_TOKEN>` is served; without one (dev,
tests), only a client on this machine that did not come through a proxy."""

from __future__ import annotations

import hmac
import ipaddress

from django.conf import settings
from django.http import HttpResponse
from django.views.decorators.http import require_safe
from django_prometheus.exports import ExportToDjangoView

# A request relayed by a proxy on this machine arrives from loopback too: these mark it as relayed.
PROXY_HEADERS = ("HTTP_X_FORWARDED_FOR", "HTTP_X_REAL_IP", "HTTP_FORWARDED")


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return False


def metrics_allowed(request) -> bool:
    token = settings.METRICS_TOKEN
    if token:
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())
    return _loopback(request.META.get("REMOTE_ADDR", "")) and not any(name in request.META for name in PROXY_HEADERS)


@require_safe
def metrics(request):
    if not metrics_allowed(request):
        response = HttpResponse(
            "Forbidden: send Authorization: Bearer <METRICS_TOKEN> (without METRICS_TOKEN, only local clients).\n",
            status=403, content_type="text/plain; charset=utf-8",
        )  # fmt: skip
    else:
        response = ExportToDjangoView(request)
    response["Cache-Control"] = "no-store"
    return response
