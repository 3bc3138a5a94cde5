"""Which request, image and task a log line belongs to, so one upload can be followed from the web
request through its tasks (docs/observability.md).

It sits below the services and the web project alike (it imports nothing of ours): the services tag
their log lines with it, and webapp's middleware and Celery signals bind it.

One context variable holds a small mutable dict: the web request binds it in RequestIdMiddleware, a
worker binds it for each task (webapp.celery_signals, which also carries the request id across the
broker in the task's headers). Code deeper down only adds to the bound dict (set_image_id), so what it
adds is seen by the middleware's access log line too, and outside a request or a task it is a no-op.
"""

from __future__ import annotations

import contextvars
import re

_context: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("log_context", default=None)

# Accepted from a client or a proxy only when it is a UUID or 16 to 64 hex digits (nginx's $request_id);
# anything else (text that could carry a name, a date of birth or a reference) is replaced by a fresh uuid4.
SANE_REQUEST_ID = re.compile(r"^(?:[0-9a-fA-F]{16,64}|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$")


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
