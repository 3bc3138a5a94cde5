"""Explanations: Grad-CAM with every prediction, Integrated Gradients (and others on request) on
the `explain` queue. Files: a PNG overlay with a legend, a transparent PNG heatmap, and the raw
attribution as float16 .npy, all in storage."""

from __future__ import annotations

import hashlib
import json
import logging
import time
import uuid
from datetime import timedelta

from django.conf import settings
from django.core.exceptions import ValidationError
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import IntegrityError, transaction
from django.db.models import F, Q
from django.utils import timezone

from ..models import AuditEvent, Explanation, ImageState, LesionImage, ModelVersion, Prediction
from .audit import record_event
from .registry import VersionCache

DISPLAY_MAX_SIDE = 1024  # = mlcore.heatmap.DISPLAY_MAX_SIDE; explanations never need more pixels

logger = logging.getLogger(__name__)


class ExplanationRefused(ValidationError):
    """A request the API answers with 400 (bad method or parameters) or 409 (no prediction yet)."""

    def __init__(self, message: str, *, code: str, status: int = 400) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.reason = message
        self.error_code = code


def canonical_key(method: str, params: dict, target_index: int) -> str:
    text = json.dumps({"method": method, "params": params, "target": target_index}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _validate(method: str, params: dict | None, model_version: ModelVersion) -> dict:
    from mlcore.explain import ExplanationError, validate_params

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


def enqueue_explanation(explanation_id: str) -> None:
    from ..tasks import explain_image_task

    explain_image_task.apply_async(args=[explanation_id])


# --- computing ---------------------------------------------------------------------------------------


def _build_explainer(model_version: ModelVersion):
    from mlcore.explain import Explainer

    from .predictions import predictor_for

    predictor = predictor_for(model_version)  # share its model: no second copy in memory
    return Explainer(
        predictor.model, predictor.meta, device=predictor.device,
        memory_budget_bytes=settings.EXPLAIN_MEMORY_BUDGET_MB << 20,
    )  # fmt: skip


explainers = VersionCache(_build_explainer)


def explainer_for(model_version: ModelVersion):
    """The process-wide Explainer of this version."""
    return explainers.get(model_version)


def store_result(*, explanation: Explanation, image, attribution_map, raw=None, seconds: float,
                 convergence_delta: float | None) -> None:  # fmt: skip
    """Render and store the files, then mark the explanation done (files first, so a done explanation
    always has them). With raw=None the attribution file stored earlier is kept."""
    from mlcore.explain import METHOD_LABELS, PIXEL_LEVEL
    from mlcore.heatmap import attribution_npy, render

    overlay, heatmap = render(
        image, attribution_map, signed=True, smooth=explanation.method in PIXEL_LEVEL,
        method_label=METHOD_LABELS[explanation.method], target_class=explanation.target_class,
    )  # fmt: skip
    folder = f"explanations/{uuid.uuid4().hex}"
    names = []
    try:
        names.append(default_storage.save(f"{folder}/overlay.png", ContentFile(overlay)))
        names.append(default_storage.save(f"{folder}/heatmap.png", ContentFile(heatmap)))
        fields = {"overlay": names[0], "heatmap": names[1]}
        if raw is not None:
            names.append(default_storage.save(f"{folder}/attribution.npy", ContentFile(attribution_npy(raw))))
            fields["attribution"] = names[2]
        updated = Explanation.objects.filter(pk=explanation.pk).exclude(state=Explanation.State.DONE).update(
            state=Explanation.State.DONE, error="", convergence_delta=convergence_delta, duration_ms=seconds * 1000,
            finished_at=timezone.now(), claimed_at=None, **fields,
        )  # fmt: skip
    except BaseException:
        for name in names:
            default_storage.delete(name)
        raise
    if not updated:  # another worker finished it first: keep theirs
        for name in names:
            default_storage.delete(name)


def record_gradcam(*, image: LesionImage, model_version: ModelVersion, result, cam, seconds: float) -> Explanation:
    """Keep the Grad-CAM that the prediction pass computed. Only its raw map is written here (a few
    KB); the pictures are drawn by render_explanation_task on the default queue, so an inference
    worker (a GPU machine, say) spends no time encoding PNGs."""
    from mlcore.heatmap import attribution_npy

    class_names = list(model_version.class_names)
    target_index = class_names.index(result.label)
    key = canonical_key("gradcam", {}, target_index)
    explanation, _ = Explanation.objects.get_or_create(
        image=image, model_version=model_version, method="gradcam", params_key=key,
        defaults={"params": {}, "target_index": target_index, "target_class": result.label,
                  "state": Explanation.State.PROCESSING, "claimed_at": timezone.now()},
    )  # fmt: skip
    if explanation.state == Explanation.State.DONE:
        return explanation
    name = default_storage.save(f"explanations/{uuid.uuid4().hex}/attribution.npy", ContentFile(attribution_npy(cam)))
    Explanation.objects.filter(pk=explanation.pk).update(attribution=name, duration_ms=seconds * 1000)
    explanation_id = str(explanation.pk)
    transaction.on_commit(lambda: enqueue_render(explanation_id), robust=True)
    return explanation


def enqueue_render(explanation_id: str) -> None:
    from ..tasks import render_explanation_task

    render_explanation_task.apply_async(args=[explanation_id])


def render_explanation(*, explanation_id: str) -> str:
    """Draw the overlay and heatmap of an explanation whose raw map is stored (Grad-CAM)."""
    import numpy as np

    from mlcore.preprocessing import ImageValidationError, decode_image

    explanation = Explanation.objects.select_related("image").filter(pk=explanation_id).first()
    if explanation is None or explanation.state == Explanation.State.DONE or not explanation.attribution:
        return "skipped"
    started = time.perf_counter()
    try:
        with explanation.attribution.open("rb") as handle:
            raw = np.load(handle, allow_pickle=False).astype(np.float32)
        with explanation.image.file.open("rb") as handle:
            decoded = decode_image(
                handle.read(), max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS, max_side=DISPLAY_MAX_SIDE
            )
    except (FileNotFoundError, ImageValidationError, ValueError) as exc:
        Explanation.objects.filter(pk=explanation_id).exclude(state=Explanation.State.DONE).update(
            state=Explanation.State.FAILED,
            error=f"The explanation could not be drawn: {exc}",
            finished_at=timezone.now(),
        )
        return "failed"
    attribution_map = raw if raw.ndim == 2 else raw.sum(axis=0)
    store_result(explanation=explanation, image=decoded.image, attribution_map=attribution_map,
                 seconds=(explanation.duration_ms or 0) / 1000 + time.perf_counter() - started,
                 convergence_delta=None)  # fmt: skip
    return "done"


def request_automatic_explanations(*, image: LesionImage) -> None:
    """Queue the explanations every prediction gets (Integrated Gradients by default)."""
    for method in settings.AUTO_EXPLAIN_METHODS:
        try:
            request_explanation(image=image, method=method)
        except ExplanationRefused as exc:  # a misconfigured setting must not fail predictions
            logger.error("automatic %s explanation refused: %s", method, exc.reason)


def claim_explanation(*, explanation_id: str, worker_id: str) -> Explanation | None:
    now = timezone.now()
    stale = now - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS)
    claimable = (
        Q(state=Explanation.State.QUEUED)
        | Q(state=Explanation.State.PROCESSING, claimed_at__lt=stale)
        | Q(state=Explanation.State.PROCESSING, claimed_by=worker_id)
    )
    updated = (
        Explanation.objects.filter(pk=explanation_id)
        .filter(claimable)
        .update(state=Explanation.State.PROCESSING, claimed_at=now, claimed_by=worker_id, attempts=F("attempts") + 1)
    )
    if updated != 1:
        return None
    return Explanation.objects.select_related("image", "model_version").get(pk=explanation_id)


def compute_explanation(*, explanation_id: str, worker_id: str) -> str:
    """Returns 'done', 'failed' or 'skipped'. Bad or unreadable inputs end failed with a reason."""
    from mlcore.preprocessing import ImageValidationError, decode_image

    explanation = claim_explanation(explanation_id=explanation_id, worker_id=worker_id)
    if explanation is None:
        return "skipped"

    def fail(reason: str) -> str:
        Explanation.objects.filter(pk=explanation_id, claimed_by=worker_id).exclude(
            state=Explanation.State.DONE
        ).update(state=Explanation.State.FAILED, error=reason[:2000], finished_at=timezone.now(), claimed_at=None)
        return "failed"

    if explanation.attempts > settings.MAX_PROCESSING_ATTEMPTS:
        return fail("The explanation was started several times and never finished (the worker stopped each time).")
    try:
        explainer = explainer_for(explanation.model_version)
        with explanation.image.file.open("rb") as handle:
            decoded = decode_image(
                handle.read(), max_bytes=1 << 31, max_pixels=settings.MAX_IMAGE_PIXELS, max_side=DISPLAY_MAX_SIDE
            )
        result = explainer.explain(decoded.image, explanation.method, explanation.params, explanation.target_index)
    except FileNotFoundError:
        return fail("The stored image file is missing.")
    except ImageValidationError as exc:
        return fail(f"The stored image could not be read: {exc.message}")
    except Exception as exc:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(exc, SoftTimeLimitExceeded):
            return fail("The explanation took too long and was stopped; try fewer steps or samples.")
        logger.exception("explanation %s failed", explanation_id)
        return fail(f"The explanation could not be computed (internal error: {type(exc).__name__}).")
    store_result(explanation=explanation, image=decoded.image, attribution_map=result.map, raw=result.raw,
                 seconds=result.seconds, convergence_delta=result.convergence_delta)  # fmt: skip
    return "done"
