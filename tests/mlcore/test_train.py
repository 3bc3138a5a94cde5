"""train_classifier: the synthetic lesions are learnable, training is reproducible, the threshold is safe."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlcore.data import SyntheticLesions
from mlcore.metrics import roc_auc, sensitivity_specificity
from mlcore.model import checkpoint_bytes, load_checkpoint
from mlcore.preprocessing import TransformSpec
from mlcore.train import TrainConfig, predict_probabilities, train_classifier

DATA_SIZE = 64  # pixels; generating at the input size keeps the run short


@pytest.fixture(scope="module")
def validation_items():
    return list(SyntheticLesions(100, size=DATA_SIZE, seed=2))


@pytest.fixture(scope="module")
def trained(validation_items):
    config = TrainConfig(arch="resnet_tiny", input_size=64, epochs=4, seed=0)
    return train_classifier(
        list(SyntheticLesions(400, size=DATA_SIZE, seed=1)), validation_items, config, progress=False
    )


def _spec(meta) -> TransformSpec:
    return TransformSpec(meta.input_size, meta.mean, meta.std)


def test_resnet_tiny_learns_the_synthetic_lesions_to_a_held_out_auc_of_at_least_075(trained):
    held_out = list(SyntheticLesions(300, size=DATA_SIZE, seed=3))
    scores = predict_probabilities(trained.model, held_out, _spec(trained.meta))
    labels = [label for _, label in held_out]

    assert scores.shape == (300,)
    assert np.all((scores >= 0) & (scores <= 1))
    assert roc_auc(labels, scores) >= 0.75


def test_training_history_has_one_entry_per_epoch(trained):
    assert [entry["epoch"] for entry in trained.history] == [1, 2, 3, 4]
    assert all(np.isfinite(entry["loss"]) for entry in trained.history)
    assert max(entry["val_auc"] for entry in trained.history) >= 0.75
    assert trained.seconds > 0


def test_trained_model_keeps_the_best_validation_epoch(trained, validation_items):
    scores = predict_probabilities(trained.model, validation_items, _spec(trained.meta))
    auc = roc_auc([label for _, label in validation_items], scores)
    best = max(entry["val_auc"] for entry in trained.history)
    assert auc == pytest.approx(best, abs=1e-9)
    assert trained.meta.metrics["validation"]["auc"] == pytest.approx(best, abs=1e-9)


def test_threshold_reaches_the_target_sensitivity_on_the_validation_set(trained, validation_items):
    meta = trained.meta
    # The threshold is set on calibrated probabilities: the same temperature here.
    scores = predict_probabilities(trained.model, validation_items, _spec(meta), temperature=meta.temperature)
    labels = [label for _, label in validation_items]

    sensitivity, specificity = sensitivity_specificity(labels, scores, meta.threshold)

    assert 0.0 < meta.threshold < 1.0
    assert sensitivity >= 0.9
    assert specificity > 0.0  # the threshold is not simply "call everything malignant"
    assert meta.metrics["validation"]["sensitivity"] == sensitivity
    assert meta.metrics["validation"]["threshold"] == meta.threshold


def test_trained_meta_describes_the_model(trained):
    meta = trained.meta
    assert (meta.arch, meta.input_size) == ("resnet_tiny", 64)
    assert meta.class_names == ("benign", "malignant")
    assert meta.training["history"] == trained.history
    assert meta.training["config"]["seed"] == 0
    assert meta.training["device"] == "cpu"
    assert not trained.model.training


def test_trained_model_round_trips_through_a_checkpoint(trained, validation_items):
    model, meta = load_checkpoint(checkpoint_bytes(trained.model, trained.meta))
    assert meta == trained.meta
    before = predict_probabilities(trained.model, validation_items[:20], _spec(meta))
    after = predict_probabilities(model, validation_items[:20], _spec(meta))
    assert np.array_equal(before, after)


def _short_run(seed: int):
    config = TrainConfig(arch="resnet_tiny", input_size=32, epochs=1, batch_size=16, seed=seed, device="cpu")
    return train_classifier(
        list(SyntheticLesions(64, size=32, seed=21)),
        list(SyntheticLesions(32, size=32, seed=22)),
        config,
        progress=False,
    )


@pytest.fixture(scope="module")
def short_run_seed_5():
    return _short_run(seed=5)


def test_training_with_the_same_seed_is_reproducible(short_run_seed_5):
    first, second = short_run_seed_5, _short_run(seed=5)

    assert first.history == second.history
    assert first.meta.threshold == second.meta.threshold
    for name, tensor in first.model.state_dict().items():
        assert torch.equal(second.model.state_dict()[name], tensor), name


def test_training_with_another_seed_gives_different_weights(short_run_seed_5):
    first, other = short_run_seed_5, _short_run(seed=6)
    assert not torch.equal(first.model.conv1.weight, other.model.conv1.weight)
