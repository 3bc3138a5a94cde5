"""Who may use the drift dashboard, and the "run now" button's cooldown.

Seeing the dashboard (alerts with their recipients' addresses, live performance, the Evidently reports)
needs the view permission on drift reports; queuing a report needs the change permission, and only one
may be queued per DRIFT_RUN_COOLDOWN_SECONDS for the whole deployment: a report reads the whole window
and the reference set, and a button pressed in a loop would keep a worker busy for nothing."""

from __future__ import annotations

import math
import time

from django.conf import settings
from django.core.cache import cache
from django.core.exceptions import PermissionDenied

from . import dispatch

VIEW_PERMISSION = "diagnosis.view_driftreport"
RUN_PERMISSION = "diagnosis.change_driftreport"
_COOLDOWN_KEY = "drift-run-cooldown"


class TooSoon(Exception):
    """A report was queued less than DRIFT_RUN_COOLDOWN_SECONDS ago."""

    def __init__(self, seconds_left: int) -> None:
        super().__init__(f"A drift report was queued moments ago. Try again in {seconds_left} s.")
        self.seconds_left = seconds_left


def require_view(user) -> None:
    if not user.has_perm(VIEW_PERMISSION):
        raise PermissionDenied("The drift dashboard needs the view permission on drift reports.")


def request_report(user) -> None:
    """Queue a drift report for `user` (PermissionDenied without the change permission; TooSoon within
    the cooldown). A broker error propagates, and the cooldown is then lifted again."""
    if not user.has_perm(RUN_PERMISSION):
        raise PermissionDenied("Running a drift report needs the change permission on drift reports.")
    cooldown = settings.DRIFT_RUN_COOLDOWN_SECONDS
    if cooldown > 0 and not cache.add(_COOLDOWN_KEY, time.time() + cooldown, timeout=cooldown):
        until = cache.get(_COOLDOWN_KEY) or time.time()
        raise TooSoon(max(1, math.ceil(until - time.time())))
    try:
        dispatch.send(dispatch.DRIFT_REPORT, kwargs={"triggered_by": user.get_username()})
    except Exception:
        cache.delete(_COOLDOWN_KEY)
        raise
