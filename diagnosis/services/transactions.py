"""Small transaction helpers shared by the services."""

from __future__ import annotations

import contextlib

from django.db import transaction


def savepoint_if_inside():
    """A savepoint when a transaction is open (so that a failed statement leaves it usable), nothing
    otherwise: outside a transaction one statement is already atomic, and a BEGIN/COMMIT would only add
    two round trips."""
    return transaction.atomic() if transaction.get_connection().in_atomic_block else contextlib.nullcontext()
