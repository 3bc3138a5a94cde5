"""Calibration of the drift check: false alarms on windows with no shift, detection of real shifts.

    .venv/bin/python bench/drift_calibration.py [--windows 200] [--reference 2000] [--pool 2000]

Everything is synthetic and made here, in one run: a small ResNet (resnet_tiny, 64 px) is trained on
synthetic lesions, so the probability and embedding features are a real model's; a reference set
(REFERENCE images, the role of the registered model's held-out set) and a disjoint pool of new
"uploads" from the same generator and the same "camera" (256 px JPEG, quality 90) are described
with mlcore.drift exactly as uploads are.

Windows with no shift are drawn from the pool (100 and 500 uploads); shifted windows (200 uploads)
from the pool after a change applied to the photos: brightness x1.15, a blur, a warm colour cast,
and a switch of camera (320x240 JPEG at quality 75). Each window is judged by

- the project's check (mlcore.drift.check_drift: Evidently's KS test per feature, Holm's
  correction, family-wise alpha 0.05),
- the same KS tests at 0.05 per feature with no correction (any feature drifted), and
- Evidently's defaults (DataDriftPreset(): normed Wasserstein distance > 0.1 per column with a
  reference of more than 1,000 rows, else KS p < 0.05; "any column drifted" and "data set drift",
  at least half the columns).

It prints the rates as a Markdown table for bench/README.md.
"""

from __future__ import annotations

import argparse
import io
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlcore import drift  # noqa: E402
from mlcore.data import SyntheticLesions, generate_lesion  # noqa: E402
from mlcore.pipeline import logits_and_embeddings  # noqa: E402
from mlcore.preprocessing import TransformSpec, decode_image  # noqa: E402
from mlcore.train import TrainConfig, train_classifier  # noqa: E402

SIZE = 256


def camera(image: Image.Image) -> bytes:
    """The reference 'camera': 256 px, JPEG quality 90."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def brighter(image: Image.Image) -> bytes:
    return camera(ImageEnhance.Brightness(image).enhance(1.15))


def blurred(image: Image.Image) -> bytes:
    return camera(image.filter(ImageFilter.GaussianBlur(radius=1.5)))


def warm_cast(image: Image.Image) -> bytes:
    r, g, b = image.split()
    return camera(Image.merge("RGB", (r.point(lambda v: min(255, int(v * 1.08))), g,
                                      b.point(lambda v: int(v * 0.90)))))  # fmt: skip


def other_camera(image: Image.Image) -> bytes:
    """Another device: 4:3 at 320x240, stronger compression."""
    buffer = io.BytesIO()
    image.resize((320, 240), Image.Resampling.BICUBIC).save(buffer, format="JPEG", quality=75)
    return buffer.getvalue()


SHIFTS = {"brightness x1.15": brighter, "blur (Gaussian, 1.5 px)": blurred, "colour cast (warm)": warm_cast,
          "camera switch (320x240, JPEG q75)": other_camera}  # fmt: skip


def describe(photos: list[bytes], model, spec: TransformSpec, projection: drift.Projection | None) -> list[dict]:
    decoded = [decode_image(data, max_bytes=1 << 26, max_pixels=1 << 26).image for data in photos]
    rows = [drift.describe_image(image, file_size=len(data)) for image, data in zip(decoded, photos, strict=True)]
    logits, embeddings = logits_and_embeddings(model, [(image, 0) for image in decoded], spec)
    probabilities = np.exp(logits[:, 1]) / np.exp(logits).sum(axis=1)
    projected = projection.transform(embeddings) if projection else None
    for index, row in enumerate(rows):
        row["probability_malignant"] = float(probabilities[index])
        if projected is not None:
            row.update(zip(drift.EMBEDDING_FEATURES, map(float, projected[index]), strict=False))
    return rows


def rates(windows: list[dict[str, np.ndarray]], reference: dict[str, np.ndarray]) -> dict[str, float]:
    ours = uncorrected = any_column = dataset = 0
    config = drift.DriftConfig(alpha=0.05, min_current=10)
    for window in windows:
        check = drift.check_drift(reference, window, config, histograms=False)
        ours += check.drifted
        uncorrected += any(f.p_value <= 0.05 for f in check.features)
        default = drift.evidently_default_check(reference, window)
        any_column += default["any_column"]
        dataset += default["dataset"]
    n = len(windows)
    return {"project": ours / n, "ks_uncorrected": uncorrected / n, "evidently_any": any_column / n,
            "evidently_dataset": dataset / n}  # fmt: skip


def sample_windows(pool: dict[str, np.ndarray], size: int, count: int, rng: np.random.Generator) -> list[dict]:
    total = len(next(iter(pool.values())))
    windows = []
    for _ in range(count):
        chosen = rng.choice(total, size=size, replace=False)
        windows.append({name: values[chosen] for name, values in pool.items()})
    return windows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--windows", type=int, default=200, help="windows per condition")
    parser.add_argument("--reference", type=int, default=2000)
    parser.add_argument("--pool", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    started = time.perf_counter()

    import torch

    torch.manual_seed(args.seed)
    train = list(SyntheticLesions(600, size=64, seed=101))
    result = train_classifier(train, list(SyntheticLesions(100, size=64, seed=102)),
                              TrainConfig(arch="resnet_tiny", input_size=64, epochs=3, seed=args.seed),
                              progress=False)  # fmt: skip
    model, meta = result.model.eval(), result.meta
    spec = TransformSpec(meta.input_size, meta.mean, meta.std)
    _, train_embeddings = logits_and_embeddings(model, train, spec)
    projection = drift.Projection.fit(train_embeddings)

    def photos(count: int, seed: int) -> list[Image.Image]:
        return [generate_lesion(np.random.default_rng([seed, i]), malignant=bool(i % 2), size=SIZE).image
                for i in range(count)]  # fmt: skip

    reference_images = photos(args.reference, 1)
    pool_images = photos(args.pool, 2)
    reference = drift.columns(describe([camera(i) for i in reference_images], model, spec, projection))
    pool = drift.columns(describe([camera(i) for i in pool_images], model, spec, projection))
    shifted = {name: drift.columns(describe([shift(i) for i in pool_images], model, spec, projection))
               for name, shift in SHIFTS.items()}  # fmt: skip
    photos_described = args.reference + args.pool * (1 + len(SHIFTS))
    print(f"features of {photos_described} photos in {time.perf_counter() - started:.0f} s")

    rng = np.random.default_rng(args.seed)
    rows = []
    for size in (100, 500):
        rows.append((f"no shift, window {size}", "false alarms", rates(sample_windows(pool, size, args.windows, rng),
                                                                        reference)))  # fmt: skip
    for name, features in shifted.items():
        rows.append((f"{name}, window 200", "detection", rates(sample_windows(features, 200, args.windows, rng),
                                                                reference)))  # fmt: skip

    print(f"\n{args.windows} windows per condition; reference {args.reference} photos; "
          f"{time.perf_counter() - started:.0f} s in all\n")  # fmt: skip
    print(
        "| condition | rate | project (KS + Holm, α 0.05) | KS 0.05, no correction | Evidently default, any column "
        "| Evidently default, data set drift |"
    )
    print("|---|---|---|---|---|---|")
    for condition, kind, values in rows:
        print(
            f"| {condition} | {kind} | **{values['project']:.1%}** | {values['ks_uncorrected']:.1%} | "
            f"{values['evidently_any']:.1%} | {values['evidently_dataset']:.1%} |"
        )


if __name__ == "__main__":
    main()
