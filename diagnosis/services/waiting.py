"""Requests that wait for a result: `?wait=N` or `Prefer: wait=N` on an upload or a GET, and the
portal's status. The request reads the state once it listens for notifications (services.notify),
then again each time it is told of a change, and once more at its deadline; never on a timer.

A waiting request holds a web thread. At most RESULT_WAIT_MAX_PER_PROCESS of a process's requests
wait at once, RESULT_WAIT_MAX_PER_USER of them for one user: beyond that a request is answered at once,
as without the option, so waits can never take the threads that uploads need. A client that hangs up
while it waits frees its thread within CLIENT_CHECK_SECONDS, where the server lets us see its socket
(gunicorn does; Django's runserver does not, and such a wait lasts until its deadline).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterable
from typing import TypeVar

from django.conf import settings

from . import notify

T = TypeVar("T")
CLIENT_CHECK_SECONDS = 1.0  # how soon a hung-up client's thread is freed

_lock = threading.Lock()
_waiting = {"process": 0}  # requests waiting in this process now, and per user id


class ClientGone(Exception):
    """The client hung up while its request waited."""


def max_seconds() -> int:
    return max(0, int(settings.RESULT_WAIT_MAX_SECONDS))


def _take_slot(user_id) -> bool:
    with _lock:
        if _waiting["process"] >= settings.RESULT_WAIT_MAX_PER_PROCESS:
            return False
        if _waiting.get(user_id, 0) >= settings.RESULT_WAIT_MAX_PER_USER:
            return False
        _waiting["process"] += 1
        _waiting[user_id] = _waiting.get(user_id, 0) + 1
        return True


def _give_slot(user_id) -> None:
    with _lock:
        _waiting["process"] -= 1
        left = _waiting.get(user_id, 1) - 1
        if left > 0:
            _waiting[user_id] = left
        else:
            _waiting.pop(user_id, None)


def waiting_now() -> int:
    """Requests waiting in this process now."""
    return _waiting["process"]


def wait_for(
    read: Callable[[], T], *, ids: Iterable, seconds: float, ready: Callable[[T], bool], user_id=None,
    final_only: bool = True, gone: Callable[[], bool] | None = None,
) -> tuple[T, bool]:  # fmt: skip
    """Read with `read()` until `ready(value)`, for at most `seconds`, woken by notifications about the
    images `ids` (of their final states only, with `final_only`). Returns the last value read and
    whether the request waited at all (False when `seconds` is 0 or no waiting slot was free: one read,
    at once). Raises ClientGone when `gone()` says the client hung up."""
    if seconds <= 0 or not _take_slot(user_id):
        return read(), False
    try:
        with notify.watching(ids, final_only=final_only) as watch:
            deadline = time.monotonic() + seconds
            value = read()
            while not ready(value):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return read(), True  # once at the deadline: a notification may have been lost
                if watch.wait(min(remaining, CLIENT_CHECK_SECONDS)):
                    value = read()
                elif gone is not None and gone():
                    raise ClientGone
            return value, True
    finally:
        _give_slot(user_id)
