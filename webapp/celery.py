from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init

from webapp import celery_signals  # noqa: F401 - request ids across the broker, JSON logs, task metrics

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.dev")

app = Celery("webapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _size_torch_threads(**_: object) -> None:
    # Each prefork child shares the machine's cores with its siblings; torch would otherwise
    # start one thread per core in every child and oversubscribe the CPU.
    from mlcore.inference import configure_torch_threads

    concurrency = int(os.environ.get("CELERY_WORKER_CONCURRENCY", "1") or 1)
    configure_torch_threads(max(1, (os.cpu_count() or 1) // concurrency))


@worker_process_init.connect
def _warm_up_inference(**_: object) -> None:
    # After the fork: CUDA must never be initialised in the parent of prefork children.
    from celery.fixups.django import _maybe_close_fd
    from django.db import connections

    for connection in connections.all():  # inherited from the parent: drop without network I/O
        if connection.connection is not None:
            _maybe_close_fd(connection.connection)
            connection.connection = None
    from diagnosis.services.predictions import warm_up_worker

    try:
        warm_up_worker(app.amqp.queues.consume_from or {})
    finally:
        connections.close_all()  # each task opens its own
