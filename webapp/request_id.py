"""The web side of the log context (diagnosis.log_context): the middleware that binds a request id
for each request and writes its access line. The context's functions are re-exported for webapp's
logging and Celery signals."""

from __future__ import annotations

import logging
import time
import uuid

from diagnosis.log_context import (  # noqa: F401 - re-exported for webapp.structured_logging and celery_signals
    SANE_REQUEST_ID,
    bind,
    current,
    current_request_id,
    sane_request_id,
    set_image_id,
    unbind,
)

HEADER = "X-Request-ID"
# Probes and scrapes: logged at DEBUG so they do not drown the requests of people.
QUIET_VIEWS = {"healthz", "readyz", "metrics"}

access_logger = logging.getLogger("webapp.request")


class RequestIdMiddleware:
    """Takes a sane incoming X-Request-ID or makes a uuid4, binds it for the logs, echoes it in the
    response, and writes one access line per request (the view's route, never the query string or the
    concrete path, which a client could fill with a name)."""

    def __init__(self, get_response):
        self.get_response = get_response

    def __call__(self, request):
        request_id = sane_request_id(request.headers.get(HEADER)) or str(uuid.uuid4())
        request.request_id = request_id
        token = bind(request_id=request_id)
        started = time.perf_counter()
        try:
            response = self.get_response(request)
            response[HEADER] = request_id
            self.log(request, response, (time.perf_counter() - started) * 1000)
            return response
        finally:
            unbind(token)

    @staticmethod
    def log(request, response, duration_ms: float) -> None:
        match = getattr(request, "resolver_match", None)
        view = (match.view_name if match else None) or "<unmatched>"
        route = "/" + match.route.replace("^", "").replace("$", "") if match else "<unmatched>"  # regex routes too
        level = logging.DEBUG if view in QUIET_VIEWS else logging.INFO
        access_logger.log(
            level, "%s %s %s %.0f ms", request.method, route, response.status_code, duration_ms,
            extra={"http_method": request.method, "route": route, "view": view, "status": response.status_code,
                   "duration_ms": round(duration_ms, 1)},
        )  # fmt: skip
