"""Per-user rate limits that the API and the portal share (DRF's throttles cover only the API):
explanation requests and portal uploads. A sliding window in the cache, the same arithmetic as DRF's
SimpleRateThrottle, keyed by what is limited and the user's id."""

from __future__ import annotations

import math
import time

from django.core.cache import cache

PERIODS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class RateExceeded(Exception):
    def __init__(self, retry_after: int) -> None:
        super().__init__(f"rate exceeded; retry after {retry_after} s")
        self.retry_after = retry_after


def parse_rate(rate: str) -> tuple[int, int] | None:
    """'30/hour' -> (30, 3600); '' or None -> None (no limit). DRF's format: the period's first letter counts."""
    if not rate:
        return None
    count, period = rate.split("/")
    return int(count), PERIODS[period.strip()[0].lower()]


def take(scope: str, user_id, rate: str, cost: int = 1) -> None:
    """Count `cost` uses of `scope` by this user; RateExceeded (with the seconds to wait) when that would
    pass `rate`. Not atomic across processes, like DRF's throttles: a burst may pass by a few."""
    parsed = parse_rate(rate)
    if parsed is None:
        return
    allowed, duration = parsed
    key = f"rate:{scope}:{user_id}"
    now = time.time()
    history = [moment for moment in cache.get(key, []) if moment > now - duration]
    if len(history) + cost > allowed:
        oldest = history[-1] if history else now
        raise RateExceeded(max(1, math.ceil(oldest + duration - now)))
    cache.set(key, [now] * cost + history, duration)


def reset(scope: str, user_id) -> None:
    cache.delete(f"rate:{scope}:{user_id}")
