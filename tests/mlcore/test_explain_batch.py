"""Integrated Gradients over several images in one Captum call gives each image exactly what it
gets alone: the same map (to float rounding), its own target and its own convergence delta."""

from __future__ import annotations

import numpy as np
import pytest
from captum.attr import IntegratedGradients

from mlcore.explain import Explainer
from tests.mlcore.helpers import lesion_batch, tiny_meta, tiny_model


@pytest.fixture(scope="module")
def explainer() -> Explainer:
    return Explainer(tiny_model(seed=3), tiny_meta())


@pytest.fixture(scope="module")
def images():
    return lesion_batch(5, size=48, seed=200)


def assert_same_as_alone(explainer, images, params, targets, batched) -> None:
    assert len(batched) == len(images)
    for image, target, result in zip(images, targets, batched, strict=True):
        alone = explainer.explain(image, "integrated_gradients", params, target)
        scale = float(np.abs(alone.map).max())
        assert scale > 0
        assert result.target_index == target and result.target_class == alone.target_class
        assert result.raw.shape == alone.raw.shape == (3, 32, 32) and result.map.shape == (32, 32)
        assert float(np.abs(result.raw - alone.raw).max()) <= 1e-4 * float(np.abs(alone.raw).max())
        assert float(np.abs(result.map - alone.map).max()) <= 1e-4 * scale
        assert result.convergence_delta == pytest.approx(alone.convergence_delta, abs=1e-4 * scale + 1e-7)


@pytest.mark.parametrize("baseline", ["blurred", "black"])
def test_batched_ig_equals_one_image_at_a_time_with_different_targets(explainer, images, baseline, monkeypatch):
    calls = []
    original = IntegratedGradients.attribute

    def counting(self, inputs, *args, **kwargs):  # a spy: Captum still does the work
        calls.append((inputs.shape[0], kwargs["internal_batch_size"]))
        return original(self, inputs, *args, **kwargs)

    params = {"baseline": baseline, "n_steps": 24}
    targets = [1, 0, 0, 1, 1]
    monkeypatch.setattr(IntegratedGradients, "attribute", counting)
    batched = explainer.explain_batch(images, "integrated_gradients", params, targets)
    assert len(calls) == 1 and calls[0][0] == 5  # all five images in one call
    per_call, steps = explainer.ig_batch_plan(5, 24)
    assert calls[0][1] == per_call * steps and per_call == 5
    monkeypatch.undo()
    assert_same_as_alone(explainer, images, params, targets, batched)
    # Different targets really are different explanations: the same image, the other class, opposite evidence.
    flipped = explainer.explain_batch(images[:2], "integrated_gradients", params, [0, 1])
    assert np.allclose(flipped[0].map, -explainer.explain(images[0], "integrated_gradients", params, 1).map,
                       atol=1e-4 * float(np.abs(batched[0].map).max()))  # fmt: skip


def test_internal_batch_follows_the_memory_budget_and_splits_images_that_cannot_fit():
    small = Explainer(tiny_model(seed=3), tiny_meta())
    small.memory_budget_bytes = 2 * small.sample_bytes()  # two samples per forward pass
    assert small.ig_batch_plan(5, 24) == (2, 1)  # two images, one step each, per pass: three Captum calls
    assert small.ig_batch_plan(1, 24) == (1, 2)
    roomy = Explainer(tiny_model(seed=3), tiny_meta(), memory_budget_bytes=64 * small.sample_bytes())
    per_call, steps = roomy.ig_batch_plan(4, 50)
    # All four images in each pass, with as many steps as the budget (and the CPU cap) allows.
    assert per_call == 4 and per_call * steps <= roomy.internal_batch_size(200) < per_call * (steps + 1)
    images = lesion_batch(5, size=48, seed=300)
    params = {"baseline": "blurred", "n_steps": 12}
    targets = [0, 1, 0, 1, 0]
    assert_same_as_alone(small, images, params, targets, small.explain_batch(images, "integrated_gradients",
                                                                             params, targets))  # fmt: skip


def test_other_methods_and_bad_arguments(explainer, images):
    batched = explainer.explain_batch(images[:2], "gradcam", {}, [1, 0])
    for image, target, result in zip(images[:2], [1, 0], batched, strict=True):
        assert np.allclose(result.map, explainer.explain(image, "gradcam", {}, target).map, atol=1e-6)
    with pytest.raises(ValueError, match="targets"):
        explainer.explain_batch(images[:2], "integrated_gradients", {"baseline": "black", "n_steps": 4}, [1])
