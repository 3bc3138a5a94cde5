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
           ("version", "model_version__version"), ("decision", "decision"), ("assessable", "assessable"),
           ("quality", "quality"), ("ood_score", "ood_score"), ("probabilities", "probabilities"),
           ("malignant", "model_version__malignant_classes"),
           ("positive", "model_version__metadata__positive_class"))  # fmt: skip


BEFORE_THE_GATE = "Stored before the photo-quality gate."


def outcome(*, probability: float, threshold: float, decision: str, assessable, quality, ood_score) -> dict:
    """What the quality gate made of a prediction (issue 20), as the API shows it: `decision` (above_threshold,
    below_threshold, uncertain or not_assessable), `assessable`, `quality` (each check: value, threshold,
    pass or fail, advice; the reasons in words; the OOD score; the band) and `ood_score`. A prediction
    stored before the gate has no decision of its own: it is read from the threshold."""
    if not decision:
        decision = "above_threshold" if probability >= threshold else "below_threshold"
        assessable, quality = True, {"gate": "off", "checks": [], "reasons": [], "note": BEFORE_THE_GATE}
    return {"decision": decision, "assessable": assessable if assessable is not None else True,
            "quality": quality or {}, "ood_score": ood_score}  # fmt: skip


def prediction_outcome(prediction: Prediction) -> dict:
    """outcome() of a Prediction row."""
    return outcome(probability=prediction.probability_malignant, threshold=prediction.threshold,
                   decision=prediction.decision, assessable=prediction.assessable, quality=prediction.quality,
                   ood_score=prediction.ood_score)  # fmt: skip


def diagnoses(probabilities: dict | None, malignant) -> list[dict]:
    """Every class's probability, the most probable first, each marked malignant or not: what the API and
    the portal show as the top diagnoses of a model with several classes (issue 21). The malignancy
    probability is the sum over those marked malignant. `malignant`: the model version's malignant classes
    (ModelVersion.malignant_set)."""
    chosen = set(malignant)
    ranked = sorted((probabilities or {}).items(), key=lambda item: (-item[1], item[0]))
    return [{"diagnosis": name, "probability": value, "malignant": name in chosen} for name, value in ranked]


def _malignant_set(row: dict) -> list[str]:
    """ModelVersion.malignant_set, from a status row's two columns."""
    return list(row["malignant"] or []) or [row["positive"] or "malignant"]


def above_threshold(probability: float, threshold: float, decision: str) -> bool | None:
    """Whether the probability reaches the threshold; None (no call) for a photo that cannot be assessed."""
    return None if decision == "not_assessable" else probability >= threshold


def image_status(*, user, image_id: uuid.UUID, via: str, ip_address: str | None = None) -> dict | None:
    """The status of one image of a clinic `user` belongs to, read with one indexed statement (primary
    key, clinic and latest prediction together), or None when there is no such image there. Reading a
    finished result is written to the audit log, as for the full record.

    {"id", "state", "error" (in words, when failed), "processed_at", "prediction" (once done:
    probability_malignant, label, threshold, above_threshold, model_version), "disclaimer"}"""
    return images_status(user=user, image_ids=[image_id], via=via, ip_address=ip_address).get(str(image_id))


def images_status(*, user, image_ids, via: str, ip_address: str | None = None) -> dict[str, dict]:
    """image_status for several images in one statement, by id (as a string); those not in the user's
    clinic are left out."""
    latest = Prediction.objects.filter(image=OuterRef("pk")).order_by("-created_at")
    image_ids = list(image_ids)
    by_id = {"pk": image_ids[0]} if len(image_ids) == 1 else {"pk__in": image_ids}  # one: by primary key
    rows = (
        LesionImage.objects.filter(**by_id)
        .filter(clinic_id__in=ClinicMembership.objects.filter(user=user).values("clinic_id"))
        .order_by()
        .annotate(**{name: Subquery(latest.values(field)[:1]) for name, field in _LATEST})
        .values("pk", "clinic_id", "state", "error", "processed_at", *(name for name, _ in _LATEST))
    )
    return {str(row["pk"]): _status(row, user=user, via=via, ip_address=ip_address) for row in rows}


def _status(row: dict, *, user, via: str, ip_address: str | None) -> dict:
    done = row["state"] == ImageState.DONE and row["p"] is not None
    if done:
        record_event(actor=user, action=AuditEvent.Action.VIEW_IMAGE, obj=LesionImage(pk=row["pk"]),
                     clinic=Clinic(pk=row["clinic_id"]), via=via, ip_address=ip_address)  # fmt: skip
    judged = None
    if done:
        judged = outcome(probability=row["p"], threshold=row["threshold"], decision=row["decision"],
                         assessable=row["assessable"], quality=row["quality"], ood_score=row["ood_score"])  # fmt: skip
    return {
        "id": str(row["pk"]), "state": row["state"],
        "error": row["error"] if row["state"] == ImageState.FAILED else "",
        "processed_at": row["processed_at"],
        "prediction": {
            "probability_malignant": row["p"], "label": row["label"], "threshold": row["threshold"],
            "above_threshold": above_threshold(row["p"], row["threshold"], judged["decision"]),
            "model_version": row["version"], "diagnoses": diagnoses(row["probabilities"], _malignant_set(row)),
            **judged,
        } if done else None,
        **(judged or EMPTY_OUTCOME),
        "disclaimer": DISCLAIMER,
    }  # fmt: skip


EMPTY_OUTCOME = {"decision": None, "assessable": None, "quality": None, "ood_score": None}


def is_final(status: dict | None) -> bool:
    """Whether a status (or its absence: the image is gone) will not change any more."""
    return status is None or status["state"] in FINAL_STATES


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
