"""The model card (mlcore.model_card): what it states from a model's own numbers, and the limits it draws."""

from __future__ import annotations

import numpy as np

from mlcore.datasets import LoadedImage, LoadedSplit
from mlcore.evaluation import subgroup_report
from mlcore.model_card import render_model_card
from mlcore.subgroups import sensitivity_gaps
from mlcore.subgroups import subgroup_report as raw_subgroup_report

META = {
    "arch": "resnet18", "input_size": 224, "class_names": ["akiec", "bcc", "nv"],
    "malignant_classes": ["akiec", "bcc"], "threshold": 0.31, "temperature": 1.2,
    "training": {"config": {"target_sensitivity": 0.9}},
}  # fmt: skip
COUNTS = {"train": {"nv": 50, "akiec": 20, "bcc": 30}, "test": {"bcc": 9, "nv": 12, "akiec": 5}}
PROVENANCE = {
    "data": {"source": "/data/HAM10000_metadata.csv", "grouped_splits": True, "test_split_made": True, "counts": COUNTS}
}


def planted_report() -> dict:
    """Light skin read well, brown skin's malignant cases mostly missed: a sensitivity gap."""
    rng = np.random.default_rng(0)
    labels = np.tile([True, False], 200)
    tone = np.array(["light"] * 200 + ["brown"] * 200)
    scores = np.where(labels, 0.8, 0.2) + rng.normal(0, 0.05, 400)
    scores[200:][labels[200:]] = rng.uniform(0, 0.5, 100)  # brown: malignant scored low
    report = raw_subgroup_report(labels, scores, 0.5, {"skin_tone": list(tone)}, bootstrap=100)
    report["gaps"] = sensitivity_gaps(report)
    return report


PER_CLASS = {
    "nv": {"n": 12, "auc": 0.8, "recall": 0.7},
    "akiec": {"n": 5, "auc": 0.7, "recall": 0.4},
    "bcc": {"n": 9, "auc": None, "recall": None},
}


def test_the_card_states_use_data_metrics_subgroups_and_the_limits_its_numbers_show():
    metrics = {
        "test": {"n": 26, "n_positive": 14, "auc": 0.81, "auc_ci95": [0.7, 0.9], "sensitivity": 0.9,
                 "specificity": 0.6, "ppv": 0.7, "npv": 0.85, "ece": 0.05,
                 "diagnoses": {"balanced_accuracy": 0.61, "per_class": PER_CLASS}},
        "leakage": {"near_duplicates_in_train": 2, "groups": {"lesions": {"shared": 0}, "patients": {"shared": 0}}},
        "subgroups": planted_report(),
    }  # fmt: skip
    card = render_model_card(version="ham-1", meta=META, metrics=metrics, provenance=PROVENANCE,
                             training_skin_itas=[60.0, 45.0, 45.0, -40.0], quality_gate=True)  # fmt: skip
    assert card.startswith("# Model card: ham-1")
    assert "## Intended use" in card and "not a diagnosis" in card
    assert "the sum over akiec, bcc" in card and "0.310" in card
    assert "Train: 100 photos (akiec 20, bcc 30, nv 50)" in card  # in the model's class order
    assert "Very light 25%, Light 50%" in card and "Dark 25%" in card
    assert "| 26 (14) | 0.810 [0.700–0.900] |" in card
    assert card.index("| akiec | 5 |") < card.index("| bcc | 9 |") < card.index("| nv | 12 |")
    assert "| skin_tone | light | 200 | 100 |" in card and "| skin_tone | brown | 200 | 100 |" in card
    limits = card.split("## Known limits")[1]
    assert "Sensitivity is lower for skin_tone = brown" in limits
    assert "No test photos of Very light, Intermediate, Tan, Dark skin" in limits
    assert "near-duplicate in training" in limits
    assert "Sensitivity is lower for skin_tone = light" not in limits


def test_a_model_without_subgroup_metrics_says_so_and_a_demo_is_marked():
    card = render_model_card(version="demo-resnet18", meta=META, metrics={}, provenance={"data": {"directory":
                             "/var/demo-data/1200-300-0"}})  # fmt: skip
    assert "No test metrics were recorded." in card
    assert "Not recorded for this model" in card
    assert "a demonstration model, not for clinical use" in card
    assert "no (photos are not refused)" in card


def test_the_evaluation_helper_adds_the_gaps(tmp_path):
    items = [LoadedImage(path=str(i), label=i % 2, image=None, fingerprint=None, features={},
                         skin={"band": "dark" if i >= 100 else "light", "ita": 0.0, "source": "ita"})
             for i in range(200)]  # fmt: skip
    split = LoadedSplit(items)
    labels = split.labels == 1
    scores = np.where(labels, 0.9, 0.1)
    scores[100:][labels[100:]] = 0.2  # dark skin's malignant cases missed
    report = subgroup_report(split, labels, scores, 0.5, bootstrap=50)
    assert [gap["group"] for gap in report["gaps"]] == ["dark"]
    assert {row["group"] for row in report["attributes"]["skin_tone"]} == {"light", "dark"}
    assert [row["group"] for row in report["attributes"]["site"]] == ["unknown"]
