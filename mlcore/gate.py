"""Safe at the point of capture (issue 20): the out-of-distribution score of a photo's embedding, the
"refer when unsure" band around the operating threshold, and the decision that puts them together
with the photo-quality verdict (mlcore.quality). Plain NumPy: no Django, no torch.

A model version's gate is one JSON-able dict, computed at training (`build_gate`) and stored with the
version beside its drift reference set:

    {"version": 1, "false_refusal": 0.02, "reference_photos": N,
     "thresholds": {"focus:low": ..., ...},                       # mlcore.quality.calibrate
     "ood": {"mean": [...], "components": [[...]], "variances": [...], "residual": r, "threshold": t,
             "false_flag": 0.02, "held_out": M},
     "band": [low, high], "band_source": "..."}

A version registered before the gate has none: its photos are measured and reported, never refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from . import metrics, quality

GATE_VERSION = 1
OOD_COMPONENTS = 16
OOD_FALSE_FLAG = 0.02
OOD_ADVICE = (
    "this does not look like the photos this model was trained on: photograph the lesion itself, close up, "
    "in even light"
)
UNCERTAIN_ADVICE = "uncertain: specialist review recommended"
BAND_MAX_SHARE = 0.2  # the band never holds more than this share of the validation cases
BAND_MIN_LOGIT = 0.1  # ... and is at least this wide on each side, in log-odds
DECISIONS = ("above_threshold", "below_threshold", "uncertain", "not_assessable")


# --- out of distribution ----------------------------------------------------------------------------


@dataclass
class OodReference:
    """Mahalanobis distance in the principal subspace of the training embeddings, plus the distance off it:
    score = sqrt((sum_i z_i^2 / var_i) / k + |residual|^2 / residual), where `residual` is the training
    set's mean squared distance off the subspace. A training photo scores about 1.4; an unlike one far
    more. The threshold is the held-out photos' quantile at 1 - false_flag."""

    mean: np.ndarray
    components: np.ndarray  # k x d
    variances: np.ndarray  # k
    residual: float
    threshold: float | None = None

    @classmethod
    def fit(cls, embeddings: np.ndarray, components: int = OOD_COMPONENTS) -> OodReference:
        data = np.asarray(embeddings, dtype=np.float64)
        if len(data) < 3:
            raise ValueError(f"the out-of-distribution reference needs at least 3 training photos, not {len(data)}")
        mean = data.mean(axis=0)
        centred = data - mean
        _, singular, vt = np.linalg.svd(centred, full_matrices=False)
        k = max(1, min(components, len(data) - 1, vt.shape[0]))
        variances = np.maximum(singular[:k] ** 2 / (len(data) - 1), 1e-9)
        basis = vt[:k]
        off = centred - (centred @ basis.T) @ basis
        residual = max(float((off**2).sum(axis=1).mean()), 1e-9)
        return cls(mean, basis, variances, residual)

    def scores(self, embeddings: np.ndarray) -> np.ndarray:
        data = np.atleast_2d(np.asarray(embeddings, dtype=np.float64)) - self.mean
        projected = data @ self.components.T
        off = data - projected @ self.components
        inside = (projected**2 / self.variances).sum(axis=1) / len(self.variances)
        return np.sqrt(inside + (off**2).sum(axis=1) / self.residual)

    def calibrate(self, held_out: np.ndarray, false_flag: float = OOD_FALSE_FLAG) -> OodReference:
        if len(held_out) < 1:
            raise ValueError("the out-of-distribution threshold needs held-out photos")
        self.threshold = float(np.quantile(self.scores(held_out), 1 - false_flag))
        return self

    def to_dict(self, *, false_flag: float, held_out: int) -> dict:
        # float32 precision: the row stays about half the size, and the score does not need more.
        return {"mean": _rounded(self.mean), "components": [_rounded(row) for row in self.components],
                "variances": _rounded(self.variances), "residual": float(self.residual),
                "threshold": self.threshold, "false_flag": false_flag, "held_out": held_out}  # fmt: skip

    @classmethod
    def from_dict(cls, data: Mapping) -> OodReference:
        return cls(np.asarray(data["mean"], dtype=np.float64), np.asarray(data["components"], dtype=np.float64),
                   np.asarray(data["variances"], dtype=np.float64), float(data["residual"]),
                   data.get("threshold"))  # fmt: skip


def _rounded(values) -> list[float]:
    return [float(value) for value in np.asarray(values, dtype=np.float32)]


# --- refer when unsure ------------------------------------------------------------------------------


def _logit(p):
    p = np.clip(np.asarray(p, dtype=np.float64), 1e-6, 1 - 1e-6)
    return np.log(p / (1 - p))


def _sigmoid(x) -> float:
    return float(1 / (1 + np.exp(-x)))


def uncertain_band(labels, scores, threshold: float, *, target_sensitivity: float, resamples: int = 200,
                   seed: int = 0) -> tuple[float, float]:  # fmt: skip
    """The band of probabilities where the call is unsure: the 90% interval of the operating threshold
    over bootstrap resamples of the validation set (where a threshold set on other, equally likely data
    would fall), in log-odds around the threshold, at least BAND_MIN_LOGIT wide on each side and
    narrowed, evenly in log-odds, until it holds at most BAND_MAX_SHARE of the validation cases."""
    labels = np.asarray(labels).astype(bool)
    scores = np.asarray(scores, dtype=np.float64)
    centre = float(_logit(threshold))
    rng = np.random.default_rng(seed)
    found = []
    for _ in range(resamples):
        pick = rng.integers(0, len(scores), len(scores))
        if labels[pick].any():
            found.append(metrics.threshold_for_sensitivity(labels[pick], scores[pick], target_sensitivity))
    spread = _logit(np.quantile(found, [0.05, 0.95])) - centre if found else np.array([-0.5, 0.5])
    below, above = max(-float(spread[0]), BAND_MIN_LOGIT), max(float(spread[1]), BAND_MIN_LOGIT)
    distance = _logit(scores) - centre
    for _ in range(60):
        if np.mean((distance > -below) & (distance < above)) <= BAND_MAX_SHARE:
            break
        if min(below, above) <= BAND_MIN_LOGIT / 4:
            break
        below, above = below * 0.9, above * 0.9
    return _sigmoid(centre - below), _sigmoid(centre + above)


# --- the gate at training ---------------------------------------------------------------------------


def build_gate(*, reference_measures: Sequence[Mapping[str, float]], train_embeddings: np.ndarray,
               held_out_embeddings: np.ndarray, validation_labels, validation_scores, threshold: float,
               target_sensitivity: float, input_size: int, false_refusal: float = quality.FALSE_REFUSAL,
               false_flag: float = OOD_FALSE_FLAG) -> dict:  # fmt: skip
    """A model version's gate (see the module's docstring) from its training photos' quality measures
    and embeddings, held-out photos' embeddings and the validation set's calibrated scores."""
    ood = OodReference.fit(train_embeddings).calibrate(held_out_embeddings, false_flag)
    band = uncertain_band(validation_labels, validation_scores, threshold, target_sensitivity=target_sensitivity)
    return {
        "version": GATE_VERSION,
        "false_refusal": false_refusal,
        "reference_photos": len(reference_measures),
        "thresholds": quality.calibrate(reference_measures, false_refusal=false_refusal, min_resolution=input_size),
        "ood": ood.to_dict(false_flag=false_flag, held_out=len(held_out_embeddings)),
        "band": [band[0], band[1]],
        "band_source": f"90% bootstrap interval of the threshold on {len(validation_scores)} validation photos",
    }


# --- the decision for one photo ---------------------------------------------------------------------


@dataclass
class Decision:
    decision: str  # one of DECISIONS
    assessable: bool
    ood_score: float | None
    quality: dict = field(default_factory=dict)

    @property
    def reasons(self) -> list[str]:
        return list(self.quality.get("reasons", []))


@dataclass
class Gate:
    """A stored gate, parsed once (the OOD reference as arrays), with settings' overrides applied."""

    thresholds: dict[str, float]
    ood: OodReference | None
    band: tuple[float, float] | None

    @classmethod
    def from_dict(cls, data: Mapping | None, overrides: Mapping | None = None) -> Gate | None:
        if not data or data.get("version") != GATE_VERSION:
            return None  # none, or calibrated on other measures' scales: measured, not judged
        overrides = dict(overrides or {})
        thresholds = {**data.get("thresholds", {}),
                      **{k: float(v) for k, v in overrides.items() if k not in ("ood", "band")}}  # fmt: skip
        ood = OodReference.from_dict(data["ood"]) if data.get("ood") else None
        if ood is not None and "ood" in overrides:
            ood.threshold = float(overrides["ood"])
        band = overrides.get("band", data.get("band"))
        return cls(thresholds, ood, (float(band[0]), float(band[1])) if band else None)


LEGACY_NOTE = (
    "This model version was registered before the photo-quality gate (or with an older gate), so photos are "
    "measured but not checked. Register a model trained by this version of the service to check them."
)


def decide(
    *, probability: float, threshold: float, gate: Gate | None, measures: Mapping[str, float] | None,
    ood_score: float | None = None, augmented: Sequence[float] = (), mode: str = "strict",
) -> Decision:  # fmt: skip
    """Put the quality verdict, the OOD score and the refer-when-unsure band together for one photo.
    `augmented`: the probabilities of the photo's test-time augmentations, when they ran."""
    band = gate.band if gate else None
    verdict = quality.assess(measures, gate.thresholds if gate else {}, mode=mode) if measures else None
    ood_threshold = gate.ood.threshold if gate and gate.ood else None
    ood_failed = ood_score is not None and ood_threshold is not None and ood_score > ood_threshold
    reasons = list(verdict.reasons) if verdict else []
    if ood_failed and mode != "off":
        reasons.append(OOD_ADVICE)
    disagree = bool(augmented) and any((p >= threshold) != (probability >= threshold) for p in augmented)
    assessable = not reasons
    if not assessable:
        decision = "not_assessable"
    elif (band and band[0] < probability < band[1]) or disagree:
        decision = "uncertain"
    else:
        decision = "above_threshold" if probability >= threshold else "below_threshold"
    report = {
        "gate": "off" if gate is None else mode,
        "checks": [check.as_dict() for check in verdict.checks] if verdict else [],
        "reasons": reasons,
        "warnings": (list(verdict.warnings) if verdict else [])
        + ([OOD_ADVICE] if ood_failed and mode == "off" else []),
        "ood": {"score": ood_score, "threshold": ood_threshold, "passed": not ood_failed},
        "band": list(band) if band else None,
        "augmented": [float(p) for p in augmented],
        "note": LEGACY_NOTE if gate is None else "",
    }
    if decision == "uncertain":
        report["advice"] = UNCERTAIN_ADVICE
    return Decision(decision, assessable, ood_score, report)
