"""An upload's status as server-sent events (text/event-stream), for clients that would rather be told
than poll.

`event: status` carries the status at once and then each time it changes; `event: end` (id `end`)
follows a final state, `event: timeout` closes a stream that saw none within STATUS_STREAM_SECONDS, and
`event: error` one whose image went away (or the database did). The status is read when the worker's
notification of a change arrives (services.notify), never on a timer, and once more at the deadline; a
comment line (`: ping`) keeps a quiet stream alive. Each stream holds a web thread while it lasts, so a
process serves at most STATUS_STREAM_MAX at once, and at most STATUS_STREAM_MAX_PER_USER of them to one
user: one client cannot take every stream of the process.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterator

from django.conf import settings
from django.core.serializers.json import DjangoJSONEncoder
from django.db import DatabaseError

from . import notify
from .status import FINAL_STATES, NO_SUCH_IMAGE

# Status streams this process serves at once: each holds a gunicorn thread while it lasts.
_STREAMS = threading.BoundedSemaphore(max(1, settings.STATUS_STREAM_MAX))
_per_user: dict[object, int] = {}  # streams this process serves to each user now
_per_user_lock = threading.RLock()  # reentrant: release() may run from __del__ on a thread holding it
STREAM_PING_SECONDS = 5.0  # a comment line when nothing else was sent for this long
END_EVENT_ID = "end"  # a browser's EventSource reconnecting with this Last-Event-ID is told to stop
GONE = {"detail": NO_SUCH_IMAGE, "code": "not_found"}
DATABASE_DOWN = {
    "detail": "The database is temporarily unavailable; reconnect or poll GET .../status/.",
    "code": "service_unavailable",
}


class StreamsBusy(Exception):
    """Every stream slot of this process is taken, or this user's share of them (or streams are off): try
    again in a few seconds."""


class _Closing:
    """An iterator over `items` whose close() also calls `on_close`."""

    def __init__(self, items, on_close) -> None:
        self.items, self.on_close = items, on_close

    def __iter__(self):
        return self

    def __next__(self):
        return next(self.items)

    def close(self) -> None:
        try:
            self.items.close()
        finally:
            self.on_close()

    def __del__(self) -> None:  # dropped without close(): the slot is still given back
        self.on_close()  # a no-op once given back


def open_status_stream(
    *, image_id, read: Callable[[], dict | None], present: Callable[[dict], dict] = dict, user_id=None
) -> Iterator[str] | None:
    """The events of one image's status, or None when the first `read()` finds no image (a 404, before any
    stream starts). `read` returns the status (services.status.image_status) or None once the image is gone;
    `present` turns a status into the event's JSON. Raises StreamsBusy, having read nothing, when this
    process already serves STATUS_STREAM_MAX streams.

    The slot is given back once, whichever comes first: the stream's end, or the server closing the
    iterator (also when the client left before the first event, where a generator that never started
    would not run its finally)."""
    if settings.STATUS_STREAM_MAX <= 0:
        raise StreamsBusy
    with _per_user_lock:
        if _per_user.get(user_id, 0) >= max(1, settings.STATUS_STREAM_MAX_PER_USER):
            raise StreamsBusy
        if not _STREAMS.acquire(blocking=False):
            raise StreamsBusy
        _per_user[user_id] = _per_user.get(user_id, 0) + 1
    released = threading.Event()

    def release() -> None:
        if released.is_set():  # before the lock: the usual case from __del__, after close()
            return
        with _per_user_lock:
            if released.is_set():
                return
            released.set()
            _STREAMS.release()
            left = _per_user.get(user_id, 1) - 1
            if left > 0:
                _per_user[user_id] = left
            else:
                _per_user.pop(user_id, None)

    watch = notify.watching([image_id], final_only=False)
    try:
        changes = watch.__enter__()  # before the first read: no change can slip between
        first = read()
    except BaseException:
        watch.__exit__(None, None, None)
        release()
        raise
    if first is None:
        watch.__exit__(None, None, None)
        release()
        return None

    def close() -> None:
        if not released.is_set():  # once: close() and __del__ may both come
            watch.__exit__(None, None, None)
        release()

    return _Closing(_events(first, read, present, changes), close)


def _event(name: str, data: dict, *, event_id: str = "") -> str:
    ident = f"id: {event_id}\n" if event_id else ""
    return f"event: {name}\n{ident}data: {json.dumps(data, cls=DjangoJSONEncoder)}\n\n"


def _events(data: dict, read, present, changes: notify.Watch) -> Iterator[str]:
    sent, last_write = None, time.monotonic()
    deadline = time.monotonic() + settings.STATUS_STREAM_SECONDS
    while True:
        if data != sent:
            yield _event("status", present(data))
            sent, last_write = data, time.monotonic()
        if data["state"] in FINAL_STATES:
            yield _event("end", {"state": data["state"]}, event_id=END_EVENT_ID)
            return
        now = time.monotonic()
        if now >= deadline:
            yield _event("timeout", {"state": data["state"]})
            return
        if now - last_write >= STREAM_PING_SECONDS:
            yield ": ping\n\n"  # a client that went away is noticed here, not at the deadline
            last_write = now
        told = changes.wait(min(deadline - now, STREAM_PING_SECONDS - (now - last_write)))
        if not told and time.monotonic() < deadline:
            continue  # time for a ping
        try:
            data = read()  # told of a change, or the deadline: a notification may have been lost
        except DatabaseError:
            yield _event("error", DATABASE_DOWN)
            return
        if data is None:  # deleted meanwhile (retention), or access withdrawn
            yield _event("error", GONE)
            return
