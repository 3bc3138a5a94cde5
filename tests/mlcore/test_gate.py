"""mlcore.gate: the out-of-distribution score, the refer-when-unsure band and the decision for one photo;
and test-time augmentation in the same forward pass (mlcore.inference)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcore.gate import (
    LEGACY_NOTE,
    OOD_ADVICE,
    UNCERTAIN_ADVICE,
    Gate,
    OodReference,
    build_gate,
    decide,
    uncertain_band,
)


def clustered(count: int, *, seed: int, dims: int = 64, rank: int = 6) -> np.ndarray:
    """Embeddings that live near a low-dimensional subspace, as a trained network's do."""
    rng = np.random.default_rng(seed)
    basis = np.random.default_rng(99).normal(size=(rank, dims))
    return rng.normal(size=(count, rank)) @ basis + 0.05 * rng.normal(size=(count, dims)) + 3.0


def test_ood_scores_training_like_embeddings_low_and_unlike_ones_high():
    reference = OodReference.fit(clustered(300, seed=1), components=8).calibrate(clustered(400, seed=2), 0.02)
    like = reference.scores(clustered(400, seed=3))
    unlike = reference.scores(np.random.default_rng(4).normal(size=(50, 64)) * 3 + 3.0)
    shifted = reference.scores(clustered(50, seed=5) + 4.0)  # the same shape, elsewhere
    assert np.mean(like > reference.threshold) < 0.045  # about the chosen 2% on other photos
    assert np.all(unlike > reference.threshold) and np.all(shifted > reference.threshold)
    assert 1.0 < float(np.median(like)) < 2.0  # "about 1.4 is typical", as the API says


def test_ood_reference_round_trips_through_json_at_float32_precision():
    import json

    reference = OodReference.fit(clustered(100, seed=6), components=4).calibrate(clustered(40, seed=7))
    stored = json.loads(json.dumps(reference.to_dict(false_flag=0.02, held_out=40)))
    again = OodReference.from_dict(stored)
    probe = clustered(10, seed=8)
    assert np.allclose(again.scores(probe), reference.scores(probe), rtol=1e-4)
    assert stored["held_out"] == 40 and again.threshold == reference.threshold
    with pytest.raises(ValueError, match="at least 3"):
        OodReference.fit(clustered(2, seed=9))


def test_the_band_holds_the_threshold_and_at_most_a_fifth_of_the_cases():
    rng = np.random.default_rng(0)
    labels = rng.random(400) < 0.3
    scores = np.clip(np.where(labels, rng.normal(0.7, 0.15, 400), rng.normal(0.3, 0.15, 400)), 0.001, 0.999)
    low, high = uncertain_band(labels, scores, 0.45, target_sensitivity=0.9)
    assert low < 0.45 < high
    assert np.mean((scores > low) & (scores < high)) <= 0.2
    # A small validation set knows its threshold less well: a wider band (within the same cap).
    small_low, small_high = uncertain_band(labels[:40], scores[:40], 0.45, target_sensitivity=0.9)
    assert small_high - small_low >= (high - low) * 0.8


def gate(**overrides) -> Gate:
    data = {
        "version": 1,
        "thresholds": {"focus:low": 0.0, "brightness:low": 50.0, "brightness:high": 230.0, "clipped:high": 0.05,
                       "skin:low": 0.5, "lesion_size:low": 0.01, "lesion_offset:high": 0.6, "resolution:low": 64},
        "ood": OodReference.fit(clustered(50, seed=1), components=4).calibrate(clustered(20, seed=2)).to_dict(
            false_flag=0.02, held_out=20),
        "band": [0.4, 0.5],
    }  # fmt: skip
    return Gate.from_dict(data, overrides)


GOOD = {"focus": 0.5, "brightness": 150.0, "clipped": 0.0, "skin": 0.9, "lesion_size": 0.1, "lesion_offset": 0.1,
        "resolution": 512.0}  # fmt: skip


def test_the_four_decisions():
    assert decide(probability=0.8, threshold=0.45, gate=gate(), measures=GOOD, ood_score=1.2).decision == (
        "above_threshold"
    )
    assert decide(probability=0.1, threshold=0.45, gate=gate(), measures=GOOD, ood_score=1.2).decision == (
        "below_threshold"
    )
    unsure = decide(probability=0.42, threshold=0.45, gate=gate(), measures=GOOD, ood_score=1.2)
    assert unsure.decision == "uncertain" and unsure.assessable and unsure.quality["advice"] == UNCERTAIN_ADVICE
    blurred = decide(probability=0.9, threshold=0.45, gate=gate(), measures={**GOOD, "focus": -1.0}, ood_score=1.2)
    assert blurred.decision == "not_assessable" and not blurred.assessable
    assert blurred.reasons[0].startswith("out of focus")
    failed = [check for check in blurred.quality["checks"] if not check["passed"]]
    assert [check["name"] for check in failed] == ["focus"] and failed[0]["threshold"] == 0.0


def test_an_unlike_photo_is_not_assessable_and_its_score_is_kept():
    unlike = decide(probability=0.9, threshold=0.45, gate=gate(), measures=GOOD, ood_score=50.0)
    assert unlike.decision == "not_assessable" and unlike.reasons == [OOD_ADVICE] and unlike.ood_score == 50.0
    assert unlike.quality["ood"] == {"score": 50.0, "threshold": gate().ood.threshold, "passed": False}


def test_augmented_views_that_disagree_make_the_result_uncertain():
    agreed = decide(probability=0.8, threshold=0.45, gate=gate(), measures=GOOD, augmented=[0.7, 0.75, 0.9])
    split = decide(probability=0.8, threshold=0.45, gate=gate(), measures=GOOD, augmented=[0.7, 0.3, 0.9])
    assert agreed.decision == "above_threshold" and split.decision == "uncertain"
    assert split.quality["augmented"] == [0.7, 0.3, 0.9]


def test_modes_and_overrides():
    blurred = {**GOOD, "focus": -1.0}
    lenient = decide(probability=0.8, threshold=0.45, gate=gate(), measures=blurred, mode="lenient")
    assert lenient.decision == "above_threshold" and lenient.quality["warnings"][0].startswith("out of focus")
    not_skin = decide(probability=0.8, threshold=0.45, gate=gate(), measures={**blurred, "skin": 0.0}, mode="lenient")
    assert not_skin.decision == "not_assessable"
    off = decide(probability=0.8, threshold=0.45, gate=gate(), measures={**blurred, "skin": 0.0}, ood_score=99,
                 mode="off")  # fmt: skip
    assert off.decision == "above_threshold" and off.quality["gate"] == "off" and OOD_ADVICE in off.quality["warnings"]
    # Settings override stored thresholds: a lower focus threshold lets the blurred photo pass.
    relaxed = gate(**{"focus:low": -2.0, "band": [0.1, 0.2], "ood": 100.0})
    assert decide(probability=0.42, threshold=0.45, gate=relaxed, measures=blurred, ood_score=99).decision == (
        "below_threshold"
    )


def test_a_version_without_a_gate_is_measured_but_never_refused():
    legacy = decide(probability=0.9, threshold=0.45, gate=None, measures={**GOOD, "focus": -5.0, "skin": 0.0})
    assert legacy.decision == "above_threshold" and legacy.assessable and legacy.ood_score is None
    assert legacy.quality["note"] == LEGACY_NOTE and legacy.quality["gate"] == "off"
    assert all(check["threshold"] is None and check["passed"] for check in legacy.quality["checks"][:-1])
    assert Gate.from_dict({}) is None and Gate.from_dict(None) is None
    assert Gate.from_dict({"version": 0, "thresholds": {"focus:low": 0.0}}) is None  # other measures' scales


def test_build_gate_calibrates_every_part():
    from mlcore.data import generate_lesion
    from mlcore.quality import measure

    rng = np.random.default_rng(3)
    measures = [measure(generate_lesion(rng, malignant=bool(i % 2), size=128).image) for i in range(30)]
    labels = np.arange(60) % 2 == 0
    scores = np.where(labels, 0.7, 0.2) + np.random.default_rng(1).normal(0, 0.1, 60)
    built = build_gate(reference_measures=measures, train_embeddings=clustered(80, seed=1),
                       held_out_embeddings=clustered(40, seed=2), validation_labels=labels,
                       validation_scores=np.clip(scores, 0.01, 0.99), threshold=0.45, target_sensitivity=0.9,
                       input_size=64)  # fmt: skip
    assert built["version"] == 1 and built["reference_photos"] == 30
    assert built["thresholds"]["resolution:low"] == 64 and "focus:low" in built["thresholds"]
    assert built["ood"]["threshold"] > 0 and built["ood"]["held_out"] == 40
    assert built["band"][0] < 0.45 < built["band"][1]
    assert Gate.from_dict(built).ood.threshold == built["ood"]["threshold"]


def test_augmentation_runs_in_the_same_forward_pass_and_leaves_the_prediction_alone():
    from mlcore.inference import Predictor
    from mlcore.model import CheckpointMeta, build_model

    torch.manual_seed(0)
    predictor = Predictor(build_model("resnet_tiny"), CheckpointMeta(arch="resnet_tiny", input_size=32), device="cpu")
    batch = torch.randn(3, 3, 32, 32)
    plain = predictor.predict_with_gradcam_tensors(batch, embeddings=True, upsample=False)
    results, cams, embeddings, views = predictor.predict_with_gradcam_tensors(
        batch, embeddings=True, upsample=False, augment=True
    )
    assert [r.probability_malignant for r in results] == pytest.approx([r.probability_malignant for r in plain[0]])
    assert np.allclose(embeddings, plain[2], atol=1e-5) and np.allclose(cams[0], plain[1][0], atol=1e-5)
    assert views.shape == (3, 3)
    flipped = predictor.predict_tensors(batch.flip(3))[:, predictor.meta.positive_index].numpy()
    assert views[:, 0] == pytest.approx(flipped, abs=1e-5)
    assert np.allclose(predictor.augmented_probabilities(batch), views, atol=1e-5)
