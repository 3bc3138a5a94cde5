"""The worker side of an upload: claim it, run the active model, record the prediction."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ..models import ImageState, LesionImage, ModelVersion, Prediction
from .images import claim_image, fail_image
from .registry import VersionCache, active_model_version, cached_weights_path

logger = logging.getLogger(__name__)


def _load_predictor(model_version: ModelVersion):
    from mlcore.inference import Predictor

    predictor = Predictor.from_checkpoint(cached_weights_path(model_version), device=settings.INFERENCE_DEVICE)
    logger.info("loaded model %s on %s", model_version.version, predictor.device)
    return predictor


predictors = VersionCache(_load_predictor)


def predictor_for(model_version: ModelVersion):
    """The process-wide Predictor of this version."""
    return predictors.get(model_version)


def record_prediction(
    *, image: LesionImage, model_version: ModelVersion, result, inference_ms: float, worker_id: str | None = None
) -> Prediction:
    """Idempotent: one Prediction per (image, model version), and the image ends done. With a
    worker id, only that worker's claim is moved to done."""
    with transaction.atomic():
        prediction, _ = Prediction.objects.update_or_create(
            image=image,
            model_version=model_version,
            defaults={
                "probability_malignant": result.probability_malignant,
                "label": result.label,
                "threshold": result.threshold,
                "probabilities": result.probabilities,
                "inference_ms": inference_ms,
            },
        )
        images = LesionImage.objects.filter(pk=image.pk).exclude(state=ImageState.DONE)
        if worker_id is not None:
            images = images.filter(state=ImageState.PROCESSING, claimed_by=worker_id)
        images.update(state=ImageState.DONE, error="", processed_at=timezone.now(), claimed_at=None)
    return prediction


class TransientError(Exception):
    """Raised for failures worth retrying (database or storage briefly unavailable)."""


class ModelUnavailable(Exception):
    """The active model cannot be loaded: an operations problem, never the image's fault."""


def process_image(*, image_id: str, worker_id: str) -> str:
    """Returns 'done', 'failed' or 'skipped' (another worker has it, or it is finished).

    Only the image's own faults fail it. A temporary error (database, storage) gives the claim back
    and raises TransientError for a bounded retry; a model that cannot be loaded gives the claim back
    and raises ModelUnavailable. Either way the image stays queued and the sweeper retries it later.
    """
    from django.db import InterfaceError, OperationalError

    from mlcore.preprocessing import ImageValidationError, decode_image

    from .images import release_image

    image = claim_image(image_id=image_id, worker_id=worker_id)
    if image is None:
        return "skipped"

    def fail(reason: str) -> str:
        fail_image(image_id=image_id, reason=reason, worker_id=worker_id)
        return "failed"

    def give_back() -> None:
        try:
            release_image(image_id=image_id, worker_id=worker_id)
        except Exception:  # the database itself is down; the sweeper recovers the claim later
            logger.warning("could not release image %s", image_id)

    if image.attempts > settings.MAX_PROCESSING_ATTEMPTS:
        return fail(
            f"Processing was started {image.attempts - 1} times and never finished (the worker stopped each "
            "time); the image may be too large or damaged. Upload it again or contact support."
        )
    model_version = active_model_version()
    if model_version is None:
        return fail("No model is active. An administrator must activate a model version.")
    try:
        predictor = predictor_for(model_version)
    except (OperationalError, InterfaceError, ConnectionError, TimeoutError) as exc:
        give_back()
        raise TransientError(str(exc)) from exc
    except Exception as exc:
        give_back()
        logger.exception("model %s cannot be loaded", model_version.version)
        raise ModelUnavailable(f"model {model_version.version} cannot be loaded: {exc}") from exc
    try:
        with image.file.open("rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        return fail("The stored image file is missing. Upload it again.")
    except (OSError, OperationalError, InterfaceError) as exc:
        give_back()
        raise TransientError(str(exc)) from exc
    try:
        decoded = decode_image(data, max_bytes=max(settings.MAX_UPLOAD_BYTES, len(data)),
                               max_pixels=settings.MAX_IMAGE_PIXELS)  # fmt: skip
        started = time.perf_counter()
        results, cams, embeddings = predictor.predict_with_gradcam([decoded.image], embeddings=True)
        result, cam = results[0], cams[0]
        inference_ms = (time.perf_counter() - started) * 1000
    except ImageValidationError as exc:
        return fail(f"The stored image could not be read: {exc.message}")
    except Exception as exc:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(exc, SoftTimeLimitExceeded):
            return fail("The model took too long on this image and was stopped.")
        logger.exception("model failed on image %s", image_id)
        return fail(
            f"The model could not process this image (internal error: {type(exc).__name__}). "
            "The team has been notified in the logs."
        )
    # The prediction is stored first: a clinician sees the risk before any heatmap is drawn.
    record_prediction(
        image=image, model_version=model_version, result=result, inference_ms=inference_ms, worker_id=worker_id
    )
    from .explanations import record_gradcam, request_automatic_explanations

    try:
        record_gradcam(image=image, model_version=model_version, result=result, cam=cam, seconds=inference_ms / 1000)
    except Exception:  # a heatmap problem must never undo a stored prediction
        logger.exception("Grad-CAM could not be stored for image %s", image_id)
    from .monitoring import record_upload_features

    try:
        record_upload_features(image=image, model_version=model_version, decoded_image=decoded.image,
                               probability=result.probability_malignant, embedding=embeddings[0])  # fmt: skip
    except Exception:  # monitoring must never undo a stored prediction
        logger.exception("drift features could not be stored for image %s", image_id)
    image.state = ImageState.DONE
    request_automatic_explanations(image=image)
    return "done"
