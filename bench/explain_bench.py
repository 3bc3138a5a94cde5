"""Explanation speed and memory, measured side by side in one run.

    .venv/bin/python bench/explain_bench.py [--arch resnet18] [--image-size 224] [--repeats 3]

1. Integrated Gradients, 50 steps, one image: the project's Explainer against Captum's default call
   (IntegratedGradients(f).attribute(x, target=t, n_steps=50), no internal_batch_size) on the same
   function f (the target's log-odds), model and image. Prints both times, the ratio and the largest
   difference between the attributions relative to their largest magnitude.
2. Grad-CAM's share of a prediction's worker time: decode + predict against decode + predict with
   the fused Grad-CAM + rendering and encoding the overlay, heatmap and .npy files.
3. Peak RSS of explaining a 6000x4000 JPEG upload end to end (decode, IG, overlay), in a subprocess.
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
from mlcore.heatmap import attribution_npy, render  # noqa: E402
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
    decoded = decode_image(jpeg_bytes((6000, 4000)), max_bytes=1 << 30, max_pixels=40_000_000)
    result = explainer.explain(decoded.image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1)
    render(decoded.image, result.map, signed=True, smooth=True, method_label="IG", target_class="malignant")
    print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--repeats", type=int, default=3)
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

    def predict_with_gradcam_files():
        decoded = decode_image(data)
        results, cams = predictor.predict_with_gradcam([decoded.image])
        overlay, heat = render(decoded.image, cams[0], signed=True, method_label="Grad-CAM", target_class="malignant")
        return results, overlay, heat, attribution_npy(cams[0])

    predict_only()
    predict_with_gradcam_files()
    repeats = max(5, args.repeats * 4)
    plain_seconds, _ = median_time(predict_only, repeats)
    gradcam_seconds, _ = median_time(predict_with_gradcam_files, repeats)
    print(
        f"Worker time for a 1024x768 JPEG: predict {plain_seconds * 1000:.1f} ms, predict + Grad-CAM files "
        f"{gradcam_seconds * 1000:.1f} ms: Grad-CAM adds {(gradcam_seconds / plain_seconds - 1) * 100:.0f}%"
    )

    # 3. Peak RSS of a 6000x4000 upload's explanation, in a fresh process.
    child = subprocess.run(
        [sys.executable, __file__, "--arch", args.arch, "--image-size", str(args.image_size), "--child-rss"],
        capture_output=True, text=True, check=True,
    )  # fmt: skip
    print(f"Peak RSS explaining a 6000x4000 upload (decode, IG 50 steps, overlay): {float(child.stdout):.0f} MB")


if __name__ == "__main__":
    main()
