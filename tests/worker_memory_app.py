"""The project's Celery app (webapp.celery, with all its signals) plus one task that keeps memory, as a leak
would. tests/test_worker_memory.py starts a real worker on it: celery -A tests.worker_memory_app worker."""

from __future__ import annotations

import logging
import os

from webapp.celery import app

logger = logging.getLogger(__name__)
_kept: list[bytes] = []


@app.task(name="tests.keep_memory")
def keep_memory(megabytes: int) -> int:
    """Keeps `megabytes` more (written, so resident) for the rest of the process's life."""
    if megabytes > 0:
        _kept.append(b"\x01" * (megabytes << 20))
    logger.warning("keep_memory ran in process %d", os.getpid())
    return os.getpid()


__all__ = ["app", "keep_memory"]
