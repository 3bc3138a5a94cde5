from __future__ import annotations

import os

from celery import Celery
from celery.signals import task_postrun, task_prerun, worker_init, worker_process_init, worker_ready

from webapp import (
    celery_signals,  # noqa: F401 - request ids across the broker, JSON logs, task metrics
    worker_memory,
)

# Production unless told otherwise: a bare `gunicorn webapp.wsgi` or `celery -A webapp` must never run
# the development settings (DEBUG, a public SECRET_KEY). `make run` and manage.py choose dev themselves.
os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.prod")

app = Celery("webapp")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()


@worker_process_init.connect
def _size_torch_threads(**_: object) -> None:
    # Each prefork child shares the machine's cores with its siblings; torch would otherwise
    # start one thread per core in every child and oversubscribe the CPU.
    from diagnosis.services.runtime import size_torch_threads

    size_torch_threads(int(os.environ.get("CELERY_WORKER_CONCURRENCY", "1") or 1))


@worker_process_init.connect
def _warm_up_inference(**_: object) -> None:
    # In each prefork child, after the fork: CUDA must never be initialised in the parent.
    from celery.fixups.django import _maybe_close_fd
    from django.db import connections

    for connection in connections.all():  # inherited from the parent: drop without network I/O
        if connection.connection is not None:
            _maybe_close_fd(connection.connection)
            try:
                connection.close()
            except Exception:
                connection.connection = None
    seconds = _warm_up()
    # Its memory baseline is what it holds now, warmed up; from here on a task that leaves it more than
    # WORKER_MAX_MEMORY_GROWTH_MB above that ends with the process replaced (webapp/worker_memory.py).
    worker_memory.install(warmed_up=seconds is not None)


@worker_ready.connect
def _warm_up_single_process_pool(sender=None, **_: object) -> None:
    # The threads and solo pools run tasks in this very process, and send no worker_process_init.
    pool = getattr(getattr(sender, "controller", None), "pool", None)
    if pool is not None and "prefork" not in type(pool).__module__:
        _warm_up()


def _warm_up() -> float | None:
    from django.db import connections

    from diagnosis.services.predictions import warm_up_worker

    try:
        return warm_up_worker(app.amqp.queues.consume_from or {})
    finally:
        connections.close_all()  # the first task opens a fresh one, which the next tasks reuse


@worker_init.connect
def _worker_commits_without_waiting_for_the_disk(**_: object) -> None:
    # A worker's writes are results it can compute again: on PostgreSQL its transactions do not wait for
    # the WAL flush (WORKER_SYNCHRONOUS_COMMIT=false, the default). After a database crash the last
    # fraction of a second of results may be gone, together with the image states they set; the
    # sweeper then sends those images again. Uploads (the web tier) always commit synchronously.
    from django.conf import settings
    from django.db.backends.signals import connection_created

    if not settings.WORKER_SYNCHRONOUS_COMMIT:
        connection_created.connect(_asynchronous_commit, weak=False, dispatch_uid="worker-async-commit")


def _asynchronous_commit(sender, connection, **_: object) -> None:
    if connection.vendor == "postgresql":
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit TO off")


@task_prerun.connect
@task_postrun.connect
def _close_old_database_connections(task=None, **_: object) -> None:
    # With CELERY_DB_REUSE_MAX set, Celery leaves the connections open; this closes the broken ones and
    # those older than CONN_MAX_AGE (0 closes every time, as SQLite and the tests have it). Not for an
    # eager task: it runs inside its caller, whose connection (and transaction) is not the task's.
    from django.db import close_old_connections

    if task is not None and getattr(task.request, "is_eager", False):
        return
    close_old_connections()
