"""Liveness and readiness for load balancers and orchestrators (no authentication, no patient data)."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import connection
from django.http import JsonResponse

from diagnosis.services.registry import active_model_version
from webapp.celery import app

logger = logging.getLogger(__name__)


def healthz(request):
    """The process is up and serving requests."""
    return JsonResponse({"status": "ok"})


def _database() -> str | None:
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    return None


def _broker() -> str | None:
    with app.connection_for_write(url=settings.CELERY_BROKER_URL) as conn:
        conn.ensure_connection(max_retries=1, timeout=2)
        # Redis connects lazily: ask the server itself (the filesystem broker has no client to ask).
        client = getattr(conn.default_channel, "client", None)
        if client is not None and hasattr(client, "ping"):
            client.ping()
    return None


def _storage() -> str | None:
    bucket_name = getattr(default_storage, "bucket_name", None)
    if bucket_name:  # S3: a missing bucket must fail, not read as a missing file
        default_storage.connection.meta.client.head_bucket(Bucket=bucket_name)
    else:
        default_storage.exists("readyz-probe")
    return None


def _model() -> str | None:
    return None if active_model_version() is not None else "no model version is active"


CHECKS = {"database": _database, "broker": _broker, "storage": _storage, "model": _model}


def readyz(request):
    """Database, broker and storage reachable, and an active model: 200, else 503 with the reasons."""
    results, healthy = {}, True
    for name, check in CHECKS.items():
        started = time.perf_counter()
        try:
            problem = check()
        except Exception as exc:  # the details (hosts, users) go to the log, not to anonymous callers
            logger.warning("readiness check %s failed: %s", name, exc)
            problem = f"{name} unreachable ({type(exc).__name__})"
        results[name] = {"ok": problem is None, "ms": round((time.perf_counter() - started) * 1000, 1)}
        if problem is not None:
            results[name]["error"] = problem
            healthy = False
    response = JsonResponse({"status": "ready" if healthy else "not ready", "checks": results},
                            status=200 if healthy else 503)  # fmt: skip
    response["Cache-Control"] = "no-store"
    return response
