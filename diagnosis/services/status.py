"""Where an upload stands: one image's status (what polling clients and the event stream read) and a
batch's progress. Plain data; the API turns ids into URLs."""

from __future__ import annotations

import uuid

from django.db.models import OuterRef, Subquery

from ..models import DISCLAIMER, AuditEvent, Clinic, ClinicMembership, ImageState, LesionImage, Prediction, UploadBatch
from .audit import record_event

FINAL_STATES = (ImageState.DONE, ImageState.FAILED)
NO_SUCH_IMAGE = "No image with this id in your clinic."
_LATEST = (("p", "probability_malignant"), ("label", "label"), ("threshold", "threshold"),
           ("version", "model_version__version"))  # fmt: skip


def image_status(*, user, image_id: uuid.UUID, via: str, ip_address: str | None = None) -> dict | None:
    """The status of one image of a clinic `user` belongs to, read with one indexed statement (primary
    key, clinic and latest prediction together), or None when there is no such image there. Reading a
    finished result is written to the audit log, as for the full record.

    {"id", "state", "error" (in words, when failed), "processed_at", "prediction" (once done:
    probability_malignant, label, threshold, above_threshold, model_version), "disclaimer"}"""
    latest = Prediction.objects.filter(image=OuterRef("pk")).order_by("-created_at")
    row = (
        LesionImage.objects.filter(
            pk=image_id, clinic_id__in=ClinicMembership.objects.filter(user=user).values("clinic_id")
        )
        .annotate(**{name: Subquery(latest.values(field)[:1]) for name, field in _LATEST})
        .values("pk", "clinic_id", "state", "error", "processed_at", "p", "label", "threshold", "version")
        .first()
    )
    if row is None:
        return None
    done = row["state"] == ImageState.DONE and row["p"] is not None
    if done:
        record_event(actor=user, action=AuditEvent.Action.VIEW_IMAGE, obj=LesionImage(pk=row["pk"]),
                     clinic=Clinic(pk=row["clinic_id"]), via=via, ip_address=ip_address)  # fmt: skip
    return {
        "id": str(row["pk"]), "state": row["state"],
        "error": row["error"] if row["state"] == ImageState.FAILED else "",
        "processed_at": row["processed_at"],
        "prediction": {
            "probability_malignant": row["p"], "label": row["label"], "threshold": row["threshold"],
            "above_threshold": row["p"] >= row["threshold"], "model_version": row["version"],
        } if done else None,
        "disclaimer": DISCLAIMER,
    }  # fmt: skip


def batch_progress(batch: UploadBatch) -> dict:
    """A batch's images by state, oldest first, and the counts: {"id", "created_at", "submitted",
    "accepted", "rejected", "states" (every state, with 0 where none), "finished" (nothing queued or
    processing), "images": [{"id", "state"}]}."""
    images = list(batch.images.order_by("created_at").values_list("pk", "state"))
    states = {state: 0 for state in ImageState.values}
    for _, state in images:
        states[state] += 1
    return {
        "id": str(batch.pk), "created_at": batch.created_at, "submitted": batch.submitted,
        "accepted": len(images), "rejected": batch.rejected, "states": states,
        "finished": states[ImageState.QUEUED] == states[ImageState.PROCESSING] == 0,
        "images": [{"id": str(pk), "state": state} for pk, state in images],
    }  # fmt: skip
