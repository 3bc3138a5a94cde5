"""A trained model's test report: the clinical metrics of the malignancy probability at the operating
threshold, every diagnosis's for a model with several, the leakage checks side by side (near-duplicate
photos by pHash, and lesions or patients on both sides by their ids), and performance per subgroup: skin
tone, body site, sex and age band (mlcore.subgroups)."""

from __future__ import annotations

from typing import Any

import numpy as np
from torch import nn

from . import metrics, plots, subgroups
from .datasets import ImageFolderData, LoadedSplit
from .leakage import find_near_duplicates
from .model import CheckpointMeta
from .preprocessing import TransformSpec
from .tables import group_overlap
from .train import predict_logits


def evaluate_split(model: nn.Module, meta: CheckpointMeta, split: LoadedSplit, *, bootstrap: int = 1000) -> dict:
    """The full metrics table on one labelled split, with calibration before and after."""
    spec = TransformSpec(meta.input_size, meta.mean, meta.std)
    logits = predict_logits(model, split.pairs(), spec)
    labels = np.isin(split.labels, meta.malignant_indices)
    probabilities = metrics.softmax(logits, meta.temperature)
    calibrated = meta.malignant_probability(probabilities)
    raw = meta.malignant_probability(metrics.softmax(logits))
    report = metrics.full_report(labels, calibrated, meta.threshold, bootstrap=bootstrap)
    report["ece_before_calibration"] = metrics.expected_calibration_error(labels, raw)
    if not meta.binary:
        report["diagnoses"] = metrics.multiclass_report(split.labels, probabilities, meta.class_names)
    report["_scores"] = {"labels": labels, "raw": raw, "calibrated": calibrated, "probabilities": probabilities}
    return report


def evaluate_on_test(model: nn.Module, meta: CheckpointMeta, data: ImageFolderData) -> tuple[dict, dict[str, bytes]]:
    """The test set's report (evaluate_split), again without the test photos that have a near-duplicate in
    training, the leakage checks, the subgroup table, and the figures (PNG bytes by name)."""
    test = evaluate_split(model, meta, data.test)
    scores = test.pop("_scores")
    leakage, duplicated = leakage_report(data)
    evaluation: dict[str, Any] = {"test": test, "leakage": leakage, "test_deduplicated": None}
    if duplicated:
        remaining = data.test.subset(sorted(set(range(len(data.test.items))) - set(duplicated)))
        if 0 < np.isin(remaining.labels, meta.malignant_indices).sum() < len(remaining.items):
            deduplicated = evaluate_split(model, meta, remaining)
            deduplicated.pop("_scores")
            evaluation["test_deduplicated"] = deduplicated
    else:
        evaluation["test_deduplicated"] = {key: value for key, value in test.items()}
    evaluation["subgroups"] = subgroup_report(data.test, scores["labels"], scores["calibrated"], meta.threshold)
    figures = {
        "roc": plots.roc_plot(scores["labels"], scores["calibrated"], meta.threshold),
        "precision_recall": plots.precision_recall_plot(scores["labels"], scores["calibrated"]),
        "reliability": plots.reliability_plot(scores["labels"], scores["raw"], scores["calibrated"]),
        "training_curves": plots.training_curves_plot(meta.training.get("history", [])),
        "subgroups_skin_tone": subgroups.subgroup_plot_png(evaluation["subgroups"], "skin_tone"),
    }
    if "diagnoses" in test:
        figures["confusion_matrix"] = plots.confusion_matrix_plot(
            test["diagnoses"]["confusion_matrix"], meta.class_names
        )
    return evaluation, figures


def leakage_report(data: ImageFolderData) -> tuple[dict, list[int]]:
    """The two leakage checks side by side, and the indices of the test photos with a near-duplicate.

    - near_duplicates_in_train: test photos with a near-duplicate anywhere in training (train + validation),
      by pHash and thumbnail (mlcore.leakage): copies, resized or re-encoded;
    - groups: lesions and patients on both sides, by the table's ids (mlcore.tables.group_overlap): a second
      photo of the same lesion, which no image check can tell from another lesion. None for an image folder,
      which has no ids."""
    duplicates = find_near_duplicates(
        [item.fingerprint for item in data.test.items], [item.fingerprint for item in data.train.items]
    )
    report = {
        "test_images": len(data.test.items),
        "near_duplicates_in_train": duplicates.count,
        "examples": [
            {"test": data.test.items[t].path, "train": data.train.items[r].path, "hamming": h, "difference": d}
            for t, r, h, d in zip(
                duplicates.test_indices[:20], duplicates.train_indices[:20], duplicates.hamming[:20],
                duplicates.thumbnail_difference[:20], strict=True,
            )
        ],
        "groups": None,
    }  # fmt: skip
    if data.grouped:
        # Counts only: an in-house patient id may be a record number, and this report travels with the model.
        report["groups"] = group_overlap(
            [i.record for i in data.train.items], [i.record for i in data.test.items], examples=0
        )
    return report, list(duplicates.test_indices)


def subgroup_columns(split: LoadedSplit) -> dict[str, list]:
    """Each photo's skin-tone band, body site, sex and age band (None where unknown)."""
    return {
        "skin_tone": [item.skin["band"] if item.skin else None for item in split.items],
        "site": [item.attribute("site") for item in split.items],
        "sex": [item.attribute("sex") for item in split.items],
        "age_band": [subgroups.age_band(item.attribute("age")) for item in split.items],
    }


def subgroup_report(split: LoadedSplit, labels, scores, threshold: float, *, bootstrap: int = 1000) -> dict:
    """mlcore.subgroups.subgroup_report of one split, with the gaps sensitivity_gaps finds at its defaults."""
    report = subgroups.subgroup_report(labels, scores, threshold, subgroup_columns(split), bootstrap=bootstrap)
    report["gaps"] = subgroups.sensitivity_gaps(report)
    return report
