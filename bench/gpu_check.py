"""The GPU check: the inference worker's own batch path on a CUDA machine, in one short script.

    .venv/bin/python bench/gpu_check.py [--seconds 10] [--batch 64] [--arch resnet18]

Prints, side by side in one run, on 1024x768 JPEG bytes:
1. model-only ceiling: images/s of resnet forward passes on a ready batch (fp32; bf16 + channels_last);
2. end to end from bytes, the worker's path: nvJPEG batch decode (mlcore.tensor_decode.decode_batch),
   orientation, resize and normalisation on the GPU, then Predictor.predict_with_gradcam_tensors
   (prediction, Grad-CAM and embeddings), as the worker runs it; and the same with Pillow decoding on
   a thread pool of every core (the fallback), for comparison;
3. Integrated Gradients at 50 steps: explanations/s, one image per call and several per call when
   mlcore.explain offers a batched call.
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
    photos = make_photos(32, size=(1024, 768))
    work = [photos[i % len(photos)] for i in range(args.batch)]
    orientations = [1] * len(work)

    def nvjpeg_path():
        prepared = tensor_decode.decode_batch(work, orientations, spec=predictor.spec, feature_size=FEATURE_SIZE,
                                              device=device)  # fmt: skip
        assert not any(isinstance(p, Exception) for p in prepared)
        predictor.predict_with_gradcam_tensors(torch.stack([p.tensor for p in prepared]), embeddings=True)

    pool = ThreadPoolExecutor(os.cpu_count() or 1)
    side = decode_side(args.input_size)

    def pillow_one(data: bytes):
        return to_tensor(decode_image(data, max_side=side, copy_pixels=False).image, predictor.spec)

    def pillow_path():
        predictor.predict_with_gradcam_tensors(torch.stack(list(pool.map(pillow_one, work))), embeddings=True)

    nv = rate(nvjpeg_path, args.seconds, len(work))
    cpu = rate(pillow_path, args.seconds, len(work))
    print(f"end to end from 1024x768 JPEG bytes, batch {args.batch} (prediction + Grad-CAM + embeddings): "
          f"nvJPEG {nv:,.0f} images/s; Pillow on {os.cpu_count()} threads {cpu:,.0f} images/s "
          f"(goal >= 1,000/s)")  # fmt: skip

    # 3. Integrated Gradients
    from mlcore import explain

    explainer = explain.Explainer(predictor.model, meta, device=device, memory_budget_bytes=16 << 30)
    params = {"n_steps": 50, "baseline": "blurred"}
    images = [decode_image(p, max_side=1024).image for p in photos[:32]]
    single = rate(lambda: explainer.explain(images[0], "integrated_gradients", params, 1), args.seconds, 1)
    line = f"IG at 50 steps: {single:.1f} explanations/s one image per call"
    for count in (2,) if args.dry_run_on_cpu else (8, 32):
        many = rate(lambda n=count: explainer.explain_batch(images[:n], "integrated_gradients", params, [1] * n),
                    args.seconds, count)  # fmt: skip
        line += f"; {many:.1f}/s with {count} images per call"
    print(line + " (goal >= 120/s)")


if __name__ == "__main__":
    main()
