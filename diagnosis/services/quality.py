"""The photo-quality gate in service (issue 20): a model version's stored gate (mlcore.gate), parsed
once per process with the settings' overrides, and the decision for each photo of a worker's batch:
its quality measures (taken in the decode step), its out-of-distribution score (from the embedding the
batch's forward pass already made), the refer-when-unsure band and, where it ran, test-time
augmentation."""

from __future__ import annotations

import threading

from django.conf import settings

from mlcore.gate import LEGACY_NOTE, Decision, Gate, decide

from ..models import ModelVersion, QualityCheck

__all__ = ["LEGACY_NOTE", "augmentation_enabled", "decisions_for", "gate_for"]

_lock = threading.Lock()
_gates: dict[tuple, Gate | None] = {}


def gate_for(model_version: ModelVersion) -> Gate | None:
    """The version's gate with QUALITY_GATE_OVERRIDES applied, or None for a version registered before
    the gate (its photos are measured, never refused). Parsed once per process and version."""
    overrides = dict(settings.QUALITY_GATE_OVERRIDES or {})
    key = (model_version.pk, model_version.weights_sha256, repr(sorted(overrides.items())))
    with _lock:
        if key not in _gates:
            _gates[key] = Gate.from_dict(model_version.quality_gate, overrides)
        return _gates[key]


def augmentation_enabled(device) -> bool:
    """TEST_TIME_AUGMENTATION: "on", "off", or "auto" (on a GPU only: on the CPU the three more views
    would cost three more forward passes per photo)."""
    choice = settings.TEST_TIME_AUGMENTATION
    return choice == "on" or (choice == "auto" and getattr(device, "type", "cpu") == "cuda")


def decisions_for(images, measures, results, embeddings, model_version: ModelVersion, augmented=None) -> list[Decision]:
    """One Decision per image of a batch. `measures`: each photo's mlcore.quality measures, or None where
    they could not be taken (then only the OOD score and the band judge it); the resolution is always
    the photo's own shorter side, as uploaded."""
    gate = gate_for(model_version)
    scores = [None] * len(images)
    ood = gate.ood if gate is not None else None
    if ood is not None and embeddings is not None and len(images) and len(embeddings[0]) == len(ood.mean):
        scores = [float(score) for score in ood.scores(embeddings)]
    decisions = []
    for index, (image, values, result) in enumerate(zip(images, measures, results, strict=True)):
        values = {**values, "resolution": float(min(image.width, image.height))} if values else None
        views = [] if augmented is None else [float(p) for p in augmented[index]]
        decisions.append(
            decide(probability=result.probability_malignant, threshold=result.threshold, gate=gate, measures=values,
                   ood_score=scores[index], augmented=views, mode=image.quality_check or QualityCheck.STRICT)
        )  # fmt: skip
    return decisions
