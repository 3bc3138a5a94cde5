"""Explanations requested: by a clinician or an API client (any method, with parameters), and the
automatic ones every prediction gets (Integrated Gradients by default, requested per batch). An
identical request returns the earlier explanation. Computing them is services.explanation_work (the
batch engine on the `explain` queue); their files are services.explanation_files."""

from __future__ import annotations

import hashlib
import json
import logging

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from mlcore.methods import METHOD_LABELS, ExplanationError, method_label, validate_params

from ..models import AuditEvent, Explanation, ImageState, LesionImage, ModelVersion, Prediction
from . import dispatch, rates
from .audit import record_event
from .transactions import savepoint_if_inside

logger = logging.getLogger(__name__)

__all__ = ["METHOD_LABELS", "method_label"]  # for the portal: the methods' names for people (torch-free)


class ExplanationRefused(ValidationError):
    """A request the API answers with 400 (bad method or parameters) or 409 (no prediction yet)."""

    def __init__(self, message: str, *, code: str, status: int = 400, retry_after: int | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.reason = message
        self.error_code = code
        self.retry_after = retry_after  # with 429: the seconds until the user may ask again


def canonical_key(method: str, params: dict, target_index: int) -> str:
    text = json.dumps({"method": method, "params": params, "target": target_index}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _validate(method: str, params: dict | None, model_version: ModelVersion) -> dict:
    # mlcore.methods is torch-free: validating a request does not load torch into the web process.
    try:
        return validate_params(
            method, params, input_size=model_version.input_size, max_steps=settings.EXPLAIN_MAX_STEPS,
            max_evaluations=settings.EXPLAIN_MAX_EVALUATIONS,
        )  # fmt: skip
    except ExplanationError as exc:
        raise ExplanationRefused(exc.message, code=exc.code) from None


def request_explanation(
    *, image: LesionImage, method: str, params: dict | None = None, target: str | None = None, requested_by=None,
    via: str = "",
) -> tuple[Explanation, bool]:  # fmt: skip
    """Ask for an explanation of the image's current prediction. Returns (explanation, created):
    an identical earlier request (same image, model version, method, canonical parameters and
    target) is returned instead of computing it again; a failed one is queued again."""
    prediction = Prediction.objects.filter(image=image).select_related("model_version").order_by("-created_at").first()
    if image.state != ImageState.DONE or prediction is None:
        raise ExplanationRefused(
            f"This image has no prediction yet (state: {image.state}); explanations can be requested once it is done.",
            code="no_prediction",
            status=409,
        )
    model_version = prediction.model_version
    canonical = _validate(method, params, model_version)
    class_names = list(model_version.class_names)
    if target is None:
        target_index = class_names.index(prediction.label)
    elif target in class_names:
        target_index = class_names.index(target)
    else:
        raise ExplanationRefused(
            f"Unknown target {target!r}; choose one of {', '.join(class_names)}.", code="invalid_target"
        )
    key = canonical_key(method, canonical, target_index)
    explanation = Explanation.objects.filter(
        image=image, model_version=model_version, method=method, params_key=key
    ).first()
    created = False
    if explanation is None or explanation.state == Explanation.State.FAILED:
        _check_limits(image=image, model_version=model_version, requested_by=requested_by, new_row=explanation is None)
    if explanation is None:
        try:
            with transaction.atomic():
                explanation = Explanation.objects.create(
                    image=image, model_version=model_version, method=method, params=canonical, params_key=key,
                    target_index=target_index, target_class=class_names[target_index],
                    requested_by=requested_by if getattr(requested_by, "is_authenticated", False) else None,
                )  # fmt: skip
                created = True
        except IntegrityError:  # an identical request won the race
            explanation = Explanation.objects.get(
                image=image, model_version=model_version, method=method, params_key=key
            )
    elif explanation.state == Explanation.State.FAILED:
        Explanation.objects.filter(pk=explanation.pk, state=Explanation.State.FAILED).update(
            state=Explanation.State.QUEUED, error="", attempts=0
        )
        explanation.refresh_from_db()
        created = True
    if requested_by is not None:
        record_event(actor=requested_by, action=AuditEvent.Action.REQUEST_EXPLANATION, obj=explanation,
                     clinic=image.clinic, via=via)  # fmt: skip
    if created:
        explanation_id = str(explanation.pk)
        transaction.on_commit(lambda: enqueue_explanation(explanation_id), robust=True)
    return explanation, created


def enqueue_explanation(explanation_id: str, *others: str) -> None:
    """One message for one explanation, or for several that share one Captum call (the first is the
    task's own, the others join it)."""
    dispatch.send(dispatch.EXPLAIN, args=[explanation_id, *others])


def _check_limits(*, image: LesionImage, model_version: ModelVersion, requested_by, new_row: bool) -> None:
    """A clinician's requests that make new work: at most EXPLAIN_MAX_PER_IMAGE explanations requested
    by hand per image and model version (409), EXPLAIN_MAX_PENDING_PER_USER of theirs waiting or running
    (429), and EXPLAIN_RATE_LIMIT of them over time (429 with Retry-After). Each is a Captum job and
    three stored files; without these, one token could fill the explain queue that every clinic's
    automatic heatmaps wait in, and the storage. The automatic explanations are not counted."""
    if not getattr(requested_by, "is_authenticated", False):
        return
    requested = Explanation.objects.filter(image=image, model_version=model_version, requested_by__isnull=False)
    if new_row and requested.count() >= settings.EXPLAIN_MAX_PER_IMAGE:  # a failed one asked again adds no row
        raise ExplanationRefused(
            f"This photo already has {settings.EXPLAIN_MAX_PER_IMAGE} requested explanations, the most one photo "
            "may have. Use one of them, or ask an administrator.", code="too_many_explanations", status=409,
        )  # fmt: skip
    pending = Explanation.objects.filter(
        requested_by=requested_by, state__in=[Explanation.State.QUEUED, Explanation.State.PROCESSING]
    ).count()
    if pending >= settings.EXPLAIN_MAX_PENDING_PER_USER:
        raise ExplanationRefused(
            f"You have {pending} explanations waiting or being computed. Request more when they are done.",
            code="too_many_pending", status=429, retry_after=30,
        )  # fmt: skip
    try:
        rates.take("explanations", requested_by.pk, settings.EXPLAIN_RATE_LIMIT)
    except rates.RateExceeded as exc:
        raise ExplanationRefused(
            f"Too many explanation requests ({settings.EXPLAIN_RATE_LIMIT}). Try again in {exc.retry_after} s.",
            code="throttled", status=429, retry_after=exc.retry_after,
        ) from None  # fmt: skip


def request_automatic_explanations_many(items, *, model_version: ModelVersion) -> None:
    """The explanations every prediction gets (AUTO_EXPLAIN_METHODS, Integrated Gradients by default),
    for a batch of just-predicted (image, result) pairs: one INSERT for the batch's rows and one message
    per EXPLAIN_BATCH_SIZE of them (an explain task computes its message's explanations in one Captum
    call). When the INSERT fails (an image predicted again already
    has its explanation, say), each image is requested on its own. Never raises."""
    if not items:
        return
    for method in settings.AUTO_EXPLAIN_METHODS:
        try:
            canonical = _validate(method, None, model_version)
        except ExplanationRefused as exc:  # a misconfigured setting must not fail predictions
            logger.error("automatic %s explanation refused: %s", method, exc.reason)
            continue
        try:
            rows = _automatic_rows(items, method=method, canonical=canonical, model_version=model_version)
            with savepoint_if_inside():
                Explanation.objects.bulk_create(rows)
        except Exception as exc:
            if not isinstance(exc, IntegrityError):
                logger.warning("automatic %s explanations of a batch of %d could not be requested together (%s); "
                               "one by one", method, len(items), type(exc).__name__)  # fmt: skip
            for image, _ in items:
                try:
                    request_explanation(image=image, method=method)
                except Exception:
                    logger.exception("automatic %s explanation of image %s could not be requested", method, image.pk)
            continue
        ids = [str(row.pk) for row in rows]
        size = explain_batch_size(canonical)
        for start in range(0, len(ids), size):
            chunk = ids[start : start + size]
            transaction.on_commit(lambda chunk=chunk: enqueue_explanation(*chunk), robust=True)


def _automatic_rows(items, *, method: str, canonical: dict, model_version: ModelVersion) -> list[Explanation]:
    class_names = list(model_version.class_names)
    rows = []
    for image, result in items:
        target_index = class_names.index(result.label)
        rows.append(Explanation(
            image=image, model_version=model_version, method=method, params=canonical,
            params_key=canonical_key(method, canonical, target_index), target_index=target_index,
            target_class=class_names[target_index],
        ))  # fmt: skip
    return rows


def explain_batch_size(params: dict) -> int:
    """How many explanations of these parameters share one Captum call: EXPLAIN_BATCH_SIZE, fewer when
    their steps together would pass EXPLAIN_BATCH_MAX_STEPS (the batch shares one task's time limit)."""
    steps = int(params.get("n_steps") or 1)
    return max(1, min(settings.EXPLAIN_BATCH_SIZE, settings.EXPLAIN_BATCH_MAX_STEPS // max(1, steps)))


PICTURE_TYPES = {"jpg": "image/jpeg", "jpeg": "image/jpeg", "png": "image/png"}


def picture_type(name: str) -> tuple[str, str]:
    """(content type, extension) of a stored overlay or heatmap, from its name: overlays are JPEGs, and
    PNGs where they were drawn before overlays became JPEGs; heatmaps are PNGs."""
    extension = name.rsplit(".", 1)[-1].lower()
    return PICTURE_TYPES.get(extension, "application/octet-stream"), extension
