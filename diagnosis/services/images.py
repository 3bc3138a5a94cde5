"""Uploads and the image state machine: queued -> processing -> done | failed."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import re
import threading
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, connection, transaction
from django.db.models import F, Q
from django.db.models.functions import Greatest
from django.utils import timezone

from mlcore.preprocessing import ImageValidationError, prepare_upload

from ..log_context import set_image_id
from ..models import AuditEvent, Clinic, Explanation, ImageState, Lesion, LesionImage, UploadBatch
from . import explanation_files, explanations, notify, wakeups
from .audit import record_event, record_events
from .errors import DATABASE_ERRORS
from .transactions import update_returning
from .wakeups import enqueue_prediction

logger = logging.getLogger(__name__)

__all__ = [
    "IdempotencyConflict",
    "UploadBusy",
    "ImageValidationError",
    "submit_image",
    "claim_image",
    "claim_images",
    "enqueue_prediction",
    "fail_image",
    "release_image",
    "requeue_stale_images",
]


def read_upload(upload, *, max_bytes: int) -> bytes:
    """Read an uploaded file, refusing oversize ones before reading them into memory."""
    size = getattr(upload, "size", None)
    if size is not None and size > max_bytes:
        raise ImageValidationError(
            "file_too_large", f"The file is {size / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB."
        )
    upload.seek(0)
    data = upload.read(max_bytes + 1)
    if len(data) > max_bytes:
        raise ImageValidationError("file_too_large", f"The file is larger than the {max_bytes / 1e6:.0f} MB limit.")
    return data


class IdempotencyConflict(Exception):
    """The Idempotency-Key was used before for a different file."""


class UploadBusy(Exception):
    """Every slot for converting a file in this web process stayed taken for WEB_CONVERT_WAIT_SECONDS:
    not the file's fault; the client retries after `retry_after` seconds (503)."""

    retry_after = 5

    def __init__(self) -> None:
        super().__init__("The server is busy converting other photos. Send this one again in a few seconds.")


_convert_slots: threading.BoundedSemaphore | None = None
_convert_slots_lock = threading.Lock()


@contextlib.contextmanager
def convert_slot(wait: float | None = None):
    """One of WEB_CONVERT_CONCURRENCY slots of this web process for a file that is decoded and re-encoded
    here (WebP, a PNG with EXIF, ...: mlcore.preprocessing.prepare_upload), so that a burst of small files
    of many pixels cannot take the web process's memory. UploadBusy after WEB_CONVERT_WAIT_SECONDS."""
    global _convert_slots
    with _convert_slots_lock:
        if _convert_slots is None:
            _convert_slots = threading.BoundedSemaphore(max(1, settings.WEB_CONVERT_CONCURRENCY))
        slots = _convert_slots
    if not slots.acquire(timeout=settings.WEB_CONVERT_WAIT_SECONDS if wait is None else wait):
        raise UploadBusy()
    try:
        yield
    finally:
        slots.release()


IDEMPOTENCY_KEY = re.compile(r"^[A-Za-z0-9._:-]{1,200}$")


def submit_image(
    *, uploader, clinic: Clinic, upload, lesion: Lesion | None = None, via: str = "", idempotency_key: str = "",
    batch=None, quality_check: str = "",
) -> LesionImage:  # fmt: skip
    """Validate the header, strip metadata (prepare_upload), store under a random key, record as queued,
    and enqueue on commit.

    Raises ImageValidationError for bad files and ValidationError for a lesion of another clinic;
    in both cases nothing is stored. With an idempotency key that this user already used, returns
    the image stored then (with `replayed` set) instead of storing a second one; the same key with
    another file raises IdempotencyConflict.
    """
    if lesion is not None and lesion.patient.clinic_id != clinic.pk:
        raise ValidationError({"lesion": ["Unknown lesion."]})
    if idempotency_key and not IDEMPOTENCY_KEY.match(idempotency_key):
        raise ValidationError(
            {"idempotency_key": ["Use 1 to 200 letters, digits, '.', '_', ':' or '-' (a UUID is a good key)."]}
        )
    data = read_upload(upload, max_bytes=settings.MAX_UPLOAD_BYTES)
    if idempotency_key:
        earlier = _replay(uploader=uploader, clinic=clinic, key=idempotency_key, data=data)
        if earlier is not None:
            return earlier
    image = _store(data, clinic=clinic, lesion=lesion, uploader=uploader, idempotency_key=idempotency_key,
                   batch=batch, quality_check=quality_check)  # fmt: skip
    stored_name = image.file.name
    committing = False
    try:
        with transaction.atomic():
            image.save(force_insert=True)
            record_event(actor=uploader, action=AuditEvent.Action.UPLOAD_IMAGE, obj=image, via=via)
            image_id = str(image.pk)
            set_image_id(image_id)
            # robust: a broker outage must not turn a committed upload into a 500. The image stays
            # queued and the sweeper enqueues it again once the broker is back.
            transaction.on_commit(lambda: announce_upload(image_id, file=stored_name), robust=True)
            committing = True
    except DATABASE_ERRORS:
        if not committing:
            default_storage.delete(stored_name)  # rolled back: never leave a file whose row did not commit
        elif _kept_after_commit_error(LesionImage, [image.pk], [stored_name]):
            image.replayed = False
            return image  # the row is there: the sweeper enqueues it, as after a broker outage
        raise
    except IntegrityError:
        default_storage.delete(stored_name)
        earlier = _replay(uploader=uploader, clinic=clinic, key=idempotency_key, data=data) if idempotency_key else None
        if earlier is None:
            raise
        return earlier  # a concurrent retry with the same key won the race
    except BaseException:
        default_storage.delete(stored_name)  # never leave a file whose row did not commit
        raise
    image.replayed = False
    return image


def _store(data: bytes, *, clinic, lesion, uploader, idempotency_key: str = "", batch=None,
           slot=convert_slot, quality_check: str = "") -> LesionImage:  # fmt: skip
    """Check the header (prepare_upload: the header and the file's structure only; the worker's full
    decode reports damage in the pixels), strip the metadata, store the file under a random key, and
    return the unsaved row that describes it. `quality_check`: the upload's own (strict, lenient or
    off), else its clinic's."""
    prepared = prepare_upload(
        data, max_bytes=settings.MAX_UPLOAD_BYTES, max_pixels=settings.MAX_IMAGE_PIXELS,
        max_convert_pixels=settings.WEB_CONVERT_MAX_PIXELS, convert_slot=slot,
    )  # fmt: skip
    stored_name = default_storage.save(f"images/{uuid.uuid4().hex}.{prepared.extension}", ContentFile(prepared.data))
    return LesionImage(
        clinic=clinic, lesion=lesion, uploaded_by=uploader, file=stored_name, content_type=prepared.content_type,
        sha256=hashlib.sha256(data).hexdigest(), width=prepared.width, height=prepared.height,
        file_size=len(prepared.data), upload_bytes=len(data), idempotency_key=idempotency_key, batch=batch,
        state=ImageState.QUEUED, enqueued_at=timezone.now(), camera=prepared.camera,
        quality_check=quality_check or clinic.quality_check,
    )  # fmt: skip


def _kept_after_commit_error(model, pks, file_names, *, attempts: int = 6, pause: float = 0.5) -> bool:
    """After COMMIT itself failed (the connection dropped while it was under way), the rows may or may not
    have been committed. Ask again on a new connection: True when they were (keep the files: the upload
    is stored); False when they were not (the files are deleted). While the database cannot tell, the
    files are kept and logged by name: a file without a row can be removed later, a row without its
    file would be a photo lost."""
    for attempt in range(attempts):
        try:
            connection.close()
            found = model.objects.filter(pk__in=pks).exists()
        except DATABASE_ERRORS:
            time.sleep(pause * (attempt + 1))
            continue
        if not found:
            for name in file_names:
                default_storage.delete(name)
        logger.warning("COMMIT of an upload failed; its rows are %s", "there" if found else "not there")
        return found
    logger.error("COMMIT of an upload failed and the database cannot tell whether it happened; kept %s", file_names)
    return False


def _replay(*, uploader, clinic: Clinic, key: str, data: bytes) -> LesionImage | None:
    earlier = LesionImage.objects.filter(clinic=clinic, uploaded_by=uploader, idempotency_key=key).first()
    if earlier is None:
        return None
    if earlier.sha256 != hashlib.sha256(data).hexdigest():
        raise IdempotencyConflict(
            "This Idempotency-Key was already used for a different file. Use a new key for a new upload."
        )
    earlier.replayed = True
    return earlier


def announce_upload(image_id: str, *, file: str = "") -> None:
    """Wake an inference worker for a new upload, unless enough messages are already waiting for one
    (services.wakeups): the worker that takes one of them gathers this photo into its batch. `file`,
    the stored photo's name, travels with the message (see wakeups.enqueue_prediction)."""
    if not wakeups.ring():
        return
    try:
        enqueue_prediction(image_id, file=file)
    except Exception:
        wakeups.unring()
        raise


def claim_image(*, image_id: str, worker_id: str) -> LesionImage | None:
    """Move an image from queued to processing with one conditional UPDATE; None if not ours to take."""
    claimed = claim_images(image_ids=[image_id], worker_id=worker_id)
    return claimed[0] if claimed else None


def claim_images(*, image_ids: list[str], worker_id: str) -> list[LesionImage]:
    """Move the images that are ours to take from queued to processing, in one UPDATE that returns them.

    A processing claim can be taken over when it is stale (its worker died) or when it is this
    very message being redelivered after its worker was lost.
    """
    now = timezone.now()
    stale_before = now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    claimable = Q(state=ImageState.QUEUED) | Q(state=ImageState.PROCESSING, claimed_at__lt=stale_before)
    if worker_id:
        claimable |= Q(state=ImageState.PROCESSING, claimed_by=worker_id)
    claimed = update_returning(LesionImage.objects.filter(pk__in=image_ids).filter(claimable),
                               state=ImageState.PROCESSING, claimed_at=now, claimed_by=worker_id,
                               attempts=F("attempts") + 1)  # fmt: skip
    notify.changed([image.pk for image in claimed], ImageState.PROCESSING)
    return claimed


def fail_image(*, image_id: str, reason: str, worker_id: str | None = None) -> None:
    """Mark failed with a reason. A worker passes its claim id, so it can only fail its own claim
    (another worker may have taken a stale claim over)."""
    images = LesionImage.objects.filter(pk=image_id).exclude(state=ImageState.DONE)
    if worker_id is not None:
        images = images.filter(state=ImageState.PROCESSING, claimed_by=worker_id)
    if images.update(state=ImageState.FAILED, error=reason[:2000], processed_at=timezone.now(), claimed_at=None):
        notify.changed([image_id], ImageState.FAILED)


def release_image(*, image_id: str, worker_id: str) -> None:
    """Give our claim back after a temporary error (database, storage or model briefly unavailable)
    so a later attempt can take it. Such an attempt says nothing about the image, so it is not
    counted towards MAX_PROCESSING_ATTEMPTS."""
    _release(LesionImage.objects.filter(pk=image_id), worker_id)


def release_images(*, worker_id: str) -> None:
    """release_image for every image this worker id has claimed, in one statement (after a database
    error: a claim whose answer was lost with the connection is given back too)."""
    _release(LesionImage.objects.all(), worker_id)


def _release(images, worker_id: str) -> None:
    images.filter(state=ImageState.PROCESSING, claimed_by=worker_id).update(
        state=ImageState.QUEUED, claimed_at=None, claimed_by="", enqueued_at=timezone.now(),
        attempts=Greatest(F("attempts") - 1, 0),
    )  # fmt: skip


def requeue_stale_images(*, now=None) -> dict[str, int]:
    """Recover uploads whose message or worker was lost. Tasks are idempotent, so a spare message
    for an image that is in fact still waiting in the queue costs one no-op claim."""
    now = now or timezone.now()
    dead_claims = LesionImage.objects.filter(
        state=ImageState.PROCESSING, claimed_at__lt=now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    )
    reclaimed = dead_claims.update(state=ImageState.QUEUED, claimed_at=None, enqueued_at=None)
    waiting = list(
        LesionImage.objects.order_by("enqueued_at")
        .filter(state=ImageState.QUEUED)
        .filter(
            Q(enqueued_at__isnull=True) | Q(enqueued_at__lt=now - timedelta(seconds=settings.REQUEUE_AFTER_SECONDS))
        )
        .values_list("pk", flat=True)[:1000]
    )
    requeued = 0
    for image_id in waiting:
        try:
            enqueue_prediction(str(image_id))
        except Exception:  # broker still down: try again on the next sweep
            logger.warning("could not enqueue image %s; will retry on the next sweep", image_id)
            break
        LesionImage.objects.filter(pk=image_id, state=ImageState.QUEUED).update(enqueued_at=now)
        requeued += 1
    explanations = requeue_stale_explanations(now=now)
    if reclaimed or requeued or explanations:
        logger.info(
            "sweeper: %d dead claims returned to the queue, %d images and %d explanations enqueued again",
            reclaimed, requeued, explanations,
        )  # fmt: skip
    return {"reclaimed": reclaimed, "requeued": requeued, "explanations": explanations}


def requeue_stale_explanations(*, now) -> int:
    """Explanations whose message or worker was lost: draw a stored Grad-CAM again, or compute again."""
    waiting_since = now - timedelta(seconds=settings.REQUEUE_AFTER_SECONDS)
    dead_claim = now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    never_sent_again = Q(claimed_at__isnull=True) | Q(claimed_at__lt=waiting_since)
    stuck = Explanation.objects.filter(
        (Q(state=Explanation.State.QUEUED, created_at__lt=waiting_since) & never_sent_again)
        | Q(state=Explanation.State.PROCESSING, claimed_at__lt=dead_claim)
    ).order_by("created_at")[:500]
    count = 0
    for explanation in stuck:
        try:
            drawn_later = explanation.raw_map is not None or explanation.attribution
            if explanation.method == "gradcam" and drawn_later and not explanation.overlay:
                explanation_files.enqueue_render([str(explanation.pk)])
            else:
                explanations.enqueue_explanation(str(explanation.pk))
        except Exception:
            logger.warning("could not enqueue explanation %s; will retry on the next sweep", explanation.pk)
            break
        # claimed_at doubles as "last sent" for a waiting explanation, so it is not sent again at once.
        Explanation.objects.filter(pk=explanation.pk).update(claimed_at=now)
        count += 1
    return count


def submit_batch(*, uploader, clinic: Clinic, uploads: list, lesion: Lesion | None = None, via: str = "",
                 quality_check: str = ""):  # fmt: skip
    """Several photos at once. Each file is validated and stored on its own, exactly as a single upload:
    the valid ones are accepted (and queued), each invalid one is listed with its error. The accepted
    ones are recorded together (one transaction: the batch, their rows, their audit events), so a
    database error accepts none of them and leaves no file behind. Returns
    (batch, [(position, image)], [(position, code, message)])."""
    if lesion is not None and lesion.patient.clinic_id != clinic.pk:
        raise ValidationError({"lesion": ["Unknown lesion."]})
    accepted, rejected = [], []
    slot = convert_slot  # after one file found the converters busy, the rest do not wait again
    committing = False
    try:
        for position, upload in enumerate(uploads):
            try:
                data = read_upload(upload, max_bytes=settings.MAX_UPLOAD_BYTES)
                accepted.append((position, _store(data, clinic=clinic, lesion=lesion, uploader=uploader, slot=slot,
                                                  quality_check=quality_check)))  # fmt: skip
            except ImageValidationError as exc:
                rejected.append((position, exc.code, exc.message))
            except UploadBusy as exc:
                rejected.append((position, "server_busy", str(exc)))
                slot = functools.partial(convert_slot, wait=0)
        batch = UploadBatch(clinic=clinic, created_by=uploader, submitted=len(uploads),
                            rejected=[{"position": p, "code": c, "detail": m} for p, c, m in rejected])  # fmt: skip
        images = [image for _, image in accepted]
        for image in images:
            image.batch = batch
        with transaction.atomic():
            batch.save(force_insert=True)
            LesionImage.objects.bulk_create(images)
            record_events(actor=uploader, action=AuditEvent.Action.UPLOAD_IMAGE, objects=images, via=via)
            ids = [str(image.pk) for image in images]
            transaction.on_commit(lambda: announce_batch(ids), robust=True)
            committing = True
    except DATABASE_ERRORS:
        names = [image.file.name for _, image in accepted]
        if not committing:
            for name in names:
                default_storage.delete(name)
        elif _kept_after_commit_error(UploadBatch, [batch.pk], names):
            return batch, accepted, rejected
        raise
    except BaseException:
        for _, image in accepted:  # never leave a file whose row did not commit
            default_storage.delete(image.file.name)
        raise
    return batch, accepted, rejected


def announce_batch(image_ids: list[str]) -> None:
    """Wake inference workers for a batch upload: one message per INFERENCE_BATCH_SIZE photos (each task
    gathers a batch's worth of them), or one per photo when wake-ups are not coalesced."""
    step = max(1, settings.INFERENCE_BATCH_SIZE) if wakeups.enabled() else 1
    for start in range(0, len(image_ids), step):
        announce_upload(image_ids[start])  # no file: the task takes a batch's worth of photos anyway
