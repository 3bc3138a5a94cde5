"""The worker side of an upload: claim it, run the active model, record the prediction."""

from __future__ import annotations

import logging
import re
import threading
import time
from concurrent.futures import Future

from django.conf import settings
from django.db import transaction
from django.db.models import F
from django.utils import timezone

from webapp.request_id import set_image_id

from .. import metrics
from ..models import ImageState, LesionImage, ModelVersion, Prediction
from .images import claim_image, fail_image
from .registry import VersionCache, active_model_version, cached_weights_path
from .transactions import update_returning

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


def warm_up_worker(consumed_queues) -> float | None:
    """At an inference worker process's start: load the active model and run a batch of 1 and one of
    INFERENCE_BATCH_SIZE, so that the first upload does not wait for the weights, CUDA's context or
    cuDNN's algorithm search. Never stops the worker from starting. Returns the seconds, or None."""
    from mlcore.inference import warm_up

    if not settings.INFERENCE_WARMUP or "inference" not in set(consumed_queues):
        return None
    try:
        version = active_model_version()
        if version is None:
            return None
        predictor = predictor_for(version)
        _remember(predictor)  # so that the very first upload can be decoded ahead (decode_ahead)
        seconds = warm_up(predictor, (1, settings.INFERENCE_BATCH_SIZE))
        tensor_decoding(predictor)  # probes nvJPEG once, on a GPU
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
    worker_id: str | None = None,
) -> list[Prediction | None]:  # fmt: skip
    """record_prediction for a batch, in one transaction of two statements whatever its size (three
    when some claims were taken over). Returns, per image, its Prediction or None where the claim is
    no longer this worker's."""
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
                       inference_ms=inference_ms)
            for image, result in zip(images, results, strict=True) if image.pk in ours
        ]  # fmt: skip
        stored = iter(Prediction.objects.bulk_create(
            rows, update_conflicts=True, unique_fields=["image", "model_version"], update_fields=PREDICTION_FIELDS,
        ) if rows else [])  # fmt: skip
    return [next(stored) if image.pk in ours else None for image in images]


PREDICTION_FIELDS = ["probability_malignant", "label", "threshold", "probabilities", "inference_ms"]


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
    return process_images(image_ids=[image_id], worker_id=worker_id)[image_id]


def queued_candidates(*, exclude: list[str], limit: int) -> list[str]:
    """Up to `limit` other queued images, oldest first: the batch a worker takes with its own image.
    Only images never attempted: one that was in a batch when its worker died goes alone, so a photo
    that kills workers cannot use up its batch-mates' attempts."""
    if limit <= 0:
        return []
    return [str(pk) for pk in LesionImage.objects.filter(state=ImageState.QUEUED, attempts=0).exclude(pk__in=exclude)
            .order_by("enqueued_at").values_list("pk", flat=True)[:limit]]  # fmt: skip


def claim_queued(*, image_ids: list[str], worker_id: str) -> list[LesionImage]:
    """Claim those of `image_ids` still queued and never attempted for this worker, in one UPDATE that
    returns them (transactions.update_returning), oldest first. Their own messages arrive later and find them finished
    (a no-op claim). Two workers gathering at once cannot take the same image: the UPDATE checks the
    state again on each row it locks."""
    if not image_ids:
        return []
    now = timezone.now()
    claimed = update_returning(
        LesionImage.objects.filter(pk__in=image_ids, state=ImageState.QUEUED, attempts=0),
        state=ImageState.PROCESSING, claimed_at=now, claimed_by=worker_id, attempts=F("attempts") + 1,
    )  # fmt: skip
    return sorted(claimed, key=lambda image: (image.enqueued_at is None, image.enqueued_at or now))


_decoders = None


def _decoder_pool():
    """Threads that read and decode a batch's photos (Pillow releases the GIL), DECODE_THREADS of them;
    one pool per process, for predictions and explanations alike."""
    global _decoders
    if _decoders is None:
        from concurrent.futures import ThreadPoolExecutor

        _decoders = ThreadPoolExecutor(max_workers=max(1, settings.DECODE_THREADS), thread_name_prefix="decode")
    return _decoders


class Prepared:
    """One photo ready for the model: its input tensor and the picture its drift features are taken from."""

    __slots__ = ("image", "tensor")

    def __init__(self, image, tensor) -> None:
        self.image, self.tensor = image, tensor


def _read(image: LesionImage) -> bytes:
    with image.file.open("rb") as handle:
        return handle.read()


def _decode_and_prepare(data: bytes, spec, max_side: int) -> Prepared:
    """The upload's full decode (damage the web tier's header check could not see fails the image), in
    Pillow's draft mode for large JPEGs, then the model's transform. Pillow and the transform release
    the GIL, so the pool's threads do this in parallel."""
    from mlcore.preprocessing import decode_image, to_tensor

    decoded = decode_image(data, max_bytes=max(settings.MAX_UPLOAD_BYTES, len(data)),
                           max_pixels=settings.MAX_IMAGE_PIXELS, max_side=max_side, copy_pixels=False)  # fmt: skip
    return Prepared(decoded.image, to_tensor(decoded.image, spec))


def _read_and_prepare(image: LesionImage, spec, max_side: int) -> Prepared:
    return _decode_and_prepare(_read(image), spec, max_side)


def tensor_decoding(predictor) -> bool:
    """INFERENCE_DECODE: 'auto' decodes plain JPEGs with torchvision on the GPU (nvJPEG) when the model
    is on one that can, 'torchvision' always (on the model's device, the CPU included), 'pillow' never."""
    from mlcore import tensor_decode

    choice = settings.INFERENCE_DECODE
    if choice == "auto" and predictor.device.type == "cuda":
        use = getattr(predictor, "_tensor_decode_available", None)
        if use is None:
            use = predictor._tensor_decode_available = tensor_decode.available(predictor.device)
    else:
        use = choice == "torchvision"
    if getattr(predictor, "_decode_logged", None) != use:
        predictor._decode_logged = use
        logger.info("JPEG decoding for the model on %s: %s (INFERENCE_DECODE=%s)", predictor.device,
                    "torchvision" if use else "Pillow", choice)  # fmt: skip
    return use


_last_predictor = None  # a weak reference to the model of this process's last batch (see _start_early)
_finished_at: float | None = None  # time.monotonic() when this process last finished a batch
_in_flight = 0  # batches this process is working on now (a threads pool runs several)
_in_flight_lock = threading.Lock()
# The names images._store gives uploaded photos (a UUID's hex; the storage may add a suffix).
UPLOAD_NAME = re.compile(r"images/[0-9a-f]{32}(_[A-Za-z0-9]{7})?\.[a-z0-9]{3,4}")


def _remember(predictor) -> None:
    """Weakly: a model replaced in the cache is freed as before, never kept alive for an early decode."""
    import weakref

    global _last_predictor
    _last_predictor = weakref.ref(predictor)


def _last_model():
    """The model of this process's last batch, unless it decodes on the GPU; else None."""
    predictor = _last_predictor() if _last_predictor is not None else None
    return None if predictor is None or tensor_decoding(predictor) else predictor


def decode_ahead(name: str):
    """On an idle worker process (no batch in progress, none finished in the last
    INFERENCE_DECODE_AHEAD_IDLE_MS), start reading and decoding a task's own photo by its stored name,
    from the message, before the task has even claimed it: the claim, the look for other queued photos
    and the read of the active model (some milliseconds of database round trips) then overlap the
    decode. Never on a busy process, whose messages mostly find their photo already taken into another
    batch: there the decode would be wasted. Only a name of an uploaded photo is read.

    Returns (predictor, file name, future), or None. _start_early uses it only if the claimed image
    has this very file and is on its first attempt, and _prepare_all only if that model is still the
    one to run; process_images waits for an unused one before it returns (_settle_ahead). The task
    calls this only on a message's first delivery, and only with a broker that marks redeliveries
    (decode_ahead_supported): a photo that killed the worker is never read ahead again."""
    from mlcore.inference import decode_side

    idle = settings.INFERENCE_DECODE_AHEAD_IDLE_MS / 1000
    if idle < 0 or not UPLOAD_NAME.fullmatch(name) or _in_flight:
        return None
    if _finished_at is not None and time.monotonic() - _finished_at < idle:
        return None
    predictor = _last_model()
    if predictor is None:
        return None
    max_side = decode_side(predictor.meta.input_size)
    return predictor, name, _decoder_pool().submit(_read_name_and_prepare, name, predictor.spec, max_side)


def decode_ahead_supported() -> bool:
    """Whether the broker marks a redelivered message (Redis and AMQP do; Celery cannot see kombu's
    flag on the filesystem transport of the embedded default), which decode_ahead needs."""
    return settings.CELERY_BROKER_URL.split(":", 1)[0].lower() in ("redis", "rediss", "amqp", "amqps", "pyamqp")


def _settle_ahead(ahead) -> None:
    """An early decode from the message that was not used (the claim failed, another file, another
    model): cancel it, or wait until it ends, so that a photo that kills the process does so while
    the message that named it is still unacknowledged, and is not blamed on the next task's batch."""
    if ahead is None:
        return
    from concurrent.futures import wait

    future = ahead[2]
    if not future.cancel():
        wait([future])


def _read_name_and_prepare(name: str, spec, max_side: int) -> Prepared:
    from django.core.files.storage import default_storage

    with default_storage.open(name, "rb") as handle:
        return _decode_and_prepare(handle.read(), spec, max_side)


def _start_early(image: LesionImage, ahead=None):
    """Start reading and decoding a task's own photo for the model of the last batch, while the task
    gathers others and reads which model is active (a few milliseconds of database round trips that
    the photo's decode now overlaps), unless decode_ahead already started it from the message.
    _prepare_all uses it only if that model is still the one to run. Returns (predictor, image id,
    future), or None (no model used yet, or decoding on the GPU)."""
    from mlcore.inference import decode_side

    if image.attempts != 1:
        return None  # never for a photo on a later attempt: its worker may have died decoding it
    if ahead is not None and ahead[1] == image.file.name:
        logger.info("image %s: its photo was being decoded before the claim", image.pk)
        return ahead[0], image.pk, ahead[2]
    predictor = _last_model()
    if predictor is None:
        return None
    future = _decoder_pool().submit(_read_and_prepare, image, predictor.spec, decode_side(predictor.meta.input_size))
    return predictor, image.pk, future


def _prepare_all(claimed: list[LesionImage], predictor, early=None) -> list[Future]:
    """One future per image: its Prepared, or the exception reading or decoding it raised."""
    from mlcore.drift import FEATURE_SIZE
    from mlcore.inference import decode_side

    max_side = decode_side(predictor.meta.input_size)
    if not tensor_decoding(predictor):
        started = {early[1]: early[2]} if early is not None and early[0] is predictor else {}
        if len(claimed) == 1 and not started:  # one image: in this thread, no hand-off
            return [_done_future(_read_and_prepare, claimed[0], predictor.spec, max_side)]
        return [started.get(image.pk) or _decoder_pool().submit(_read_and_prepare, image, predictor.spec, max_side)
                for image in claimed]  # fmt: skip

    from mlcore import tensor_decode

    reads = [_decoder_pool().submit(_read, image) for image in claimed]
    futures: list[Future | None] = [None] * len(claimed)
    batch: list[tuple[int, bytes, int]] = []
    for index, read in enumerate(reads):
        if read.exception() is not None:
            futures[index] = read
            continue
        data = read.result()
        ok, orientation = tensor_decode.eligible(data, max_pixels=settings.MAX_IMAGE_PIXELS)
        if ok:
            batch.append((index, data, orientation))
        else:
            futures[index] = _decoder_pool().submit(_decode_and_prepare, data, predictor.spec, max_side)
    if batch:
        try:
            results = tensor_decode.decode_batch([data for _, data, _ in batch], [o for _, _, o in batch],
                                                 spec=predictor.spec, feature_size=FEATURE_SIZE,
                                                 device=predictor.device)  # fmt: skip
        except Exception as exc:  # out of GPU memory, say: Pillow decodes the whole batch instead
            logger.warning("batch decoding on %s failed (%s); decoding with Pillow", predictor.device, exc)
            results = [exc] * len(batch)
        for (index, data, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):  # Pillow decides, and says in words what is wrong
                futures[index] = _decoder_pool().submit(_decode_and_prepare, data, predictor.spec, max_side)
            else:
                futures[index] = _done_future(lambda prepared: prepared, Prepared(result.thumbnail, result.tensor))
    return futures  # type: ignore[return-value]


def process_images(
    *, image_ids: list[str], worker_id: str, gather: int = 0, gather_if_finished: bool = False, ahead=None
) -> dict[str, str]:
    """See _process_images. With gather > 0, and only once the first image is claimed on its first
    attempt, up to `gather` other never-attempted queued images join it (claim_queued): a message
    that finds its image already finished does no more work, unless gather_if_finished (coalesced
    wake-ups, services.wakeups: the message may stand for other uploads too). A database error
    anywhere gives back every claim of this call that has no outcome yet and becomes a
    TransientError, for the task's bounded retry. `ahead`: decode_ahead's early decode of the first
    image, if any."""
    from django.db import InterfaceError, OperationalError

    global _finished_at, _in_flight
    outcomes: dict[str, str] = {}
    image_ids = list(image_ids)  # grows with the gathered images, so all of them can be given back
    with _in_flight_lock:
        _in_flight += 1
    try:
        return _process_images(image_ids=image_ids, worker_id=worker_id, outcomes=outcomes, gather=gather,
                               gather_if_finished=gather_if_finished, ahead=ahead)  # fmt: skip
    except (OperationalError, InterfaceError) as exc:
        from .images import release_image

        release_unfinished(image_ids, outcomes, lambda image_id: release_image(image_id=image_id, worker_id=worker_id))
        raise TransientError(str(exc)) from exc
    finally:
        _settle_ahead(ahead)
        with _in_flight_lock:
            _in_flight -= 1
            _finished_at = time.monotonic()


def release_unfinished(ids: list[str], outcomes: dict[str, str], release) -> None:
    """After a database error: give back every claim of a batch that has no outcome yet (images or
    explanations alike), so they wait for their own messages; if the database is still down, the
    sweeper recovers the claims later."""
    for item_id in ids:
        if item_id not in outcomes:
            try:
                release(item_id)
            except Exception:
                logger.warning("could not release %s", item_id)


def bucket_errors() -> tuple[type[Exception], ...]:
    """With STORAGE_BACKEND=s3, the bucket unreachable, slow or refusing: never the image's fault (a
    missing object is a FileNotFoundError). Empty where botocore is not installed."""
    try:
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


def _process_images(
    *, image_ids: list[str], worker_id: str, outcomes: dict[str, str], gather: int, gather_if_finished: bool = False,
    ahead=None,
) -> dict[str, str]:  # fmt: skip
    """Claim each image, decode them in parallel, predict them as one batch, record each.

    The first image is the one this task was sent for: a temporary error on it raises (TransientError,
    ModelUnavailable) for the task's bounded retry, after the others have been handled; the others'
    temporary errors give their claims back for their own messages. One image's fault fails only it.
    """
    from django.db import InterfaceError, OperationalError

    from mlcore.preprocessing import ImageValidationError

    from .images import release_image

    own = image_ids[0]
    set_image_id(own)  # this task's log lines are about its own image (a gathered one's id is in the text)
    deferred: Exception | None = None

    def fail(image_id: str, reason: str) -> None:
        fail_image(image_id=image_id, reason=reason, worker_id=worker_id)
        outcomes[image_id] = "failed"

    def give_back(image_id: str) -> None:
        try:
            release_image(image_id=image_id, worker_id=worker_id)
        except Exception:  # the database itself is down; the sweeper recovers the claim later
            logger.warning("could not release image %s", image_id)
        outcomes[image_id] = "released"

    claimed: list[LesionImage] = []
    candidates: list[tuple[str, LesionImage | None]] = []
    requested = list(image_ids)
    early = None
    for image_id in requested:
        image = claim_image(image_id=image_id, worker_id=worker_id)
        candidates.append((image_id, image))
        if image_id == own and image is not None:
            early = _start_early(image, ahead)
        fresh = image.attempts == 1 if image is not None else gather_if_finished
        if image_id == own and gather > 0 and fresh:
            # Their ids join image_ids before they are claimed, so that a database error from here on
            # gives their claims back too (process_images).
            others = queued_candidates(exclude=requested, limit=gather)
            image_ids += others
            gathered = claim_queued(image_ids=others, worker_id=worker_id)
            candidates += [(str(other.pk), other) for other in gathered]
    for image_id, image in candidates:
        if image is None:
            outcomes[image_id] = "skipped"
        elif image.attempts > settings.MAX_PROCESSING_ATTEMPTS:
            fail(image_id, f"Processing was started {image.attempts - 1} times and never finished (the worker "
                           "stopped each time); the image may be too large or damaged. Upload it again or contact "
                           "support.")  # fmt: skip
        else:
            claimed.append(image)
    if not claimed:
        return outcomes
    model_version = active_model_version()
    if model_version is None:
        for image in claimed:
            fail(str(image.pk), "No model is active. An administrator must activate a model version.")
        return outcomes
    try:
        predictor = predictor_for(model_version)
        _remember(predictor)
    except Exception as exc:
        for image in claimed:
            give_back(str(image.pk))
        if isinstance(exc, (OperationalError, InterfaceError, ConnectionError, TimeoutError, *bucket_errors())):
            raise TransientError(str(exc)) from exc
        logger.exception("model %s cannot be loaded", model_version.version)
        raise ModelUnavailable(f"model {model_version.version} cannot be loaded: {exc}") from exc

    # Read, decode and preprocess in parallel (on the GPU where it pays), then one forward pass.
    jobs = _prepare_all(claimed, predictor, early=early)
    ready: list[tuple[LesionImage, Prepared]] = []
    for image, job in zip(claimed, jobs, strict=True):
        image_id = str(image.pk)
        try:
            ready.append((image, job.result()))
        except FileNotFoundError:
            fail(image_id, "The stored image file is missing. Upload it again.")
        except ImageValidationError as exc:
            fail(image_id, f"The photo could not be decoded in full: {exc.message}")
        except (OSError, OperationalError, InterfaceError, *bucket_errors()) as exc:
            give_back(image_id)
            if image_id == own:
                deferred = TransientError(str(exc))
    if ready:
        _predict_and_record(ready, model_version=model_version, predictor=predictor, worker_id=worker_id,
                            outcomes=outcomes, fail=fail)  # fmt: skip
    if deferred is not None:
        raise deferred
    return outcomes


def _done_future(function, *args) -> Future:
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future


def _predict_and_record(ready, *, model_version, predictor, worker_id, outcomes, fail) -> None:
    import torch
    from celery.exceptions import SoftTimeLimitExceeded

    def attempt(batch):
        try:
            started = time.perf_counter()
            # nvJPEG's tensors are on the GPU, Pillow's fallbacks on the CPU: one device for the batch
            inputs = torch.stack([prepared.tensor.to(predictor.device) for _, prepared in batch])
            results, cams, embeddings = predictor.predict_with_gradcam_tensors(inputs, embeddings=True)
            return results, cams, embeddings, (time.perf_counter() - started) * 1000 / len(batch)
        except SoftTimeLimitExceeded:
            raise
        except Exception as exc:
            logger.exception("the model failed on a batch of %d (first image %s)", len(batch), batch[0][0].pk)
            return exc

    try:
        groups, outputs = [ready], [attempt(ready)]
        if isinstance(outputs[0], Exception) and len(ready) > 1:
            # One image broke the batch: run them one by one, so that only that one fails.
            groups = [[item] for item in ready]
            outputs = [attempt(group) for group in groups]
    except SoftTimeLimitExceeded:
        for image, _ in ready:
            if str(image.pk) not in outcomes:
                fail(str(image.pk), "The model took too long on this image and was stopped.")
        return
    for group, output in zip(groups, outputs, strict=True):
        if isinstance(output, Exception):
            fail(str(group[0][0].pk), f"The model could not process this image (internal error: "
                                      f"{type(output).__name__}). The team has been notified in the logs.")  # fmt: skip
            continue
        results, cams, embeddings, per_image_ms = output
        recorded = _record_group(group, results=results, cams=cams, embeddings=embeddings, inference_ms=per_image_ms,
                                 model_version=model_version, worker_id=worker_id)  # fmt: skip
        for (image, _), done in zip(group, recorded, strict=True):
            outcomes[str(image.pk)] = "done" if done else "skipped"


def _record_group(group, *, results, cams, embeddings, inference_ms, model_version, worker_id) -> list[bool]:
    """Store a batch's predictions (one transaction), then its Grad-CAM maps and drift features (one
    INSERT each for the batch). Per image, False when this worker's claim was taken over meanwhile:
    the new owner records it."""
    from .explanations import record_gradcams, request_automatic_explanations
    from .monitoring import record_upload_features_many

    images = [image for image, _ in group]
    # The predictions are stored first: a clinician sees the risk before any heatmap is drawn.
    predictions = record_predictions(images=images, model_version=model_version, results=list(results),
                                     inference_ms=inference_ms, worker_id=worker_id)  # fmt: skip
    kept = [index for index, prediction in enumerate(predictions) if prediction is not None]
    for index in kept:
        metrics.record_prediction(label=results[index].label, model_version=model_version.version)
    # A heatmap or monitoring problem must never undo a stored prediction: each logs and moves on.
    record_gradcams(
        [(images[i], results[i], cams[i]) for i in kept], model_version=model_version, seconds=inference_ms / 1000
    )
    record_upload_features_many(
        [(images[i], group[i][1].image, results[i].probability_malignant, embeddings[i]) for i in kept],
        model_version=model_version,
    )
    for index in kept:
        images[index].state = ImageState.DONE
        request_automatic_explanations(image=images[index])
    return [prediction is not None for prediction in predictions]
