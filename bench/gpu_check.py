"""The GPU check: the inference worker's own batch path on a CUDA machine, in one short script.

    .venv/bin/python bench/gpu_check.py [--seconds 10] [--batch 64] [--arch resnet18]

Prints, side by side in one run, on 1024x768 JPEG bytes:
1. model-only ceiling: images/s of resnet forward passes on a ready batch (fp32; bf16 + channels_last);
2. end to end from bytes, the worker's path: nvJPEG batch decode (mlcore.tensor_decode.decode_batch),
   orientation, resize and normalisation on the GPU, then Predictor.predict_with_gradcam_tensors
   (prediction, Grad-CAM and embeddings), as the worker runs it; and the same with Pillow decoding on
   a thread pool of every core (the fallback), for comparison;
3. Integrated Gradients at 50 steps: explanations/s, one image per call and several per call, in
   fp32 and under bf16 autocast, and how far the bf16 maps are from the fp32 ones.
Refuses to run without CUDA: the CPU figures come from bench/throughput.py and bench/explain_bench.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.throughput import make_photos
from mlcore import tensor_decode
from mlcore.drift import FEATURE_SIZE
from mlcore.inference import Predictor, decode_side, warm_up
from mlcore.model import CheckpointMeta, build_model
from mlcore.preprocessing import decode_image, to_tensor


def with_orientation(data: bytes, orientation: int) -> bytes:
    """The same JPEG with an EXIF orientation tag (the pixels unchanged, so it displays turned)."""
    import io

    from PIL import Image

    image = Image.open(io.BytesIO(data))
    exif = Image.Exif()
    exif[0x0112] = orientation
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90, exif=exif.tobytes())
    return out.getvalue()


def _child(arch: str, input_size: int, batch: int, seconds: float, device: str, barrier, results) -> None:
    """One worker process's nvJPEG batch path, started with the others at the barrier."""
    torch.manual_seed(0)
    meta = CheckpointMeta(arch=arch, input_size=input_size)
    predictor = Predictor(build_model(arch).eval(), meta, device=device, max_batch_size=1024)
    warm_up(predictor, (1, batch))
    photos = make_photos(16, size=(1024, 768))
    work = [photos[i % len(photos)] for i in range(batch)]

    def step():
        prepared = tensor_decode.decode_batch(work, [1] * batch, spec=predictor.spec, feature_size=FEATURE_SIZE,
                                              device=torch.device(device))  # fmt: skip
        predictor.predict_with_gradcam_tensors(torch.stack([p.tensor for p in prepared]), embeddings=True)

    step()
    barrier.wait()
    results.put(rate(step, seconds, batch))


def processes_rate(count: int, args, device: str) -> float:
    """images/s of `count` worker processes sharing the device, each running the nvJPEG batch path."""
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    barrier, results = context.Barrier(count), context.Queue()
    children = [context.Process(target=_child, args=(args.arch, args.input_size, args.batch, args.seconds / 2, device,
                                                     barrier, results)) for _ in range(count)]  # fmt: skip
    for child in children:
        child.start()
    total = sum(results.get(timeout=300) for _ in children)
    for child in children:
        child.join()
    return total


def _synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def rate(function, seconds: float, per_call: int) -> float:
    function()
    _synchronize()
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        function()
        calls += 1
    _synchronize()
    return calls * per_call / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--ig-only", action="store_true", help="only the Integrated Gradients part (3)")
    parser.add_argument("--ig-budget-gb", type=int, default=16, help="EXPLAIN_MEMORY_BUDGET_MB, in GB")
    parser.add_argument(
        "--dry-run-on-cpu",
        action="store_true",
        help="run every step on the CPU with tiny sizes, to check the script before a GPU session",
    )
    args = parser.parse_args()
    if args.dry_run_on_cpu:
        args.seconds, args.batch, args.input_size = 0.5, 4, 64
        device = torch.device("cpu")
        print("dry run on the CPU: the figures mean nothing")
    elif not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run bench/throughput.py for the CPU figures (or --dry-run-on-cpu)")
    else:
        device = torch.device("cuda")
        print(f"{torch.cuda.get_device_name(0)}; torch {torch.__version__}; {os.cpu_count()} CPU cores")

    torch.manual_seed(0)
    meta = CheckpointMeta(arch=args.arch, input_size=args.input_size)
    predictor = Predictor(build_model(args.arch).eval(), meta, device=str(device), max_batch_size=1024)
    print(f"warm-up {warm_up(predictor, (1, args.batch)):.2f} s")

    photos = make_photos(32, size=(1024, 768))
    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    if not args.ig_only:
        decode_and_predict(args, predictor, photos, pool, device)
    integrated_gradients(args, predictor, meta, photos, pool, device)


def decode_and_predict(args, predictor, photos, pool, device) -> None:
    # 1. model-only ceiling
    model = build_model(args.arch).eval().to(device)
    fast_model = build_model(args.arch).eval().to(device).to(memory_format=torch.channels_last)
    for size in (args.batch, 4 if args.dry_run_on_cpu else 256):
        batch = torch.randn(size, 3, args.input_size, args.input_size, device=device)
        fast_batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.inference_mode():
            fp32 = rate(lambda b=batch: model(b), args.seconds / 2, size)
            with torch.autocast(device.type, dtype=torch.bfloat16):
                bf16 = rate(lambda b=fast_batch: fast_model(b), args.seconds / 2, size)
        print(f"model only, batch {size}: fp32 {fp32:,.0f} images/s; bf16 + channels_last {bf16:,.0f} images/s")

    # 2. end to end from JPEG bytes
    side = decode_side(args.input_size)

    def pillow_one(data: bytes):
        return to_tensor(decode_image(data, max_side=side, copy_pixels=False).image, predictor.spec)

    from torchvision.io import ImageReadMode, decode_jpeg

    sizes = (4, 8) if args.dry_run_on_cpu else (32, 64, 128, 256)
    line = "torchvision decode_jpeg alone (the batched call, no resizing):"
    for size in sizes:
        raw = [torch.frombuffer(bytearray(photos[i % len(photos)]), dtype=torch.uint8) for i in range(size)]
        speed = rate(lambda r=raw: decode_jpeg(r, mode=ImageReadMode.RGB, device=device), args.seconds / 4, size)
        line += f" batch {size} {speed:,.0f}/s;"
    print(line, flush=True)

    def nvjpeg_decode(work):
        prepared = tensor_decode.decode_batch(work, [1] * len(work), spec=predictor.spec, feature_size=FEATURE_SIZE,
                                              device=device)  # fmt: skip
        assert not any(isinstance(p, Exception) for p in prepared), prepared
        return [p.tensor for p in prepared]

    def hybrid(work, share: float):
        """The last `share` of the batch decoded by Pillow on the thread pool while nvJPEG decodes the rest."""
        cut = len(work) - round(len(work) * share)
        jobs = [pool.submit(pillow_one, data) for data in work[cut:]]
        tensors = nvjpeg_decode(work[:cut]) + [job.result().to(device) for job in jobs]
        predictor.predict_with_gradcam_tensors(torch.stack(tensors), embeddings=True)

    for size in sizes[:3]:
        work = [photos[i % len(photos)] for i in range(size)]
        decode_only = rate(lambda w=work: nvjpeg_decode(w), args.seconds / 4, size)
        nv = rate(lambda w=work: predictor.predict_with_gradcam_tensors(torch.stack(nvjpeg_decode(w)), embeddings=True),
                  args.seconds / 2, size)  # fmt: skip
        line = (f"end to end from 1024x768 JPEG bytes, batch {size} (prediction + Grad-CAM + embeddings): "
                f"nvJPEG {nv:,.0f} images/s (decode_batch alone {decode_only:,.0f}/s)")  # fmt: skip
        for share in (0.25, 0.4):
            speed = rate(lambda w=work, f=share: hybrid(w, f), args.seconds / 2, size)
            line += f"; nvJPEG + Pillow on {share:.0%} {speed:,.0f}/s"
        if size == args.batch:
            pillow = rate(lambda w=work: predictor.predict_with_gradcam_tensors(
                torch.stack(list(pool.map(pillow_one, w))), embeddings=True), args.seconds / 2, size)  # fmt: skip
            line += f"; Pillow alone on {os.cpu_count()} threads {pillow:,.0f}/s"
        print(line + " (goal >= 1,000/s)", flush=True)

    line = f"worker processes sharing the GPU, nvJPEG path, batch {args.batch}:"
    for count in (1, 2) if args.dry_run_on_cpu else (1, 2, 4):
        line += f" {count} -> {processes_rate(count, args, str(device)):,.0f} images/s;"
    print(line, flush=True)

    # agreement: the nvJPEG path against the Pillow path, on the same photos with EXIF orientations
    turned = [with_orientation(photo, orientation) for photo, orientation in zip(photos, [1, 3, 6, 8] * 8, strict=True)]
    prepared = tensor_decode.decode_batch(turned, [1, 3, 6, 8] * 8, spec=predictor.spec, feature_size=FEATURE_SIZE,
                                          device=device)  # fmt: skip
    gpu_results, _, gpu_embeddings = predictor.predict_with_gradcam_tensors(
        torch.stack([p.tensor for p in prepared]), embeddings=True
    )
    cpu_results, _, cpu_embeddings = predictor.predict_with_gradcam_tensors(
        torch.stack(list(pool.map(pillow_one, turned))), embeddings=True
    )
    pairs = zip(gpu_results, cpu_results, strict=True)
    worst = max(abs(a.probability_malignant - b.probability_malignant) for a, b in pairs)
    cosine = torch.nn.functional.cosine_similarity(torch.from_numpy(gpu_embeddings), torch.from_numpy(cpu_embeddings))
    print(f"nvJPEG against Pillow on 32 photos with EXIF orientations 1/3/6/8: largest probability difference "
          f"{worst:.4f}, embedding cosine min {float(cosine.min()):.4f}")  # fmt: skip


def integrated_gradients(args, predictor, meta, photos, pool, device) -> None:
    # 3. Integrated Gradients, fp32 against bf16 autocast
    import numpy as np

    from mlcore import explain

    params = {"n_steps": 50, "baseline": "blurred"}
    images = [decode_image(photos[i % len(photos)], max_side=1024).image for i in range(64)]
    counts = (2,) if args.dry_run_on_cpu else (8, 32, 64)
    explainers = {}
    for precision in ("fp32", "bf16"):
        explainer = explain.Explainer(predictor.model, meta, device=device, memory_budget_bytes=args.ig_budget_gb << 30,
                                      precision=precision, executor=pool)  # fmt: skip
        explainers[precision] = explainer
        single = rate(lambda e=explainer: e.explain(images[0], "integrated_gradients", params, 1), args.seconds / 2, 1)
        line = f"IG at 50 steps, {precision}: {single:.1f} explanations/s one image per call"
        for count in counts:
            many = rate(lambda n=count, e=explainer: e.explain_batch(images[:n], "integrated_gradients", params,
                                                                     [1] * n), args.seconds / 2, count)  # fmt: skip
            line += f"; {many:.1f}/s with {count} images per call"
        plan = explainer.ig_batch_plan(counts[-1], params["n_steps"])
        print(line + f" (goal >= 120/s; {plan[0]} images x {plan[1]} steps per pass)", flush=True)
    prep = rate(lambda e=explainers["bf16"]: e.baseline_for("blurred", e.input_tensors(images)), args.seconds / 4,
                len(images))  # fmt: skip
    print(f"IG inputs and blurred baselines, {len(images)} images per call on the thread pool: {prep:.0f} images/s")
    ref = explainers["fp32"].explain_batch(images[:8], "integrated_gradients", params, [1] * 8)
    fast = explainers["bf16"].explain_batch(images[:8], "integrated_gradients", params, [1] * 8)
    correlations = [float(np.corrcoef(a.map.ravel(), b.map.ravel())[0, 1]) for a, b in zip(ref, fast, strict=True)]
    print(f"bf16 against fp32 IG maps over 8 images: Pearson r min {min(correlations):.4f}, "
          f"mean {sum(correlations) / len(correlations):.4f}; convergence delta mean fp32 "
          f"{np.mean([a.convergence_delta for a in ref]):.4f}, bf16 "
          f"{np.mean([b.convergence_delta for b in fast]):.4f}")  # fmt: skip


if __name__ == "__main__":
    main()
