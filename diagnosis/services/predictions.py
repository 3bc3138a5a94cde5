"""The worker side of an upload: predictions as a kind of work for the batch engine (services.engine).
This module says only what differs for predictions: which images are claimed, which model runs them,
how their photos are decoded (services.decoding), and what is recorded per batch: the predictions (one
transaction), the Grad-CAM maps and the drift features (one INSERT each), one message to draw the
batch's Grad-CAM pictures and one per explanation batch for the automatic explanations."""

from __future__ import annotations

import logging
import time

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from mlcore.preprocessing import ImageValidationError

from .. import metrics
from ..log_context import set_image_id
from ..models import ImageState, LesionImage, ModelVersion, Prediction
from . import decoding, notify, quality
from .engine import Batch, Engine, Work
from .errors import DATABASE_ERRORS, ModelUnavailable, TransientError, bucket_errors, storage_errors
from .explanation_files import record_gradcams
from .explanations import request_automatic_explanations_many
from .images import claim_images, fail_image, release_image, release_images
from .monitoring import record_upload_features_many
from .registry import active_model_version, send_waiting_uploads
from .runtime import on_device, predictor_for
from .transactions import first_of, update_returning

logger = logging.getLogger(__name__)

__all__ = ["ModelUnavailable", "TransientError", "predictor_for", "process_image", "process_images"]


def warm_up_worker(consumed_queues) -> float | None:
    """At an inference worker process's start: load the active model and run a batch of 1 and one of
    INFERENCE_BATCH_SIZE, so that the first upload does not wait for the weights, CUDA's context or
    cuDNN's algorithm search. Never stops the worker from starting. Returns the seconds, or None."""
    if not settings.INFERENCE_WARMUP or "inference" not in set(consumed_queues):
        return None
    try:
        # torch: loaded only in the worker processes that run a model.
        from mlcore.inference import warm_up

        version = active_model_version()
        if version is None:
            return None
        predictor = predictor_for(version)
        decoding._remember(predictor)  # so that the very first upload can be decoded ahead
        # On the device thread, where the model was loaded and every batch runs (runtime.device_thread).
        seconds = on_device(warm_up, predictor, (1, settings.INFERENCE_BATCH_SIZE))
        decoding.tensor_decoding(predictor)  # probes nvJPEG once, on a GPU
        logger.info("warmed up model %s on %s in %.2f s", version.version, predictor.device, seconds)
        return seconds
    except Exception as exc:  # the first task loads the model instead, and reports any real problem
        logger.warning("warm-up skipped: %s", exc)
        return None


def record_prediction(
    *, image: LesionImage, model_version: ModelVersion, result, inference_ms: float, worker_id: str | None = None
) -> Prediction | None:
    """Idempotent: one Prediction per (image, model version), and the image ends done. With a
    worker id, only while that worker still holds the claim (the row is locked while it checks): a
    worker whose claim was taken over writes nothing and gets None."""
    return record_predictions(images=[image], model_version=model_version, results=[result],
                              inference_ms=inference_ms, worker_id=worker_id)[0]  # fmt: skip


def record_predictions(
    *, images: list[LesionImage], model_version: ModelVersion, results: list, inference_ms: float,
    worker_id: str | None = None, decisions: list | None = None,
) -> list[Prediction | None]:  # fmt: skip
    """record_prediction for a batch, in one transaction of two statements whatever its size (three
    when some claims were taken over). Returns, per image, its Prediction or None where the claim is
    no longer this worker's. `decisions`: the quality gate's (mlcore.gate.Decision) per image; without
    them, the photos are judged by the model version's gate on the band and OOD alone."""
    if decisions is None:
        decisions = quality.decisions_for(images, [None] * len(images), results, None, model_version)
    now = timezone.now()
    ids = [image.pk for image in images]
    with transaction.atomic():
        # One statement checks the claims, locks the rows and marks the images done; an image whose
        # claim was taken over is left alone. Then one INSERT ... ON CONFLICT stores the predictions
        # (or replaces earlier ones of this model version).
        if worker_id is None:
            LesionImage.objects.filter(pk__in=ids).exclude(state=ImageState.DONE).update(
                state=ImageState.DONE, error="", processed_at=now, claimed_at=None
            )
            ours = set(ids)
        else:
            marked = LesionImage.objects.filter(pk__in=ids, state=ImageState.PROCESSING, claimed_by=worker_id).update(
                state=ImageState.DONE, error="", processed_at=now, claimed_at=None
            )
            ours = set(ids)
            if marked != len(set(ids)):  # rare: tell ours (marked by this very statement) from the others
                ours = set(LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE, claimed_by=worker_id,
                                                      processed_at=now).values_list("pk", flat=True))  # fmt: skip
        rows = [
            Prediction(image=image, model_version=model_version, probability_malignant=result.probability_malignant,
                       label=result.label, threshold=result.threshold, probabilities=result.probabilities,
                       inference_ms=inference_ms, decision=decision.decision, assessable=decision.assessable,
                       quality=decision.quality, ood_score=decision.ood_score)
            for image, result, decision in zip(images, results, decisions, strict=True) if image.pk in ours
        ]  # fmt: skip
        stored = iter(Prediction.objects.bulk_create(
            rows, update_conflicts=True, unique_fields=["image", "model_version"], update_fields=PREDICTION_FIELDS,
        ) if rows else [])  # fmt: skip
        notify.changed([row.image_id for row in rows], ImageState.DONE)  # once committed
    return [next(stored) if image.pk in ours else None for image in images]


PREDICTION_FIELDS = [
    "probability_malignant",
    "label",
    "threshold",
    "probabilities",
    "inference_ms",
    "decision",
    "assessable",
    "quality",
    "ood_score",
]


def claim_queued(*, image_ids: list[str], worker_id: str) -> list[LesionImage]:
    """Claim those of `image_ids` still queued and never attempted, in one UPDATE that returns them,
    oldest first. Two workers claiming at once cannot take the same image: the UPDATE checks the state
    again on each row it locks."""
    if not image_ids:
        return []
    return _claim(LesionImage.objects.filter(pk__in=image_ids, state=ImageState.QUEUED, attempts=0), worker_id)


def claim_oldest_queued(
    *, limit: int, worker_id: str, exclude: list[str] = (), full: bool = False
) -> list[LesionImage]:
    """Claim up to `limit` queued images, oldest first, in one statement: the batch a worker takes with
    its own image, or its next batch. Only images never attempted: one that was in a batch when its
    worker died goes alone, so a photo that kills workers cannot use up its batch-mates' attempts.
    Two workers claiming at once never take the same image: the UPDATE checks the state again on each
    row it locks (a worker that waited for another's rows gets fewer). No SKIP LOCKED in the subquery:
    PostgreSQL may evaluate it again for each row, and skipping the rows this very UPDATE has locked would
    then claim more than `limit`."""
    if limit <= 0:
        return []
    waiting = LesionImage.objects.filter(state=ImageState.QUEUED, attempts=0).exclude(pk__in=list(exclude))
    if full and waiting.order_by()[:limit].count() < limit:  # with `full`: a whole batch or nothing
        return []
    oldest = first_of(waiting.order_by("enqueued_at"), limit)
    return _claim(oldest.filter(state=ImageState.QUEUED, attempts=0), worker_id)


def _claim(queryset, worker_id: str) -> list[LesionImage]:
    now = timezone.now()
    claimed = update_returning(queryset, state=ImageState.PROCESSING, claimed_at=now, claimed_by=worker_id,
                               attempts=F("attempts") + 1)  # fmt: skip
    notify.changed([image.pk for image in claimed], ImageState.PROCESSING)
    return sorted(claimed, key=lambda image: (image.enqueued_at is None, image.enqueued_at or now))


class PredictionWork(Work):
    label = "image"
    exhausted = (
        "Processing was started {attempts} times and never finished (the worker stopped each time); the image "
        "may be too large or damaged. Upload it again or contact support."
    )
    too_long = "The model took too long on this image and was stopped."

    def __init__(self, ahead=None) -> None:
        self.ahead = ahead  # decode_ahead's early decode of the task's own photo, if any

    def claim(self, ids, worker_id):
        return claim_images(image_ids=ids, worker_id=worker_id)

    def gather(self, first, *, exclude, limit, worker_id, full=False):
        return claim_oldest_queued(limit=limit, worker_id=worker_id, exclude=exclude, full=full)

    def batch_size(self, first) -> int:
        return max(1, settings.INFERENCE_BATCH_SIZE)

    def fail(self, item_id, reason, worker_id):
        fail_image(image_id=item_id, reason=reason, worker_id=worker_id)

    def release(self, item_id, worker_id):
        release_image(image_id=item_id, worker_id=worker_id)

    def release_all(self, worker_id):
        release_images(worker_id=worker_id)

    def open(self, engine: Engine, batch: Batch):
        """The active model when the batch is claimed; the batch keeps it to the end."""
        if batch is not None and engine.batches == 1:
            set_image_id(engine.own[0])  # this task's log lines are about its own image
        model_version = active_model_version()
        ids = [str(image.pk) for image in batch.items]
        if model_version is None:
            # No model yet (the demo's is still training, or none was activated): the photos wait, queued,
            # rather than fail. Activating a model sends them again (registry.activate_model); the sweeper
            # is the fallback.
            for image_id in ids:
                engine.give_back(image_id)
            logger.info("no model is active: %d image(s) stay queued until one is activated", len(ids))
            if active_model_version() is not None:  # activated meanwhile: it may have sent the others before these
                send_waiting_uploads()
            return None
        try:
            predictor = predictor_for(model_version)
        except Exception as exc:
            for image_id in ids:
                engine.give_back(image_id)
            if isinstance(exc, (*DATABASE_ERRORS, ConnectionError, TimeoutError, *bucket_errors())):
                raise TransientError(str(exc)) from exc
            logger.exception("model %s cannot be loaded", model_version.version)
            raise ModelUnavailable(f"model {model_version.version} cannot be loaded: {exc}") from exc
        decoding._remember(predictor)
        batch.extra["model_version"] = model_version
        return predictor

    def prepare(self, engine: Engine, batch: Batch):
        early = None
        if engine.batches == 1 and batch.items and str(batch.items[0].pk) == engine.own[0]:
            early = decoding._start_early(batch.items[0], self.ahead)
        return decoding._prepare_all(batch.items, batch.runner, early=early)

    def read_fault(self, exc):
        if isinstance(exc, FileNotFoundError):
            return "The stored image file is missing. Upload it again."
        if isinstance(exc, ImageValidationError):
            return f"The photo could not be decoded in full: {exc.message}"
        if isinstance(exc, storage_errors()):
            return None
        raise exc

    def run(self, predictor, group):
        import torch  # loaded with the model, in the worker only

        started = time.perf_counter()
        # nvJPEG's tensors are on the GPU, Pillow's fallbacks on the CPU: one device for the batch
        inputs = torch.stack([prepared.tensor.to(predictor.device) for _, prepared in group])
        # Grad-CAM at the feature map's size (7 x 7): a few hundred bytes to keep in the row; the render
        # task upsamples it to the input size (mlcore.heatmap.upsample_bilinear, without torch) when it
        # draws the pictures.
        augment = quality.augmentation_enabled(predictor.device)
        found = predictor.predict_with_gradcam_tensors(inputs, embeddings=True, upsample=False, augment=augment)
        results, cams, embeddings = found[:3]
        return (
            results,
            cams,
            embeddings,
            (time.perf_counter() - started) * 1000 / len(group),
            found[3] if augment else None,
        )

    def run_failed(self, exc):
        return (f"The model could not process this image (internal error: {type(exc).__name__}). The team has "
                "been notified in the logs.")  # fmt: skip

    def record(self, engine: Engine, batch: Batch, group, outputs) -> None:
        results, cams, embeddings, inference_ms, augmented = outputs
        recorded = record_batch(group, results=results, cams=cams, embeddings=embeddings, inference_ms=inference_ms,
                                model_version=batch.extra["model_version"], worker_id=engine.worker_id,
                                augmented=augmented)  # fmt: skip
        for (image, _), done in zip(group, recorded, strict=True):
            engine.outcomes[str(image.pk)] = "done" if done else "skipped"


def record_batch(group, *, results, cams, embeddings, inference_ms, model_version, worker_id,
                 augmented=None) -> list[bool]:  # fmt: skip
    """Store a batch's predictions with their decisions (the quality gate, one transaction), then its
    Grad-CAM maps and drift features (one INSERT each), and request its pictures and automatic
    explanations (one message each per batch). Per image, False when this worker's claim was taken
    over meanwhile: the new owner records it."""
    images = [image for image, _ in group]
    decisions = quality.decisions_for(images, [prepared.quality for _, prepared in group], list(results), embeddings,
                                      model_version, augmented)  # fmt: skip
    # The predictions are stored first: a clinician sees the risk before any heatmap is drawn.
    predictions = record_predictions(images=images, model_version=model_version, results=list(results),
                                     inference_ms=inference_ms, worker_id=worker_id, decisions=decisions)  # fmt: skip
    kept = [index for index, prediction in enumerate(predictions) if prediction is not None]
    for index in kept:
        metrics.record_prediction(label=results[index].label, model_version=model_version.version)
        metrics.record_decision(decision=decisions[index].decision, model_version=model_version.version)
        images[index].state = ImageState.DONE
    # A heatmap or monitoring problem must never undo a stored prediction: each logs and moves on.
    record_gradcams(
        [(images[i], results[i], cams[i]) for i in kept], model_version=model_version, seconds=inference_ms / 1000
    )
    record_upload_features_many(
        [(images[i], group[i][1].drift_source(), results[i].probability_malignant, embeddings[i]) for i in kept],
        model_version=model_version,
    )
    request_automatic_explanations_many([(images[i], results[i]) for i in kept], model_version=model_version)
    return [prediction is not None for prediction in predictions]


def process_image(*, image_id: str, worker_id: str) -> str:
    """Returns 'done', 'failed', 'skipped' (another worker has it, or it is finished) or 'released' (given
    back to the queue: no model is active yet, or a temporary error below).

    Only the image's own faults fail it. A temporary error (database, storage) gives the claim back
    and raises TransientError for a bounded retry; a model that cannot be loaded gives the claim back
    and raises ModelUnavailable. Either way the image stays queued and the sweeper retries it later.
    """
    return process_images(image_ids=[image_id], worker_id=worker_id)[image_id]


def process_images(
    *, image_ids: list[str], worker_id: str, gather: int = 0, gather_if_finished: bool = False, ahead=None
) -> dict[str, str]:
    """Claim the images, decode them in parallel, predict them as one batch, record each (the engine).

    With gather > 0, and only once the first image is claimed on its first attempt, other never-attempted
    queued images join it (up to INFERENCE_BATCH_SIZE), and further batches follow while photos are
    queued (pipelined, up to PIPELINE_BATCHES): a message that finds its image already finished does no
    more work, unless gather_if_finished (coalesced wake-ups: the message may stand for other uploads).
    A database error anywhere gives back every claim of this call that has no outcome yet and becomes a
    TransientError. `ahead`: decode_ahead's early decode of the first image, if any."""
    engine = Engine(PredictionWork(ahead), ids=list(image_ids), worker_id=worker_id, gather=gather,
                    pipeline=gather > 0, gather_if_finished=gather_if_finished)  # fmt: skip
    with decoding.working():
        try:
            return engine.run()
        finally:
            decoding._settle_ahead(ahead)
