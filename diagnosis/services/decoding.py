"""Reading and decoding a batch's photos for the model: in the decode threads with Pillow, or on the GPU
with torchvision (nvJPEG) where it pays; and the early start of a task's own photo, before it is even
claimed (decode_ahead) or while the rest of its batch is gathered (_start_early)."""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
import weakref
from concurrent.futures import Future, wait

from django.conf import settings
from django.core.files.storage import default_storage

from mlcore.drift import FEATURE_SIZE, feature_thumbnail, image_features
from mlcore.preprocessing import decode_image, to_tensor
from mlcore.quality import measure

from ..models import LesionImage
from .engine import done_future
from .runtime import decoder_pool, on_device
from .subgroup_monitoring import skin_tone_values

logger = logging.getLogger(__name__)


class Prepared:
    """One photo ready for the model: its input tensor, its photo-quality measures (mlcore.quality, always
    measured in the decode step: the decision stored with the prediction needs them), and its drift image
    features (measured in the decode thread when the photo is decoded as part of a batch) or else the
    picture they are measured on after its prediction is stored."""

    __slots__ = ("features", "image", "quality", "tensor")

    def __init__(self, image, tensor, features: dict | None = None, quality: dict | None = None) -> None:
        self.image, self.tensor, self.features, self.quality = image, tensor, features, quality

    def drift_source(self):
        """What services.monitoring measures: the features, or the picture."""
        return self.features if self.features is not None else self.image


def _read(image: LesionImage) -> bytes:
    with image.file.open("rb") as handle:
        return handle.read()


def _decode_and_prepare(data: bytes, spec, max_side: int, features: bool = False) -> Prepared:
    """The upload's full decode (damage the web tier's header check could not see fails the image), in
    Pillow's draft mode for large JPEGs, then the model's transform, and with `features` the drift image
    features (mlcore.drift.image_features, with the skin tone: services.subgroup_monitoring). Pillow, the
    transform and NumPy release the GIL, so the pool's threads do this in parallel, and the task's own
    thread (which records each batch while the next runs on the device) does not. A lone photo leaves its
    features for after its prediction is stored: they are not on the way to the result."""
    decoded = decode_image(data, max_bytes=max(settings.MAX_UPLOAD_BYTES, len(data)),
                           max_pixels=settings.MAX_IMAGE_PIXELS, max_side=max_side, copy_pixels=False)  # fmt: skip
    tensor = to_tensor(decoded.image, spec)
    thumbnail = feature_thumbnail(decoded.image)  # one drawing for every measure
    return Prepared(decoded.image, tensor, _drift_features(thumbnail) if features else None, _quality(thumbnail))


def _drift_features(thumbnail) -> dict:
    """The drift image features and the skin tone (when measurable) of a feature thumbnail."""
    return {**image_features(thumbnail), **skin_tone_values(thumbnail)}


def _read_and_prepare(image: LesionImage, spec, max_side: int, features: bool = False) -> Prepared:
    return _decode_and_prepare(_read(image), spec, max_side, features)


def _measured(prepared: Prepared) -> Prepared:
    """nvJPEG's thumbnail measured in a decode thread."""
    prepared.features = _drift_features(prepared.image)
    prepared.quality = _quality(prepared.image)
    return prepared


def _quality(thumbnail) -> dict | None:
    """The photo-quality measures, or None (the photo is then judged on its OOD score and the band
    alone) if measuring fails: a monitoring-grade measure must never fail a photo the model can read."""
    try:
        return measure(thumbnail)
    except Exception:
        logger.exception("the photo-quality measures could not be taken")
        return None


def tensor_decoding(predictor) -> bool:
    """INFERENCE_DECODE: 'auto' decodes plain JPEGs with torchvision on the GPU (nvJPEG) when the model
    is on one that can, 'torchvision' always (on the model's device, the CPU included), 'pillow' never."""
    from mlcore import tensor_decode  # torch: only in the worker

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
    from mlcore.inference import decode_side  # torch: only in the worker

    idle = settings.INFERENCE_DECODE_AHEAD_IDLE_MS / 1000
    if idle < 0 or not UPLOAD_NAME.fullmatch(name) or _in_flight:
        return None
    if _finished_at is not None and time.monotonic() - _finished_at < idle:
        return None
    predictor = _last_model()
    if predictor is None:
        return None
    max_side = decode_side(predictor.meta.input_size)
    return predictor, name, decoder_pool().submit(_read_name_and_prepare, name, predictor.spec, max_side)


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
    future = ahead[2]
    if not future.cancel():
        wait([future])


def _read_name_and_prepare(name: str, spec, max_side: int) -> Prepared:
    with default_storage.open(name, "rb") as handle:
        return _decode_and_prepare(handle.read(), spec, max_side)


def _start_early(image: LesionImage, ahead=None):
    """Start reading and decoding a task's own photo for the model of the last batch, while the task
    gathers others and reads which model is active (a few milliseconds of database round trips that
    the photo's decode now overlaps), unless decode_ahead already started it from the message.
    _prepare_all uses it only if that model is still the one to run. Returns (predictor, image id,
    future), or None (no model used yet, or decoding on the GPU)."""
    from mlcore.inference import decode_side  # torch: only in the worker

    if image.attempts != 1:
        return None  # never for a photo on a later attempt: its worker may have died decoding it
    if ahead is not None and ahead[1] == image.file.name:
        logger.info("image %s: its photo was being decoded before the claim", image.pk)
        return ahead[0], image.pk, ahead[2]
    predictor = _last_model()
    if predictor is None:
        return None
    future = decoder_pool().submit(_read_and_prepare, image, predictor.spec, decode_side(predictor.meta.input_size))
    return predictor, image.pk, future


def _prepare_all(claimed: list[LesionImage], predictor, early=None) -> list[Future]:
    """One future per image: its Prepared, or the exception reading or decoding it raised."""
    from mlcore.inference import decode_side  # torch: only in the worker

    max_side = decode_side(predictor.meta.input_size)
    if not tensor_decoding(predictor):
        started = {early[1]: early[2]} if early is not None and early[0] is predictor else {}
        if len(claimed) == 1 and not started:  # one image: in this thread, no hand-off
            return [done_future(_read_and_prepare, claimed[0], predictor.spec, max_side)]
        return [started.get(image.pk) or decoder_pool().submit(_read_and_prepare, image, predictor.spec, max_side, True)
                for image in claimed]  # fmt: skip

    from mlcore import tensor_decode  # torch: only in the worker

    reads = [decoder_pool().submit(_read, image) for image in claimed]
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
            futures[index] = decoder_pool().submit(_decode_and_prepare, data, predictor.spec, max_side, True)
    if batch:
        # On a GPU, from this thread: the batch on the device meanwhile keeps running. On the CPU, on the
        # device thread like every torch operator of a worker (runtime.device_thread says why).
        run = on_device if predictor.device.type == "cpu" else _call
        try:
            results = run(tensor_decode.decode_batch, [data for _, data, _ in batch], [o for _, _, o in batch],
                          spec=predictor.spec, feature_size=FEATURE_SIZE, device=predictor.device)  # fmt: skip
        except Exception as exc:  # out of GPU memory, say: Pillow decodes the whole batch instead
            logger.warning("batch decoding on %s failed (%s); decoding with Pillow", predictor.device, exc)
            results = [exc] * len(batch)
        for (index, data, _), result in zip(batch, results, strict=True):
            if isinstance(result, Exception):  # Pillow decides, and says in words what is wrong
                futures[index] = decoder_pool().submit(_decode_and_prepare, data, predictor.spec, max_side, True)
            else:
                futures[index] = decoder_pool().submit(_measured, Prepared(result.thumbnail, result.tensor))
    return futures  # type: ignore[return-value]


def _call(function, *args, **kwargs):
    return function(*args, **kwargs)


@contextlib.contextmanager
def working():
    """Marks a batch of this process as in progress while the context is open (decode_ahead starts no
    early decode meanwhile, nor within INFERENCE_DECODE_AHEAD_IDLE_MS after)."""
    global _in_flight, _finished_at
    with _in_flight_lock:
        _in_flight += 1
    try:
        yield
    finally:
        with _in_flight_lock:
            _in_flight -= 1
            _finished_at = time.monotonic()
