"""The photo-quality gate (issue 20) on synthetic photos: how many good photos it refuses, how many damaged
or non-skin ones it stops, whether what it stops is what the model gets wrong, and what it costs a worker.

    nice .venv/bin/python bench/quality_gate.py [--quick]

Everything is made here, in one run, with no downloads and no Django:

1. A training folder of synthetic lesions (mlcore.data.write_image_folder, 256 px JPEG, the "camera" of
   this clinic) and a model trained on it by the product's own pipeline (mlcore.pipeline: prepare_data,
   train_candidate, finalize), which also builds the model version's gate (TrainingOutcome.quality_gate:
   the quality thresholds from the training photos' measures, the OOD reference and its threshold, the
   refer-when-unsure band). Full run: the demo's model (resnet18, 128 px, 1,200 + 300 photos, 4 epochs);
   --quick: resnet_tiny at 64 px on fewer photos.
2. Good held-out photos (a fresh seed, same size and camera) and versions of them: Gaussian blur
   (sigma 1, 2, 4 px), exposure (pixel values x0.3, x0.6, x1.6, x2.5, clipped at 255: in linear light
   about x0.07, x0.33, x2.8 and x7.5), JPEG quality 10, and the lesion under 5% of the frame (the photo
   as if taken from three times as far: shrunk to a third of its side and pasted, in the middle or
   anywhere, into a frame of its own skin; see small_in_frame). And non-skin images of the same size:
   textures (noise, smooth noise, stripes), scenes (a gradient with shapes), documents (a page with
   lines of text) and solid colours.
3. Each photo goes the worker's way: JPEG bytes, mlcore.preprocessing.decode_image (draft mode at the
   worker's decode side), the model's tensor, mlcore.quality.measure on the feature thumbnail (the
   resolution from the photo's own size), the model's probability and embedding in one batched forward
   pass (Predictor.predict_with_gradcam_tensors, as the worker calls it), OodReference.scores, and
   mlcore.gate.decide(mode="strict").
4. The CPU cost the gate adds to a worker, side by side in one run: batches of 8 photos through decode,
   transform, drift features and forward (the worker's path without the gate), and the same with
   measure, the OOD score and decide.

It prints a plain-text table and writes it to bench/results/quality-gate.txt (bench/README.md, "Photo-quality
gate (issue 20)", says what the figures mean).

Long because: one self-contained run (the photos and their damage, the worker's path, the cost and the
report), which no other bench shares.
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageEnhance, ImageFilter

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from mlcore import metrics  # noqa: E402
from mlcore.data import _SKIN_TONES, SyntheticLesions, write_image_folder  # noqa: E402
from mlcore.drift import feature_thumbnail, image_features  # noqa: E402
from mlcore.gate import Gate, decide  # noqa: E402
from mlcore.inference import Predictor, decode_side  # noqa: E402
from mlcore.pipeline import finalize, prepare_data, train_candidate  # noqa: E402
from mlcore.preprocessing import decode_image, to_tensor  # noqa: E402
from mlcore.quality import measure  # noqa: E402
from mlcore.train import TrainConfig  # noqa: E402

SIZE = 256  # the camera's photos: training folder and held-out photos alike
SHRINK = 3  # the lesion under 5% of the frame: the photo at a third of its side in a frame of skin


# --- the photos -------------------------------------------------------------------------------------


@dataclass
class Photo:
    condition: str
    data: bytes  # what the worker reads: a JPEG
    label: int | None  # 1 malignant, 0 benign, None for a non-skin image
    tone: int | None = None  # index into mlcore.data._SKIN_TONES
    kind: str = ""  # the non-skin images' kind
    lesion_share: float | None = None  # the true lesion's share of the frame
    outcome: dict = field(default_factory=dict)


def jpeg(image: Image.Image, quality: int = 75) -> bytes:
    """The camera: Pillow's JPEG at its default quality, as write_image_folder writes the training photos."""
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def tone_of(seed: int, index: int, malignant: bool) -> int:
    """The skin tone generate_lesion drew for SyntheticLesions(seed=seed)[index]: its rng draws the
    severity, then the tone (mlcore.data: "the helpers draw from rng in this order")."""
    rng = np.random.default_rng([seed, index])
    rng.beta(5, 2) if malignant else rng.beta(2, 5)
    return int(rng.integers(len(_SKIN_TONES)))


def exposure(factor: float):
    return lambda image, mask, rng: ImageEnhance.Brightness(image).enhance(factor)


def blur(sigma: float):
    return lambda image, mask, rng: image.filter(ImageFilter.GaussianBlur(sigma))


def _light(pixels: np.ndarray, band: int | None = None) -> np.ndarray:
    """Per channel, the plane (a + b x + c y, x and y in pixels) fitted to the outer `band` pixels, or to
    all of them."""
    height, width = pixels.shape[:2]
    ys, xs = np.mgrid[0:height, 0:width]
    used = np.ones((height, width), bool)
    if band is not None:
        used[band:-band, band:-band] = False
    design = np.stack([np.ones(used.sum()), xs[used], ys[used]], axis=1)
    return np.linalg.lstsq(design, pixels[used].astype(np.float64), rcond=None)[0]  # 3 x channels


def _texture(image: Image.Image, mask: np.ndarray) -> np.ndarray:
    """The skin's fine texture at the camera's own scale, about 1 everywhere: the photo's plainest
    lesion-free corner (a quarter of its side) divided by its own light, mirrored and tiled to the size."""
    pixels = np.asarray(image, dtype=np.float64)
    size, quarter = pixels.shape[0], pixels.shape[0] // 4
    ys, xs = np.mgrid[0:quarter, 0:quarter]

    def detrended(corner: tuple[int, int]) -> np.ndarray:
        patch = pixels[corner[0] : corner[0] + quarter, corner[1] : corner[1] + quarter]
        plane = _light(patch)
        return patch / np.maximum(plane[0] + plane[1] * xs[..., None] + plane[2] * ys[..., None], 1)

    corners = [(0, 0), (0, size - quarter), (size - quarter, 0), (size - quarter, size - quarter)]
    # no lesion, and the fewest pixels far off the light (a hair, mirrored and tiled, would make a pattern)
    best = min(corners, key=lambda c: (mask[c[0] : c[0] + quarter, c[1] : c[1] + quarter].sum(),
                                       np.count_nonzero(np.abs(detrended(c) - 1) > 0.15)))  # fmt: skip
    patch = detrended(best)
    tile = np.concatenate([patch, patch[:, ::-1]], axis=1)
    tile = np.concatenate([tile, tile[::-1]], axis=0)
    reps = -(-size // (2 * quarter))
    return np.tile(tile, (reps, reps, 1))[:size, :size]


def small_in_frame(image: Image.Image, mask: np.ndarray, rng: np.random.Generator, centred: bool) -> Image.Image:
    """The photo as if taken from three times as far with the same camera: shrunk to 1/SHRINK of its side
    and pasted into the middle of a frame of the same size (`centred`, as off-centre as the good photos'
    lesions: 5% of the side) or at a random place. The frame is its skin, without a seam: the small
    photo's light (a plane per channel fitted to its outer tenth) carried on across the frame; and the
    whole frame, the small photo too, has the skin's fine texture at the camera's own scale (_texture),
    which shrinking the photo smoothed away (the synthetic skin's texture has a single scale; real skin
    shows detail at every scale)."""
    size = image.width
    small = np.asarray(image.resize((size // SHRINK, size // SHRINK), Image.Resampling.LANCZOS), dtype=np.float64)
    side = small.shape[0]
    plane = _light(small, max(2, side // 10))
    if centred:
        x0, y0 = (int(np.clip(round((size - side) / 2 + v), 0, size - side)) for v in rng.normal(0, 0.05 * size, 2))
    else:
        x0, y0 = (int(v) for v in rng.integers(0, size - side + 1, size=2))
    ys, xs = np.mgrid[0:size, 0:size]
    frame = plane[0] + plane[1] * (xs - x0)[..., None] + plane[2] * (ys - y0)[..., None]
    frame[y0 : y0 + side, x0 : x0 + side] = small
    return Image.fromarray((frame * _texture(image, mask)).clip(0, 255).astype(np.uint8))


CONDITIONS = {
    "good": None,
    "blur sigma 1": blur(1),
    "blur sigma 2": blur(2),
    "blur sigma 4": blur(4),
    "exposure x0.6": exposure(0.6),
    "exposure x0.3": exposure(0.3),
    "exposure x1.6": exposure(1.6),
    "exposure x2.5": exposure(2.5),
    "JPEG quality 10": "q10",
    "lesion < 5%, centred": lambda image, mask, rng: small_in_frame(image, mask, rng, True),
    "lesion < 5%, anywhere": lambda image, mask, rng: small_in_frame(image, mask, rng, False),
}
GOALS = {"good": "<= 3%", "blur sigma 4": ">= 90%", "exposure x0.3": ">= 90%", "exposure x2.5": ">= 90%",
         "non-skin (all)": ">= 90%"}  # fmt: skip


def lesion_photos(count: int, *, seed: int) -> list[Photo]:
    """Good held-out photos and every condition's version of each."""
    lesions = SyntheticLesions(count, size=SIZE, seed=seed)
    photos = []
    for index in range(count):
        lesion = lesions.lesion(index)
        tone = tone_of(seed, index, lesion.malignant)
        rng = np.random.default_rng([seed, index, 7])
        for name, change in CONDITIONS.items():
            share = float(lesion.mask.mean())
            if change is None:
                data = jpeg(lesion.image)
            elif change == "q10":
                data = jpeg(lesion.image, quality=10)
            else:
                data = jpeg(change(lesion.image, lesion.mask, rng))
                share = share * ((SIZE // SHRINK) / SIZE) ** 2 if name.startswith("lesion <") else share
            photos.append(Photo(name, data, int(lesion.malignant), tone, lesion_share=share))
    return photos


def _random_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    return tuple(int(v) for v in rng.integers(0, 256, size=3))


def texture(rng: np.random.Generator) -> Image.Image:
    """Per-pixel noise, smooth noise or stripes, in one or two random colours."""
    low, high = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    style = int(rng.integers(3))
    if style == 0:
        amount = rng.random((SIZE, SIZE))
    elif style == 1:
        cells = int(rng.integers(4, 33))
        grid = Image.fromarray(rng.random((cells, cells)).astype(np.float32), mode="F")
        amount = np.asarray(grid.resize((SIZE, SIZE), Image.Resampling.BICUBIC), dtype=np.float64).clip(0, 1)
    else:
        period, angle = rng.uniform(6, 40), rng.uniform(0, np.pi)
        yy, xx = np.mgrid[0:SIZE, 0:SIZE]
        amount = (np.sin((xx * np.cos(angle) + yy * np.sin(angle)) * 2 * np.pi / period) + 1) / 2
    pixels = low + (high - low) * amount[..., None]
    return Image.fromarray(pixels.clip(0, 255).astype(np.uint8))


def scene(rng: np.random.Generator) -> Image.Image:
    """A gradient between two random colours with 3-8 random shapes on it."""
    top, bottom = np.array(_random_colour(rng), float), np.array(_random_colour(rng), float)
    ramp = np.linspace(0, 1, SIZE)[:, None, None]
    image = Image.fromarray(np.repeat(top + (bottom - top) * ramp, SIZE, axis=1).astype(np.uint8))
    draw = ImageDraw.Draw(image)
    for _ in range(int(rng.integers(3, 9))):
        x0, y0 = rng.integers(-SIZE // 4, SIZE, size=2)
        w, h = rng.integers(SIZE // 10, SIZE // 2, size=2)
        box = (int(x0), int(y0), int(x0 + w), int(y0 + h))
        shape = int(rng.integers(3))
        if shape == 0:
            draw.ellipse(box, fill=_random_colour(rng))
        elif shape == 1:
            draw.rectangle(box, fill=_random_colour(rng))
        else:
            points = [tuple(int(v) for v in rng.integers(0, SIZE, size=2)) for _ in range(3)]
            draw.polygon(points, fill=_random_colour(rng))
    return image.filter(ImageFilter.GaussianBlur(rng.uniform(0, 1.5)))


def document(rng: np.random.Generator) -> Image.Image:
    """A page (white to cream) with lines of text in a dark ink, photographed slightly soft."""
    paper = tuple(int(v) for v in rng.integers(225, 256, size=3))
    page = Image.new("RGB", (SIZE, SIZE), paper)
    draw = ImageDraw.Draw(page)
    ink = tuple(int(v) for v in rng.integers(0, 80, size=3))
    words = ("patient", "referral", "lesion", "left", "forearm", "history", "of", "the", "and", "dermatology",
             "clinic", "date", "signed", "review", "changes", "size", "colour", "weeks")  # fmt: skip
    line_height = int(rng.integers(10, 18))
    for y in range(int(rng.integers(8, 30)), SIZE - 12, line_height):
        text = " ".join(words[int(i)] for i in rng.integers(0, len(words), size=8))
        draw.text((int(rng.integers(6, 30)), y), text, fill=ink)
    return page.filter(ImageFilter.GaussianBlur(rng.uniform(0, 0.8)))


def solid(rng: np.random.Generator) -> Image.Image:
    return Image.new("RGB", (SIZE, SIZE), _random_colour(rng))


NON_SKIN = {"texture": texture, "scene": scene, "document": document, "solid colour": solid}


def non_skin_photos(count: int, *, seed: int) -> list[Photo]:
    """`count` images of each kind."""
    photos = []
    for offset, (kind, make) in enumerate(NON_SKIN.items()):
        for index in range(count):
            image = make(np.random.default_rng([seed, offset, index]))
            photos.append(Photo("non-skin", jpeg(image), None, kind=kind))
    return photos


# --- the model and its gate, trained as the product trains -----------------------------------------


@dataclass
class Setup:
    arch: str
    input_size: int
    train: int
    test: int
    epochs: int
    good: int  # good held-out photos (each with every condition's version)
    non_skin: int  # images of each non-skin kind
    rounds: int  # batches timed for the cost, each way


FULL = Setup("resnet18", 128, 1200, 300, 4, 500, 60, 60)  # the demo's model (diagnosis.services.demo)
QUICK = Setup("resnet_tiny", 64, 400, 100, 3, 150, 25, 15)


def train(setup: Setup, seed: int):
    """The model and its gate through the product's pipeline, on a folder of synthetic photos."""
    config = TrainConfig(arch=setup.arch, input_size=setup.input_size, epochs=setup.epochs, seed=seed, lr=2e-3,
                         device="cpu")  # fmt: skip
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="quality-gate-") as folder:
        root = write_image_folder(Path(folder), splits={"train": setup.train, "test": setup.test}, size=SIZE,
                                  seed=seed)  # fmt: skip
        prepared = prepare_data(root, image_size=setup.input_size, seed=seed, progress=False, log=lambda _: None)
        result = train_candidate(prepared, config, progress=False, log=print)
        outcome = finalize(prepared, result, started=started)
    if outcome.quality_gate is None:
        raise SystemExit("the pipeline built no gate (too few training photos)")
    return outcome, time.perf_counter() - started


# --- the worker's way, photo by photo --------------------------------------------------------------


class Worker:
    """What a worker does with a batch of uploads (diagnosis.services.decoding and predictions), without
    Django: decode, the model's tensor, the feature thumbnail, its drift features and (with the gate) its
    quality measures; one forward pass with Grad-CAM and embeddings; then the OOD score and decide."""

    def __init__(self, outcome) -> None:
        self.predictor = Predictor(outcome.model, outcome.meta, device="cpu")
        self.gate = Gate.from_dict(outcome.quality_gate)
        self.side = decode_side(outcome.meta.input_size)

    def prepare(self, data: bytes, gated: bool):
        decoded = decode_image(data, max_side=self.side, copy_pixels=False)
        tensor = to_tensor(decoded.image, self.predictor.spec)
        thumbnail = feature_thumbnail(decoded.image)
        image_features(thumbnail)
        values = None
        if gated:
            values = {**measure(thumbnail), "resolution": float(min(decoded.full_width, decoded.full_height))}
        return tensor, values

    def batch(self, photos: list[bytes], gated: bool = True):
        prepared = [self.prepare(data, gated) for data in photos]
        found = self.predictor.predict_with_gradcam_tensors(torch.stack([tensor for tensor, _ in prepared]),
                                                            embeddings=True, upsample=False)  # fmt: skip
        results, _, embeddings = found[:3]
        if not gated:
            return results, None
        scores = self.gate.ood.scores(embeddings)
        decisions = [
            decide(probability=result.probability_malignant, threshold=result.threshold, gate=self.gate,
                   measures=values, ood_score=float(score), mode="strict")
            for result, (_, values), score in zip(results, prepared, scores, strict=True)
        ]  # fmt: skip
        return results, decisions

    def judge(self, photos: list[Photo], size: int = 8) -> None:
        """Each photo's outcome: refused or not, by which checks, the probability and whether the call
        (at the model's threshold) is right."""
        for start in range(0, len(photos), size):
            group = photos[start : start + size]
            results, decisions = self.batch([photo.data for photo in group])
            for photo, result, decision in zip(group, results, decisions, strict=True):
                failed = [f"{c['name']}:{c['direction']}" for c in decision.quality["checks"] if not c["passed"]]
                if not decision.quality["ood"]["passed"]:
                    failed.append("ood")
                call = result.probability_malignant >= result.threshold
                photo.outcome = {"refused": decision.decision == "not_assessable", "failed": failed,
                                 "probability": result.probability_malignant,
                                 "wrong": None if photo.label is None else call != bool(photo.label)}  # fmt: skip


def cost(worker: Worker, photos: list[bytes], rounds: int, size: int = 8) -> dict:
    """CPU seconds per image of a batch without and with the gate, alternating, torch on one thread (as
    each child of a worker); and the gate's own parts timed alone."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        batches = [photos[(i * size) % len(photos) :][:size] for i in range(rounds)]
        worker.batch(batches[0], gated=True)  # warm-up
        times = {False: [], True: []}
        for index, batch in enumerate(batches):
            for gated in (index % 2 == 0, index % 2 != 0):
                started = time.process_time()
                worker.batch(batch, gated=gated)
                times[gated].append((time.process_time() - started) / len(batch))
        thumbnails = [feature_thumbnail(decode_image(data, max_side=worker.side).image) for data in photos]
        started = time.process_time()
        values = [measure(thumbnail) for thumbnail in thumbnails]
        measuring = (time.process_time() - started) / len(thumbnails)
        embeddings = np.random.default_rng(0).normal(size=(size, len(worker.gate.ood.mean)))
        started = time.process_time()
        for _ in range(20):
            scores = worker.gate.ood.scores(embeddings)
            for value, score in zip(values[:size], scores, strict=True):
                decide(probability=0.5, threshold=0.5, gate=worker.gate, measures={**value, "resolution": 256.0},
                       ood_score=float(score))  # fmt: skip
        deciding = (time.process_time() - started) / (20 * size)
    finally:
        torch.set_num_threads(threads)
    plain, gated = float(np.median(times[False])), float(np.median(times[True]))
    return {"plain_ms": plain * 1000, "gated_ms": gated * 1000, "ratio": gated / plain,
            "measure_ms": measuring * 1000, "ood_decide_ms": deciding * 1000}  # fmt: skip


# --- the report -------------------------------------------------------------------------------------


def _share(count: int, total: int) -> str:
    return f"{100 * count / total:5.1f}%" if total else "    —"


def _error(photos: list[Photo]) -> str:
    return _share(sum(p.outcome["wrong"] for p in photos), len(photos)) + f" ({len(photos)})"


def _why(photos: list[Photo], limit: int = 4) -> str:
    counts: dict[str, int] = {}
    for photo in photos:
        for check in photo.outcome["failed"]:
            counts[check] = counts.get(check, 0) + 1
    top = sorted(counts.items(), key=lambda item: -item[1])[:limit]
    return ", ".join(f"{name} {100 * count / len(photos):.0f}%" for name, count in top) or "—"


def condition_rows(photos: list[Photo]) -> list[str]:
    """Per condition: photos, refused, the goal, the model's AUC and error on all its photos and its error
    on the passed and the refused ones, and which checks failed."""
    lines = [f"{'condition':<26}{'photos':>7}{'refused':>9}{'goal':>8}{'AUC':>7}{'error':>8}   {'error, passed':>14}"
             f" {'error, refused':>14}   failed checks (share of the condition's photos)"]  # fmt: skip
    groups = [(name, [p for p in photos if p.condition == name]) for name in CONDITIONS]
    non_skin = [p for p in photos if p.condition == "non-skin"]
    groups += [(f"non-skin: {kind}", [p for p in non_skin if p.kind == kind]) for kind in NON_SKIN]
    groups.append(("non-skin (all)", non_skin))
    for name, group in groups:
        refused = [p for p in group if p.outcome["refused"]]
        passed = [p for p in group if not p.outcome["refused"]]
        model = ("", "", "", "")
        if group[0].label is not None:
            auc = metrics.roc_auc([p.label for p in group], [p.outcome["probability"] for p in group])
            wrong = sum(p.outcome["wrong"] for p in group)
            model = (f"{auc:.3f}", _share(wrong, len(group)), _error(passed), _error(refused))
        lines.append(f"{name:<26}{len(group):>7}{_share(len(refused), len(group)):>9}{GOALS.get(name, ''):>8}"
                     f"{model[0]:>7}{model[1]:>8}   {model[2]:>14} {model[3]:>14}   {_why(group)}")  # fmt: skip
    return lines


def tone_rows(photos: list[Photo]) -> list[str]:
    good = [p for p in photos if p.condition == "good"]
    lines = ["Good photos refused, by skin tone (mlcore.data._SKIN_TONES):"]
    for tone, colour in enumerate(_SKIN_TONES):
        group = [p for p in good if p.tone == tone]
        refused = [p for p in group if p.outcome["refused"]]
        lines.append(f"  tone {tone} {tuple(int(c) for c in colour)!s:<16}{len(refused):>4} of {len(group):<5}"
                     f"{_share(len(refused), len(group))}   {_why(group, 3) if refused else ''}")  # fmt: skip
    return lines


def small_rows(photos: list[Photo]) -> list[str]:
    small = [p for p in photos if p.condition.startswith("lesion <")]
    lines = ["Lesion under 5% of the frame, refused by the lesion's true share of the frame:"]
    for low, high in ((0, 0.005), (0.005, 0.01), (0.01, 0.02), (0.02, 0.05)):
        for centred in (True, False):
            name = "lesion < 5%, centred" if centred else "lesion < 5%, anywhere"
            group = [p for p in small if low <= p.lesion_share < high and (p.condition == name)]
            refused = sum(p.outcome["refused"] for p in group)
            lines.append(f"  {name:<24}{100 * low:4.1f}–{100 * high:.1f}%: {refused:>4} of {len(group):<5}"
                         f"{_share(refused, len(group))}")  # fmt: skip
    return lines


def model_rows(photos: list[Photo]) -> list[str]:
    """The model on the lesion photos of every condition, with their true labels: AUC (95% bootstrap
    interval) and error at the model's threshold (95% normal interval), on all, passed and refused."""
    lesions = [p for p in photos if p.label is not None]
    groups = {"all": lesions, "passed": [p for p in lesions if not p.outcome["refused"]],
              "refused": [p for p in lesions if p.outcome["refused"]],
              "good only": [p for p in lesions if p.condition == "good"]}  # fmt: skip
    lines = ["The model on every lesion photo (good and damaged, true labels; error at the model's threshold):",
             f"  {'':<11}{'photos':>7}   {'AUC (95% CI)':<22}{'error (95% CI)':<22}"]  # fmt: skip
    rates = {}
    for name, group in groups.items():
        labels = [p.label for p in group]
        scores = [p.outcome["probability"] for p in group]
        auc = "—"
        if len(set(labels)) == 2:
            low, high = metrics.bootstrap_auc_interval(labels, scores, n_resamples=300)
            auc = f"{metrics.roc_auc(labels, scores):.3f} ({low:.3f}–{high:.3f})"
        rate = float(np.mean([p.outcome["wrong"] for p in group])) if group else float("nan")
        rates[name] = (rate, len(group))
        half = 1.96 * np.sqrt(rate * (1 - rate) / max(len(group), 1))
        lines.append(f"  {name:<11}{len(group):>7}   {auc:<22}{100 * rate:.1f}% (±{100 * half:.1f})")
    (refused, n_refused), (passed, n_passed) = rates["refused"], rates["passed"]
    if n_refused and n_passed:
        spread = 1.96 * np.sqrt(refused * (1 - refused) / n_refused + passed * (1 - passed) / n_passed)
        gap = refused - passed
        lines.append(f"  error on refused minus on passed: {100 * gap:+.1f} points (95% CI {100 * (gap - spread):+.1f} "
                     f"to {100 * (gap + spread):+.1f})")  # fmt: skip
    return lines


def cost_rows(costs: dict[str, dict]) -> list[str]:
    lines = ["CPU per image in a batch of 8 (torch on 1 thread; median over the batches, alternating):",
             f"  {'photos':<44}{'no gate':>10}{'gate':>10}{'ratio':>8}{'measure':>10}{'OOD+decide':>12}"]  # fmt: skip
    for name, c in costs.items():
        lines.append(f"  {name:<44}{c['plain_ms']:>8.2f}ms{c['gated_ms']:>8.2f}ms{c['ratio']:>8.3f}"
                     f"{c['measure_ms']:>8.2f}ms{c['ood_decide_ms']:>10.3f}ms")  # fmt: skip
    return lines


def gate_rows(outcome, seconds: float, setup: Setup) -> list[str]:
    gate = outcome.quality_gate
    validation = outcome.meta.metrics.get("validation", {})
    thresholds = ", ".join(f"{key} {value:.4g}" for key, value in gate["thresholds"].items())
    return [
        f"Model: {setup.arch}, {setup.input_size} px, trained by mlcore.pipeline on {setup.train} + {setup.test} "
        f"synthetic photos ({SIZE} px JPEG), {setup.epochs} epochs, in {seconds:.0f} s; validation AUC "
        f"{validation.get('auc', float('nan')):.3f}, threshold {outcome.meta.threshold:.3f}.",
        f"Gate (TrainingOutcome.quality_gate), from {gate['reference_photos']} training photos: {thresholds}; "
        f"OOD threshold {gate['ood']['threshold']:.3f} ({100 * gate['ood']['false_flag']:.0f}% of "
        f"{gate['ood']['held_out']} held-out photos); band {gate['band'][0]:.3f}–{gate['band'][1]:.3f}.",
    ]


def upscaled(photos: list[bytes], side: int) -> list[bytes]:
    """Larger JPEGs of the same photos (a phone's size), which the worker decodes in draft mode."""
    return [jpeg(Image.open(io.BytesIO(data)).resize((side, side), Image.Resampling.BICUBIC), 90) for data in photos]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a small model and fewer photos (about 3 minutes)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=ROOT / "bench" / "results" / "quality-gate.txt")
    args = parser.parse_args()
    setup = QUICK if args.quick else FULL
    started = time.perf_counter()
    outcome, seconds = train(setup, args.seed)
    print(f"trained in {seconds:.0f} s", flush=True)
    photos = lesion_photos(setup.good, seed=args.seed + 1000) + non_skin_photos(setup.non_skin, seed=args.seed + 2000)
    worker = Worker(outcome)
    worker.judge(photos)
    print(f"judged {len(photos)} photos at {time.perf_counter() - started:.0f} s", flush=True)
    good = [p.data for p in photos if p.condition == "good"][:64]
    costs = {
        f"{SIZE} px JPEG (the good photos above)": cost(worker, good, setup.rounds),
        "2048 px JPEG (16 of them upscaled; draft decode)": cost(worker, upscaled(good[:16], 2048), setup.rounds),
    }
    lines = [f"Photo-quality gate (issue 20): .venv/bin/python bench/quality_gate.py{' --quick' if args.quick else ''}"
             f" (seed {args.seed}, {time.strftime('%Y-%m-%d')}, {time.perf_counter() - started:.0f} s)", "",
             *gate_rows(outcome, seconds, setup), "", *condition_rows(photos), "", *tone_rows(photos), "",
             *small_rows(photos), "", *model_rows(photos), "", *cost_rows(costs)]  # fmt: skip
    text = "\n".join(lines) + "\n"
    print(text)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)


if __name__ == "__main__":
    main()
