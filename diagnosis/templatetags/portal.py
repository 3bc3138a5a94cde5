from __future__ import annotations

from datetime import timedelta

from django import template

register = template.Library()


@register.filter
def duration_words(value) -> str:
    """A timedelta (or seconds) in words: "15 minutes", "1 hour 30 minutes", "45 seconds"."""
    seconds = int(value.total_seconds() if isinstance(value, timedelta) else float(value or 0))
    hours, rest = divmod(seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    parts = [(hours, "hour"), (minutes, "minute")] if hours or minutes else [(seconds, "second")]
    return " ".join(f"{n} {unit}{'s' if n != 1 else ''}" for n, unit in parts if n) or "0 seconds"
