"""Thin Celery tasks: take primary keys, call one service. Services send these by name
(services.dispatch) and never import this module.

Time limits come from CELERY_TASK_SOFT_TIME_LIMIT and CELERY_TASK_TIME_LIMIT."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings
from django.utils import timezone

from .services import decoding, wakeups
from .services.dispatch import UPLOAD_FILE_HEADER
from .services.errors import TransientError
from .services.explanation_files import render_explanations
from .services.explanation_work import compute_explanations
from .services.images import requeue_stale_images
from .services.monitoring import run_drift_report
from .services.predictions import process_images
from .services.retention import purge_expired_images
from .services.tokens import delete_expired_tokens

logger = logging.getLogger(__name__)

# Work on claimed rows: acknowledged only when done, requeued if the worker dies, retried a bounded
# number of times for named transient errors only. Every such task is idempotent.
CLAIMED_WORK = {
    "bind": True,
    "acks_late": True,
    "reject_on_worker_lost": True,
    "autoretry_for": (TransientError,),
    "max_retries": 3,
    "retry_backoff": 2,
    "retry_backoff_max": 30,
}


def worker_id(task) -> str:
    return f"{task.request.hostname}:{task.request.id}"


@shared_task(**CLAIMED_WORK)
def predict_image_task(self, image_id: str) -> str:
    """Its own image, plus up to INFERENCE_BATCH_SIZE - 1 other queued images as one batch, then further
    batches while photos are queued (services.engine). With an empty queue the image goes through alone
    at once: no waiting for a batch to fill. The upload's message header UPLOAD_FILE_HEADER (the stored
    photo's name) lets an idle worker start decoding it first thing (decoding.decode_ahead); a worker
    that does not know the header ignores it."""
    ahead = _decode_ahead(self.request)
    coalescing = wakeups.enabled()
    started = timezone.now()
    if coalescing:
        wakeups.answer()  # before gathering: an upload whose ring was refused is gathered by this task
    outcomes = process_images(image_ids=[image_id], worker_id=worker_id(self), ahead=ahead,
                              gather=settings.INFERENCE_BATCH_SIZE - 1, gather_if_finished=coalescing)  # fmt: skip
    if coalescing:
        # Only after a task that did not raise, and only for photos queued before it started: photos it
        # gave back (a model that cannot be loaded, storage down) wait for its retry or the sweeper
        # rather than waking a worker at once, again and again.
        wakeups.ring_for_waiting(queued_before=started)
    return outcomes[image_id]


def upload_file_hint(request) -> str:
    """The UPLOAD_FILE_HEADER of a task's message: a worker sees a message's headers as attributes of
    the request, an eager call (tests) under request.headers."""
    value = getattr(request, UPLOAD_FILE_HEADER, None) or (getattr(request, "headers", None) or {}).get(
        UPLOAD_FILE_HEADER
    )
    return value if isinstance(value, str) else ""


def first_delivery(request) -> bool:
    """Neither a retry nor a message redelivered after its worker was lost (which may have died on this
    very photo)."""
    return not request.retries and not (request.delivery_info or {}).get("redelivered")


def _decode_ahead(request):
    name = upload_file_hint(request)
    if not name or not first_delivery(request) or not decoding.decode_ahead_supported():
        return None
    try:
        return decoding.decode_ahead(name)
    except Exception:  # only a head start: the task decodes the photo after the claim instead
        logger.warning("could not start decoding %s ahead", name, exc_info=True)
        return None


@shared_task(**CLAIMED_WORK)
def explain_image_task(self, explanation_id: str, *others: str) -> str:
    """Its own explanations (one, or a batch's requested together), then others that can share their
    Captum call."""
    outcomes = compute_explanations(explanation_ids=[explanation_id, *others], worker_id=worker_id(self))
    return outcomes[explanation_id]


@shared_task
def render_explanation_task(explanation_id: str, *others: str) -> dict[str, str]:
    """Draw the Grad-CAM pictures of one explanation or of a batch's."""
    return render_explanations(explanation_ids=[explanation_id, *others])


@shared_task
def requeue_stale_images_task() -> dict[str, int]:
    return requeue_stale_images()


@shared_task
def drift_report_task(triggered_by: str = "schedule") -> str:
    """Compute a drift report (beat schedule: DRIFT_REPORT_INTERVAL_SECONDS; or "run now" in the admin)."""
    report = run_drift_report(triggered_by=triggered_by)
    return f"{report.pk}: {report.status}"


@shared_task
def purge_expired_images_task() -> dict[str, int]:
    return purge_expired_images()


@shared_task
def delete_expired_tokens_task() -> int:
    return delete_expired_tokens()
