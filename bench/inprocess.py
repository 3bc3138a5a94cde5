"""The model in the benchmark's own process: the photos, the ceiling and the in-process single image
(bench/throughput.py), and the inference worker's own batch path from JPEG bytes (bench/gpu_system.py),
in this process or in several processes sharing the device, as bench/gpu_check.py runs it."""

from __future__ import annotations

import io
import statistics
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np


def make_photos(count: int, size=(1528, 1360)) -> list[bytes]:
    """Photo-like JPEGs: a lesion-coloured blob on skin with texture and noise, quality 90."""
    from PIL import Image

    photos = []
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        rng = np.random.default_rng(index)
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
        radius = min(width, height) * rng.uniform(0.12, 0.25)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
        skin = np.array([205, 160, 135], np.float32) + rng.normal(0, 6, 3)
        lesion = np.array([90, 55, 40], np.float32) + rng.normal(0, 10, 3)
        rgb = skin * (1 - blob[..., None]) + lesion * blob[..., None]
        rgb += (np.sin(x / rng.uniform(6, 20)) * np.cos(y / rng.uniform(6, 20)))[..., None] * 6
        rgb += rng.normal(0, 5, rgb.shape)
        buffer = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


class InProcess:
    """The model in this very process, as a worker decodes and runs it: the ceiling and the latency floor."""

    def __init__(self, *, arch: str, input_size: int, threads: int) -> None:
        import torch

        from mlcore.inference import Predictor, configure_torch_threads, decode_side
        from mlcore.model import CheckpointMeta, build_model

        configure_torch_threads()
        torch.manual_seed(0)
        self.predictor = Predictor(build_model(arch).eval(), CheckpointMeta(arch=arch, input_size=input_size),
                                   device="cpu")  # fmt: skip
        self.max_side = decode_side(input_size)
        self.pool = ThreadPoolExecutor(threads)

    def prepare(self, data: bytes):
        from mlcore.preprocessing import decode_image, to_tensor

        return to_tensor(decode_image(data, max_side=self.max_side, copy_pixels=False).image, self.predictor.spec)

    def single_ms(self, data: bytes) -> float:
        """Decode plus forward of one photo at batch 1, in milliseconds."""
        started = time.perf_counter()
        self.predictor.predict_tensors(self.prepare(data).unsqueeze(0))
        return (time.perf_counter() - started) * 1000

    def ceiling(self, photos: list[bytes], *, images: int, batch: int) -> dict:
        import torch

        work = [photos[i % len(photos)] for i in range(images)]
        self.predictor.predict_tensors(torch.stack(list(self.pool.map(self.prepare, work[:batch]))))  # warm up
        started = time.perf_counter()
        decode_seconds = forward_seconds = 0.0
        for start in range(0, len(work), batch):
            t0 = time.perf_counter()
            tensors = torch.stack(list(self.pool.map(self.prepare, work[start : start + batch])))
            t1 = time.perf_counter()
            self.predictor.predict_tensors(tensors)
            forward_seconds += time.perf_counter() - t1
            decode_seconds += t1 - t0
        total = time.perf_counter() - started
        single = [self.single_ms(data) for data in work[:30]]
        return {
            "images_per_s": len(work) / total, "decode_ms": decode_seconds / len(work) * 1000,
            "forward_ms": forward_seconds / len(work) * 1000, "single_ms": statistics.median(single),
        }  # fmt: skip


class WorkerPath:
    """The inference worker's own batch path from JPEG bytes, on its device, without the service around
    it: on CUDA nvJPEG (mlcore.tensor_decode.decode_batch, the worker's INFERENCE_DECODE=auto), on the CPU
    Pillow on `decode_threads` threads; then Predictor.predict_with_gradcam_tensors (prediction, Grad-CAM
    and embeddings). No database, no storage, no broker: what the worker would do if it did nothing else."""

    def __init__(self, *, arch: str, input_size: int, device: str, batch: int, decode_threads: int) -> None:
        import torch

        from mlcore.inference import Predictor, decode_side, warm_up
        from mlcore.model import CheckpointMeta, build_model

        torch.manual_seed(0)
        self.predictor = Predictor(build_model(arch).eval(), CheckpointMeta(arch=arch, input_size=input_size),
                                   device=device, max_batch_size=max(batch, 32))  # fmt: skip
        self.nvjpeg = self.predictor.device.type == "cuda"
        self.max_side = decode_side(input_size)
        self.pool = ThreadPoolExecutor(max(1, decode_threads))
        warm_up(self.predictor, (1, batch))

    def _pillow(self, data: bytes):
        from mlcore.preprocessing import decode_image, to_tensor

        return to_tensor(decode_image(data, max_side=self.max_side, copy_pixels=False).image, self.predictor.spec)

    def run(self, work: list[bytes]) -> None:
        """One batch through the worker's path, finished (synchronised) when it returns."""
        import torch

        if self.nvjpeg:
            from mlcore import tensor_decode
            from mlcore.drift import FEATURE_SIZE

            prepared = tensor_decode.decode_batch(work, [1] * len(work), spec=self.predictor.spec,
                                                  feature_size=FEATURE_SIZE, device=self.predictor.device)  # fmt: skip
            tensors = torch.stack([p.tensor for p in prepared])
        elif len(work) == 1:  # one photo: in this thread, as the worker does
            tensors = self._pillow(work[0]).unsqueeze(0)
        else:
            tensors = torch.stack(list(self.pool.map(self._pillow, work)))
        self.predictor.predict_with_gradcam_tensors(tensors, embeddings=True)
        if self.nvjpeg:
            torch.cuda.synchronize(self.predictor.device)

    def single_ms(self, data: bytes) -> float:
        """One photo alone through the worker's path, in milliseconds: a lone upload's floor on this device."""
        started = time.perf_counter()
        self.run([data])
        return (time.perf_counter() - started) * 1000

    def rate(self, photos: list[bytes], *, batch: int, seconds: float) -> float:
        """Images/s of back-to-back batches of `batch` photos for about `seconds` (after one warm batch)."""
        work = [photos[i % len(photos)] for i in range(batch)]
        self.run(work)
        calls, started = 0, time.perf_counter()
        while calls == 0 or time.perf_counter() - started < seconds:
            self.run(work)
            calls += 1
        return calls * batch / (time.perf_counter() - started)


def _path_child(options: dict, photos: list[bytes], seconds: float, barrier, results) -> None:
    """One process of processes_rate: its own model and decoder, started with the others at the barrier."""
    from mlcore.inference import configure_torch_threads

    configure_torch_threads(options.pop("torch_threads"))
    batch = options["batch"]
    path = WorkerPath(**options)
    path.run([photos[i % len(photos)] for i in range(batch)])
    barrier.wait()
    results.put(path.rate(photos, batch=batch, seconds=seconds))


def processes_rate(count: int, photos: list[bytes], *, seconds: float, torch_threads: int, **options) -> float:
    """Images/s of `count` processes sharing the device, each running WorkerPath on back-to-back batches."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")  # CUDA: never forked
    barrier, results = context.Barrier(count), context.Queue()
    options = {**options, "torch_threads": torch_threads}
    children = [context.Process(target=_path_child, args=(dict(options), photos, seconds, barrier, results))
                for _ in range(count)]  # fmt: skip
    for child in children:
        child.start()
    try:
        return sum(results.get(timeout=600) for _ in children)
    finally:
        for child in children:
            child.join(timeout=60)
            if child.is_alive():
                child.kill()
