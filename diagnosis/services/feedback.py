"""Clinician feedback and histopathology outcomes: the ground truth that monitoring compares with."""

from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import transaction

from ..models import BENIGN_DIAGNOSES, MALIGNANT_DIAGNOSES, AuditEvent, Diagnosis, Feedback, ImageState, LesionImage
from .audit import record_event


def ground_truth_for(diagnosis: str) -> str:
    if diagnosis in MALIGNANT_DIAGNOSES:
        return Feedback.GroundTruth.MALIGNANT
    if diagnosis in BENIGN_DIAGNOSES:
        return Feedback.GroundTruth.BENIGN
    return Feedback.GroundTruth.UNKNOWN


def record_assessment(*, image: LesionImage, agrees: bool, note: str = "", recorded_by, via: str = "") -> Feedback:
    """The clinician agrees or disagrees with the image's current result."""
    prediction = image.predictions.order_by("-created_at").first()
    if image.state != ImageState.DONE or prediction is None:
        raise ValidationError("This image has no result yet; an assessment can be recorded once it is done.")
    return _record(image=image, prediction=prediction, kind=Feedback.Kind.ASSESSMENT, agrees=bool(agrees),
                   note=note, recorded_by=recorded_by, via=via)  # fmt: skip


def record_outcome(*, image: LesionImage, diagnosis: str, note: str = "", recorded_by, via: str = "") -> Feedback:
    """A histopathology outcome. It may be recorded whatever the image's state: the biopsy is the
    truth even when the photo could not be scored."""
    if diagnosis not in Diagnosis.values:
        raise ValidationError({"diagnosis": [f"Unknown diagnosis {diagnosis!r}."]})
    return _record(image=image, prediction=image.predictions.order_by("-created_at").first(),
                   kind=Feedback.Kind.HISTOPATHOLOGY, diagnosis=diagnosis, ground_truth=ground_truth_for(diagnosis),
                   note=note, recorded_by=recorded_by, via=via)  # fmt: skip


def record_photo_feedback(*, image: LesionImage, photo_was_fine: bool, note: str = "", recorded_by,
                          via: str = "") -> Feedback:  # fmt: skip
    """The clinician's word on the quality gate's verdict on a photo: "this photo was fine" on one the
    gate refused (photo_was_fine=True), or that an accepted photo was in fact poor. Stored as kind
    `photo` with `agrees` whether the gate was right; the calibration report counts them per check."""
    prediction = image.predictions.order_by("-created_at").first()
    if image.state != ImageState.DONE or prediction is None:
        raise ValidationError("This photo has not been checked yet; its quality can be judged once it is done.")
    refused = prediction.assessable is False
    return _record(image=image, prediction=prediction, kind=Feedback.Kind.PHOTO, agrees=refused != bool(photo_was_fine),
                   note=note, recorded_by=recorded_by, via=via)  # fmt: skip


def _record(*, image, prediction, kind, recorded_by, via, note="", agrees=None, diagnosis="", ground_truth=""):
    feedback = Feedback(
        image=image, prediction=prediction, kind=kind, agrees=agrees, diagnosis=diagnosis,
        ground_truth=ground_truth, note=note.strip(), recorded_by=recorded_by,
    )  # fmt: skip
    feedback.full_clean(exclude=["image", "prediction", "recorded_by"])
    with transaction.atomic():
        feedback.save()
        record_event(actor=recorded_by, action=AuditEvent.Action.RECORD_FEEDBACK, obj=feedback, clinic=image.clinic,
                     via=via)  # fmt: skip
    return feedback


def latest_feedback(image: LesionImage) -> dict[str, Feedback | None]:
    """The newest assessment and the newest outcome (from prefetched feedback when available)."""
    records = sorted(image.feedback.all(), key=lambda f: (f.recorded_at, f.pk), reverse=True)
    return {
        "assessment": next((f for f in records if f.kind == Feedback.Kind.ASSESSMENT), None),
        "outcome": next((f for f in records if f.kind == Feedback.Kind.HISTOPATHOLOGY), None),
        "photo": next((f for f in records if f.kind == Feedback.Kind.PHOTO), None),
    }
