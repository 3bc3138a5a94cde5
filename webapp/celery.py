from __future__ import annotations

import os

from celery import Celery
from celery.signals import worker_process_init

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
