"""From a labelled folder to an evaluated, calibrated checkpoint: the training pipeline behind
`manage.py train_model`, framework-free so it can run anywhere."""

from __future__ import annotations

import dataclasses
import itertools
import platform
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy
import numpy as np
import PIL
import torch
from torch import nn

from . import drift, gate, metrics
from .datasets import DataError, ImageFolderData, LoadedSplit, stratified_split
from .evaluation import evaluate_on_test
from .model import CheckpointMeta, resnet_features
from .preprocessing import TransformSpec, to_tensor
from .sources import load_data
from .tables import group_split
from .train import TrainConfig, TrainResult, train_classifier

VALIDATION_FRACTION = 0.10
METRIC_ROWS = (
    ("n", "cases", "{:d}"),
    ("n_positive", "malignant cases", "{:d}"),
    ("auc", "AUC", "{:.3f}"),
    ("auc_ci95", "AUC 95% CI", "{:.3f}–{:.3f}"),
    ("accuracy", "accuracy", "{:.3f}"),
    ("sensitivity", "sensitivity", "{:.3f}"),
    ("specificity", "specificity", "{:.3f}"),
    ("ppv", "PPV", "{:.3f}"),
    ("npv", "NPV", "{:.3f}"),
    ("ece_before_calibration", "ECE before calibration", "{:.3f}"),
    ("ece", "ECE (calibrated)", "{:.3f}"),
    ("confusion", "TP / FP / TN / FN", "{tp} / {fp} / {tn} / {fn}"),
)


@dataclass
class PreparedData:
    data: ImageFolderData
    train: LoadedSplit
    validation: LoadedSplit


@dataclass
class TrainingOutcome:
    result: TrainResult
    evaluation: dict[str, Any]
    plots: dict[str, bytes]
    reference_features: list[dict[str, Any]]
    provenance: dict[str, Any]
    drift_projection: dict[str, Any] | None = None
    quality_gate: dict[str, Any] | None = None  # mlcore.gate.build_gate

    @property
    def model(self) -> nn.Module:
        return self.result.model

    @property
    def meta(self) -> CheckpointMeta:
        return self.result.meta


def prepare_data(
    source, *, image_size: int, seed: int, progress: bool = True, log: Callable[[str], None] = print
) -> PreparedData:
    """Load an image folder (a path) or a metadata table (mlcore.sources.TableSource) and split 10% of its
    training images off for validation: whole lesions and patients when the images carry their ids, else
    stratified by class as before."""
    data = load_data(source, image_size=image_size, seed=seed, progress=progress, log=log)
    if data.grouped:
        kept, held = group_split(data.train.labels, data.train.groups, VALIDATION_FRACTION, seed)
    else:
        kept, held = stratified_split(data.train.labels, VALIDATION_FRACTION, seed)
    prepared = PreparedData(data, data.train.subset(kept), data.train.subset(held))
    _check_split(prepared, log)
    return prepared


def _check_split(prepared: PreparedData, log: Callable[[str], None]) -> None:
    """Training needs every class; validation (early stopping, the temperature and the threshold on the
    malignancy probability) needs malignant and benign cases. A rare diagnosis missing from validation is
    only said: with whole lesions held out, a small set cannot always spare one."""
    data = prepared.data
    missing = [c for i, c in enumerate(data.class_names) if i not in set(prepared.train.labels.tolist())]
    if missing:
        raise DataError(
            f"The training part of the training set has no {', '.join(missing)} images after the 10% validation "
            "split; each class needs at least two readable training images (two lesions when grouped)."
        )
    malignant = [data.class_names.index(name) for name in data.malignant] or [len(data.class_names) - 1]
    is_malignant = np.isin(prepared.validation.labels, malignant)
    if len(data.class_names) == 2 or not (is_malignant.any() and not is_malignant.all()):
        missing = [c for i, c in enumerate(data.class_names) if i not in set(prepared.validation.labels.tolist())]
        if missing:
            raise DataError(
                f"The validation part of the training set has no {', '.join(missing)} images after the 10% "
                "validation split; each class needs at least two readable training images (two lesions when grouped)."
            )
    absent = [c for i, c in enumerate(data.class_names) if i not in set(prepared.validation.labels.tolist())]
    if absent:
        log(f"Validation has no {', '.join(absent)} images (too few lesions to spare); it still has malignant and "
            "benign ones for the threshold.")  # fmt: skip


def train_candidate(
    prepared: PreparedData,
    config: TrainConfig,
    *,
    progress: bool = True,
    on_improve: Callable[[nn.Module, CheckpointMeta], None] | None = None,
    log: Callable[[str], None] | None = None,
) -> TrainResult:
    data = prepared.data
    config = dataclasses.replace(config, class_names=data.class_names)
    if data.malignant:  # a table: its malignant set, the first of them as the positive class
        config = dataclasses.replace(config, malignant_classes=data.malignant, positive_class=data.malignant[0])
    return train_classifier(
        prepared.train.pairs(), prepared.validation.pairs(), config, progress=progress, on_improve=on_improve,
        log=log,
    )  # fmt: skip


def reference_features(model: nn.Module, meta: CheckpointMeta, prepared: PreparedData):
    """The drift reference set: the features of every training, validation and test image, the
    model's calibrated probability on it, and its embedding projected on the first principal
    components of the training set's embeddings; returned with the projection and each split's (logits,
    embeddings), which the quality gate is calibrated on."""
    spec = TransformSpec(meta.input_size, meta.mean, meta.std)
    splits = (("train", prepared.train), ("validation", prepared.validation), ("test", prepared.data.test))
    outputs = {name: logits_and_embeddings(model, split.pairs(), spec) for name, split in splits if split.items}
    projection = drift.Projection.fit(outputs["train"][1]) if "train" in outputs else None
    rows = []
    for split_name, split in splits:
        if not split.items:
            continue
        logits, embeddings = outputs[split_name]
        probabilities = meta.malignant_probability(metrics.softmax(logits, meta.temperature))
        projected = projection.transform(embeddings) if projection else None
        for index, (item, probability) in enumerate(zip(split.items, probabilities, strict=True)):
            features = {**item.features, "probability_malignant": float(probability)}
            if item.skin is not None and item.skin.get("ita") is not None:
                features["skin_ita"] = float(item.skin["ita"])  # the skin-tone mix against uploads
            if projected is not None:
                features.update(zip(drift.EMBEDDING_FEATURES, map(float, projected[index]), strict=False))
            rows.append(
                {"path": item.path, "split": split_name, "label": prepared.data.class_names[item.label],
                 "features": features}
            )  # fmt: skip
    return rows, projection.to_dict() if projection else None, outputs


@torch.no_grad()
def logits_and_embeddings(model: nn.Module, items, spec: TransformSpec, batch_size: int = 64):
    """Logits and the penultimate layer's pooled features (the embedding) of each image."""
    model.eval()
    device = next(model.parameters()).device
    logits, embeddings = [], []
    for start in range(0, len(items), batch_size):
        batch = torch.stack([to_tensor(image, spec) for image, _ in items[start : start + batch_size]]).to(device)
        pooled = torch.flatten(model.avgpool(resnet_features(model, batch)), 1).float()
        logits.append(model.fc(pooled).float().cpu().numpy())
        embeddings.append(pooled.cpu().numpy())
    return np.concatenate(logits).astype(np.float64), np.concatenate(embeddings).astype(np.float64)


def library_versions() -> dict[str, str]:
    import torch
    import torchvision

    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),
        "torchvision": str(torchvision.__version__),
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
    }


def finalize(
    prepared: PreparedData, result: TrainResult, *, started: float, extra_provenance: dict[str, Any] | None = None
) -> TrainingOutcome:
    evaluation, figures = evaluate_on_test(result.model, result.meta, prepared.data)
    data = prepared.data
    counts = {
        split: {name: int((labels == index).sum()) for index, name in enumerate(data.class_names)}
        for split, labels in (
            ("train", prepared.train.labels), ("validation", prepared.validation.labels), ("test", data.test.labels)
        )
    }  # fmt: skip
    provenance = {
        "config": result.meta.training.get("config", {}),
        "data": {
            "directory": str(data.root),
            "source": data.source or str(data.root),
            "class_names": list(data.class_names),
            "malignant_classes": list(result.meta.malignant_classes),
            "grouped_splits": data.grouped,
            "skipped_rows": data.skipped_rows[:100],
            "file_list_sha256": data.file_list_sha256,
            "counts": counts,
            "test_split_made": data.test_split_made,
            "skipped": [{"path": path, "reason": reason} for path, reason in data.skipped],
        },
        "libraries": library_versions(),
        "platform": platform.platform(),
        "device": result.meta.training.get("device"),
        "duration_seconds": round(time.perf_counter() - started, 1),
        "interrupted": result.interrupted,
        **(extra_provenance or {}),
    }
    result.meta.metrics = {
        "validation": result.meta.metrics.get("validation", {}),
        "test": _jsonable(evaluation["test"]),
        "test_deduplicated": _jsonable(evaluation["test_deduplicated"]),
        "leakage": _jsonable(evaluation["leakage"]),
        "subgroups": _jsonable(evaluation["subgroups"]),
    }
    result.meta.training["provenance"] = provenance
    rows, projection, outputs = reference_features(result.model, result.meta, prepared)
    return TrainingOutcome(result, evaluation, figures, rows, provenance, projection,
                           quality_gate(result.meta, prepared, outputs))  # fmt: skip


def quality_gate(meta: CheckpointMeta, prepared: PreparedData, outputs: dict) -> dict[str, Any] | None:
    """The model version's photo-quality and out-of-distribution gate (mlcore.gate): the quality thresholds
    from the training photos, the OOD reference from their embeddings with its threshold on the held-out
    (validation and test) photos, and the refer-when-unsure band from the validation scores. None when
    the data are too few to calibrate it (fewer than 20 training photos): the gate is then off."""
    measures = [item.quality for item in prepared.train.items if item.quality]
    held_out = [outputs[name][1] for name in ("validation", "test") if name in outputs]
    if len(measures) < 20 or not held_out or "validation" not in outputs:
        return None
    logits = outputs["validation"][0]
    scores = meta.malignant_probability(metrics.softmax(logits, meta.temperature))
    target = float(meta.training.get("config", {}).get("target_sensitivity", 0.9))
    return gate.build_gate(
        reference_measures=measures, train_embeddings=outputs["train"][1], held_out_embeddings=np.concatenate(held_out),
        validation_labels=np.isin(prepared.validation.labels, meta.malignant_indices), validation_scores=scores,
        threshold=meta.threshold, target_sensitivity=target, input_size=meta.input_size,
    )  # fmt: skip


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not k.startswith("_")}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def format_metrics_table(columns: dict[str, dict | None]) -> str:
    """A plain-text table: one row per metric, one column per report (e.g. full vs de-duplicated test)."""
    names = list(columns)
    width = max(len(label) for _, label, _ in METRIC_ROWS) + 2
    lines = ["".ljust(width) + "".join(name.rjust(24) for name in names)]
    for key, label, pattern in METRIC_ROWS:
        cells = []
        for name in names:
            report = columns[name] or {}
            value = report.get(key)
            if value is None:
                cells.append("—")
            elif key == "confusion":
                cells.append(pattern.format(**value))
            elif key == "auc_ci95":
                cells.append(pattern.format(*value))
            else:
                cells.append(pattern.format(value))
        lines.append(label.ljust(width) + "".join(cell.rjust(24) for cell in cells))
    return "\n".join(lines)


@dataclass
class SweepTrial:
    config: TrainConfig
    result: TrainResult | None = None
    error: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def sweep_configs(spec: dict[str, Any], base: TrainConfig, *, seed: int = 0) -> list[TrainConfig]:
    """Grid or random search over lr, batch_size, arch, epochs and weight_decay.

    spec: {"method": "grid"|"random", "trials": N (random only), "parameters": {name: [values]}}
    """

    allowed = {"lr", "batch_size", "arch", "epochs", "weight_decay"}
    parameters = spec.get("parameters") or {}
    if not isinstance(parameters, dict) or not parameters:
        raise ValueError("A sweep needs 'parameters': a mapping of name to a list of values.")
    unknown = set(parameters) - allowed
    if unknown:
        raise ValueError(f"Cannot sweep over {sorted(unknown)}; choose from {sorted(allowed)}.")
    for name, values in parameters.items():
        if not isinstance(values, list) or not values:
            raise ValueError(f"Sweep parameter {name!r} needs a non-empty list of values.")
    names = sorted(parameters)
    grid = [
        dict(zip(names, combination, strict=True)) for combination in itertools.product(*(parameters[n] for n in names))
    ]
    method = spec.get("method", "grid")
    if method == "random":
        trials = int(spec.get("trials", 4))
        grid = random.Random(seed).sample(grid, min(trials, len(grid)))
    elif method != "grid":
        raise ValueError(f"Unknown sweep method {method!r}; use grid or random.")
    return [dataclasses.replace(base, **{k: type(getattr(base, k))(v) for k, v in point.items()}) for point in grid]
