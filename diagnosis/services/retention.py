"""Erasing patient data: one patient on request (purge_patient), or images past the retention period."""

from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.core.files.storage import default_storage
from django.db import transaction
from django.utils import timezone

from ..models import AuditEvent, Explanation, LesionImage, Patient
from .audit import record_event
from .previews import preview_names

logger = logging.getLogger(__name__)


def _lock_and_list_files(images) -> list[str]:
    """Inside the deleting transaction: lock the images and their explanations, then list their
    stored files. A worker that draws an explanation's pictures meanwhile waits on the lock to record
    them, finds the row gone once the deletion commits, and deletes its own files (store_result); so
    no file written during the purge is left behind unlisted."""
    rows = list(images.select_for_update().values_list("pk", "file"))
    ids = [pk for pk, _ in rows]
    names = [name for _, name in rows if name]
    explanations = Explanation.objects.select_for_update().filter(image_id__in=ids).order_by("pk")
    for overlay, heatmap, attribution in explanations.values_list("overlay", "heatmap", "attribution"):
        names += [name for name in (overlay, heatmap, attribution) if name]
    return names


def _delete_files(names: list[str]) -> int:
    """Delete the stored files and the portal's copies of the photos among them (services.previews;
    not counted: most photos never had one drawn). Returns how many stored files were deleted."""
    for name in preview_names(name for name in names if name.startswith("images/")):
        _delete(name)
    return sum(_delete(name) for name in names)


def _delete(name: str) -> bool:
    try:
        default_storage.delete(name)
        return True
    except Exception:  # never stop half-way: the rows are gone, report the stray file
        logger.exception("could not delete stored file %s", name)
        return False


def delete_images(images) -> dict[str, int]:
    """Delete images with their predictions, explanations, feedback and drift features (cascades),
    then their stored files once the deletion has committed."""
    images = LesionImage.objects.filter(pk__in=list(images.values_list("pk", flat=True))).order_by("pk")
    with transaction.atomic():
        names = _lock_and_list_files(images)
        count = images.count()
        images.delete()
    return {"images": count, "files": _delete_files(names)}


def purge_patient(*, patient: Patient, actor=None, via: str = "cli") -> dict[str, int]:
    """Erase a patient: every image, result, heatmap, outcome and stored file, the lesions and the
    patient record. The audit log keeps that it happened (ids only, no reference)."""
    images = LesionImage.objects.filter(lesion__patient=patient).order_by("pk")
    patient_id, clinic = str(patient.pk), patient.clinic
    with transaction.atomic():
        names = _lock_and_list_files(images)
        counts = {"images": images.count(), "lesions": patient.lesions.count()}
        images.delete()
        patient.lesions.all().delete()
        patient.delete()
        record_event(actor=actor, action=AuditEvent.Action.PURGE_PATIENT, clinic=clinic, via=via,
                     object_id=patient_id)  # fmt: skip
    counts["files"] = _delete_files(names)
    return counts


def purge_expired_images(*, now=None) -> dict[str, int]:
    """Delete images older than IMAGE_RETENTION_DAYS (0: keep forever)."""
    days = settings.IMAGE_RETENTION_DAYS
    if days <= 0:
        return {"images": 0, "files": 0}
    cutoff = (now or timezone.now()) - timedelta(days=days)
    counts = delete_images(LesionImage.objects.filter(created_at__lt=cutoff))
    if counts["images"]:
        record_event(actor=None, action=AuditEvent.Action.PURGE_EXPIRED, via="retention",
                     object_id=f"{counts['images']} images")  # fmt: skip
        logger.info("retention: deleted %d images older than %d days", counts["images"], days)
    return counts
