"""A worker process's long-lived resources: the model of each version (loaded once), the threads that
read and decode photos, and the one thread that runs batches on the device (services.engine)."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor

from django.conf import settings

from ..models import ModelVersion
from .registry import VersionCache, cached_weights_path

logger = logging.getLogger(__name__)


def _load_predictor(model_version: ModelVersion):
    # torch is loaded only in the processes that run a model, never in the web tier.
    from mlcore.inference import Predictor

    path = cached_weights_path(model_version)
    predictor = on_device(Predictor.from_checkpoint, path, device=settings.INFERENCE_DEVICE)
    logger.info("loaded model %s on %s", model_version.version, predictor.device)
    return predictor


predictors = VersionCache(_load_predictor)


def size_torch_threads(concurrency: int) -> int:
    """At a worker child's start: torch's intra-op threads sized to the cores this child really has
    (its siblings share the machine's), so that torch does not start one thread per core in every child."""
    # torch: loaded in worker children only.
    from mlcore.inference import configure_torch_threads

    return configure_torch_threads(max(1, (os.cpu_count() or 1) // max(1, concurrency)))


def predictor_for(model_version: ModelVersion):
    """The process-wide Predictor of this version."""
    return predictors.get(model_version)


def _build_explainer(model_version: ModelVersion):
    # captum and torch: only in the processes that explain.
    from mlcore.explain import Explainer

    predictor = predictor_for(model_version)  # share its model: no second copy in memory
    return on_device(
        Explainer, predictor.model, predictor.meta, device=predictor.device,
        memory_budget_bytes=settings.EXPLAIN_MEMORY_BUDGET_MB << 20, precision=settings.EXPLAIN_PRECISION,
        executor=decoder_pool(),
    )  # fmt: skip


explainers = VersionCache(_build_explainer)


def explainer_for(model_version: ModelVersion):
    """The process-wide Explainer of this version."""
    return explainers.get(model_version)


_pools: dict[str, ThreadPoolExecutor] = {}
_pools_lock = threading.Lock()


def decoder_pool() -> ThreadPoolExecutor:
    """Threads that read and decode a batch's photos (Pillow releases the GIL), DECODE_THREADS of them;
    one pool per process, for predictions and explanations alike."""
    return _pool("decode", max(1, settings.DECODE_THREADS))


def device_thread() -> ThreadPoolExecutor:
    """The one thread that runs batches on the device, so that the task's own thread claims, decodes
    and records the batches before and after the one being run (services.engine). One per process:
    batches reach the device one at a time, in the order they were handed over.

    Every torch computation of a worker process runs on this thread: loading a model, the warm-up,
    the batches, the explanations (on_device). On a CPU, torch's OpenMP threads belong to the thread
    that starts them: a model loaded or run on another thread as well gave the process a second team,
    and each forward pass then took 1.5-2x as long (bench/README.md, issue 17)."""
    return _pools.get("device") or _pool("device", 1, initializer=_device_thread_started,
                                          initargs=(_torch_threads(),))  # fmt: skip


_device_thread_ident: int | None = None


def on_device(function, *args, **kwargs):
    """function(*args, **kwargs) on the device thread (at once when called from it), its result or its
    exception here."""
    if threading.get_ident() == _device_thread_ident:
        return function(*args, **kwargs)
    return device_thread().submit(function, *args, **kwargs).result()


def _pool(name: str, workers: int, **options) -> ThreadPoolExecutor:
    with _pools_lock:
        if name not in _pools:
            _pools[name] = ThreadPoolExecutor(max_workers=workers, thread_name_prefix=name, **options)
        return _pools[name]


def _torch_threads() -> int | None:
    try:
        import torch  # already loaded in a process that runs a model; not loaded here otherwise
    except ImportError:
        return None
    return torch.get_num_threads()


def _device_thread_started(threads: int | None) -> None:
    """The device thread runs torch's operators with the intra-op thread count the process was given
    (webapp.celery sizes it to the child's share of the cores); OpenMP keeps that count per thread."""
    global _device_thread_ident
    _device_thread_ident = threading.get_ident()
    if threads:
        import torch

        torch.set_num_threads(threads)
