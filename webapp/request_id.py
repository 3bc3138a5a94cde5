"""Which request, image and task a log line belongs to, so one upload can be followed from the web
request through its tasks (docs/observability.md).

One context variable holds a small mutable dict: the web request binds it in RequestIdMiddleware, a
worker binds it for each task (webapp.celery_signals, which also carries the request id across the
broker in the task's headers). Code deeper down only adds to the bound dict (set_image_id), so what it
adds is seen by the middleware's access log line too, and outside a request or a task it is a no-op.
"""

from __future__ import annotations

import contextvars
import logging
import re
import time
import uuid

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("log_context", default=None)

HEADER = "X-Request-ID"
# Accepted from a client or a proxy only when it is a UUID or 16 to 64 hex digits (nginx's $request_id);
# anything else (text that could carry a name, a date of birth or a reference) is replaced by a fresh uuid4.
SANE_REQUEST_ID = re.compile(r"^(?:[0-9a-fA-F]{16,64}|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$")
# Probes and scrapes: logged at DEBUG so they do not drown the requests of people.
QUIET_VIEWS = {"healthz", "readyz", "metrics"}

access_logger = logging.getLogger("webapp.request")


def current() -> dict[str, str]:
    """The request id, image id, task id and task name known here (a copy; empty outside any)."""
    return dict(_context.get() or {})


def current_request_id() -> str | None:
    return (_context.get() or {}).get("request_id")


def sane_request_id(value: object) -> str | None:
    return value if isinstance(value, str) and SANE_REQUEST_ID.match(value) else None


def bind(**values: object) -> contextvars.Token:
    """Start a context (a request, a task); give the token back to unbind() at its end."""
    return _context.set({key: str(value) for key, value in values.items() if value})


def unbind(token: contextvars.Token) -> None:
    try:
        _context.reset(token)
    except ValueError:  # bound in another context (should not happen): just forget it
        _context.set(None)


def set_image_id(image_id: object) -> None:
    """Tag the rest of the current request or task with this image (no-op outside both)."""
    context = _context.get()
    if context is not None and image_id:
        context["image_id"] = str(image_id)


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
