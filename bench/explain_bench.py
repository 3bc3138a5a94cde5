"""Explanation speed and memory, measured side by side in one run.

    .venv/bin/python bench/explain_bench.py [--arch resnet18] [--image-size 224] [--repeats 3] [--images K]

1. Integrated Gradients, 50 steps, one image: the project's Explainer against Captum's default call
   (IntegratedGradients(f).attribute(x, target=t, n_steps=50), no internal_batch_size) on the same
   function f (the target's log-odds), model and image. Prints both times, the ratio and the largest
   difference between the attributions relative to their largest magnitude.
2. Grad-CAM's share of an inference worker's time per image: decode + predict against decode +
   predict with the fused Grad-CAM + its raw map as .npy; and, apart, the cost of drawing the PNGs,
   which a CPU worker does on the default queue.
3. Peak RSS of explaining a 6000x4000 JPEG upload end to end (decode, IG, overlay), in a subprocess.
4. With --images K: Integrated Gradients (--steps, default 50; blurred baseline, the service's default)
   for K different images with alternating targets, K single-image calls (Explainer.explain) against
   one batched call of the K images (Explainer.explain_batch, what the explain worker does with
   EXPLAIN_BATCH_SIZE >= K), on the same CPU and model, repeats interleaved. Prints both times, the
   ratio, the passes' shape (images x steps) and the largest difference between the two sets of maps.
"""

from __future__ import annotations

import argparse
import io
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from captum.attr import IntegratedGradients  # noqa: E402

from mlcore.data import SyntheticLesions  # noqa: E402
from mlcore.explain import Explainer, LogOdds  # noqa: E402
from mlcore.heatmap import DISPLAY_MAX_SIDE, attribution_npy, render  # noqa: E402
from mlcore.inference import Predictor  # noqa: E402
from mlcore.model import CheckpointMeta, build_model  # noqa: E402
from mlcore.preprocessing import decode_image  # noqa: E402


def median_time(function, repeats: int) -> tuple[float, object]:
    timings, result = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        result = function()
        timings.append(time.perf_counter() - started)
    return statistics.median(timings), result


def jpeg_bytes(size: tuple[int, int], seed: int = 3) -> bytes:
    image = SyntheticLesions(2, size=512, seed=seed)[1][0].resize(size)
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def big_upload_rss(arch: str, image_size: int) -> None:
    """Run in a child process: decode a 6000x4000 JPEG, explain with IG and render the overlay."""
    torch.manual_seed(0)
    meta = CheckpointMeta(arch=arch, input_size=image_size)
    explainer = Explainer(build_model(arch).eval(), meta)
    data = jpeg_bytes((6000, 4000))
    before = peak_rss_mb()
    decoded = decode_image(data, max_bytes=1 << 30, max_pixels=40_000_000, max_side=DISPLAY_MAX_SIDE)
    result = explainer.explain(decoded.image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1)
    render(decoded.image, result.map, signed=True, smooth=True, method_label="IG", target_class="malignant")
    print(before, peak_rss_mb(), explainer.internal_batch_size(50))


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would include the parent's, inherited at fork)."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=0, help="also compare K single IG calls with one batch of K")
    parser.add_argument("--steps", type=int, default=50, help="IG steps for --images")
    parser.add_argument("--child-rss", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child_rss:
        big_upload_rss(args.arch, args.image_size)
        return

    torch.manual_seed(0)
    meta = CheckpointMeta(arch=args.arch, input_size=args.image_size)
    model = build_model(args.arch).eval()
    image = SyntheticLesions(2, size=args.image_size, seed=1)[1][0]
    print(f"{args.arch} at {args.image_size} px, torch threads {torch.get_num_threads()}, {args.repeats} repeats")

    # 1. IG: Captum's default call first (the model's parameters still require grad, as they do by default).
    reference_model = build_model(args.arch).eval()
    reference_model.load_state_dict(model.state_dict())
    explainer = Explainer(model, meta)
    x = explainer.input_tensor(image)
    baseline = explainer.baseline("black", image)
    captum_ig = IntegratedGradients(LogOdds(reference_model))
    captum_seconds, captum_attr = median_time(
        lambda: captum_ig.attribute(x, baselines=baseline, target=1, n_steps=50), args.repeats
    )
    ours_seconds, ours = median_time(
        lambda: explainer.explain(image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1),
        args.repeats,
    )
    reference = captum_attr.detach().numpy()[0]
    difference = float(np.abs(ours.raw - reference).max() / np.abs(reference).max())
    print(
        f"IG 50 steps: Captum default {captum_seconds:.2f} s, project {ours_seconds:.2f} s "
        f"(internal batch {explainer.internal_batch_size(50)}): ratio {ours_seconds / captum_seconds:.2f}x; "
        f"max relative difference {difference:.1e}; completeness error {ours.convergence_delta:.2e}"
    )

    # 2. Grad-CAM's share of a prediction's worker time (from JPEG bytes).
    predictor = Predictor(model, meta, device="cpu")
    data = jpeg_bytes((1024, 768))

    def predict_only():
        decoded = decode_image(data)
        return predictor.predict([decoded.image])

    def predict_with_gradcam_map():
        # What the inference worker does: the fused Grad-CAM and its raw map as .npy. The PNGs are
        # drawn by render_explanation_task on the default queue (measured separately below).
        decoded = decode_image(data)
        results, cams = predictor.predict_with_gradcam([decoded.image])
        return results, attribution_npy(cams[0])

    decoded_once = decode_image(data)
    _, cams_once = predictor.predict_with_gradcam([decoded_once.image])

    def draw_pictures():
        return render(decoded_once.image, cams_once[0], signed=True, method_label="Grad-CAM", target_class="malignant")

    predict_only()
    predict_with_gradcam_map()
    repeats = max(9, args.repeats * 4)
    plain_seconds, _ = median_time(predict_only, repeats)
    gradcam_seconds, _ = median_time(predict_with_gradcam_map, repeats)
    draw_seconds, _ = median_time(draw_pictures, repeats)
    print(
        f"Inference worker, 1024x768 JPEG: decode + predict {plain_seconds * 1000:.1f} ms; with Grad-CAM map "
        f"{gradcam_seconds * 1000:.1f} ms: Grad-CAM adds {(gradcam_seconds / plain_seconds - 1) * 100:+.0f}%. "
        f"Drawing its overlay and heatmap PNGs (render task, default queue): {draw_seconds * 1000:.0f} ms"
    )

    # 3. Peak RSS of a 6000x4000 upload's explanation, in a fresh process.
    child = subprocess.run(
        [sys.executable, __file__, "--arch", args.arch, "--image-size", str(args.image_size), "--child-rss"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    before, after, batch = child.stdout.split()
    print(
        f"Peak RSS explaining a 6000x4000 JPEG upload in a fresh worker process (draft decode, IG 50 steps at "
        f"internal batch {batch}, overlay): {float(after):.0f} MB, of which {float(before):.0f} MB is the process "
        "with torch and the model loaded"
    )

    # 4. IG for K images: one at a time against one batched call.
    if args.images > 0:
        batch_comparison(explainer, args.images, args.steps, args.image_size, args.repeats)


def batch_comparison(explainer: Explainer, count: int, steps: int, image_size: int, repeats: int) -> None:
    images = [SyntheticLesions(count, size=image_size, seed=21)[index][0] for index in range(count)]
    targets = [index % 2 for index in range(count)]
    params = {"n_steps": steps, "baseline": "blurred"}

    def one_at_a_time():
        return [
            explainer.explain(image, "integrated_gradients", params, t)
            for image, t in zip(images, targets, strict=True)
        ]

    def batched():
        return explainer.explain_batch(images, "integrated_gradients", params, targets)

    batched()  # warm-up: the first call pays for allocations
    single_times, batch_times = [], []
    singles = together = None
    for _ in range(repeats):  # interleaved, so that a busy moment on the machine hits both
        seconds, singles = median_time(one_at_a_time, 1)
        single_times.append(seconds)
        seconds, together = median_time(batched, 1)
        batch_times.append(seconds)
    single_seconds, batch_seconds = statistics.median(single_times), statistics.median(batch_times)
    difference = max(
        float(np.abs(a.map - b.map).max() / np.abs(a.map).max()) for a, b in zip(singles, together, strict=True)
    )
    per_call, steps_per_pass = explainer.ig_batch_plan(count, steps)
    print(
        f"IG {steps} steps, {count} images (blurred baseline, targets alternating): one at a time "
        f"{single_seconds:.2f} s ({count / single_seconds:.2f} explanations/s, internal batch "
        f"{explainer.internal_batch_size(steps)}), one batched call {batch_seconds:.2f} s "
        f"({count / batch_seconds:.2f} explanations/s, {per_call} images x {steps_per_pass} steps per pass): "
        f"ratio batched / one at a time {batch_seconds / single_seconds:.2f}x; max relative difference of the "
        f"maps {difference:.1e}"
    )


if __name__ == "__main__":
    main()
