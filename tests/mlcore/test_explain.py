"""Explanations are correct, not just pretty: completeness, a model-randomisation sanity check,
attention on the lesion, parameter validation, and the rendered files."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import spearmanr

from mlcore.data import SyntheticLesions
from mlcore.explain import METHODS, Explainer, ExplanationError, LogOdds, validate_params
from mlcore.heatmap import DISPLAY_MAX_SIDE, LEGEND_HEIGHT, attribution_npy, display_size, render
from mlcore.inference import Predictor
from mlcore.model import build_model
from mlcore.train import TrainConfig, train_classifier

SIZE = 64


@pytest.fixture(scope="module")
def trained():
    torch.manual_seed(0)
    result = train_classifier(
        list(SyntheticLesions(400, size=SIZE, seed=1)),
        list(SyntheticLesions(100, size=SIZE, seed=2)),
        TrainConfig(arch="resnet_tiny", input_size=SIZE, epochs=4, seed=0),
        progress=False,
    )
    return result.model, result.meta


@pytest.fixture(scope="module")
def explainer(trained):
    return Explainer(*trained)


@pytest.fixture(scope="module")
def lesions():
    data = SyntheticLesions(16, size=SIZE, seed=77)
    return [data.lesion(i) for i in range(16)]


def test_log_odds_of_a_binary_model_is_the_logit_difference(trained):
    model, _ = trained
    x = torch.randn(3, 3, SIZE, SIZE)
    with torch.no_grad():
        logits = model(x)
        log_odds = LogOdds(model)(x)
    assert torch.allclose(log_odds[:, 1], logits[:, 1] - logits[:, 0], atol=1e-5)
    assert torch.allclose(log_odds[:, 0], -log_odds[:, 1], atol=1e-5)


def test_integrated_gradients_is_complete(explainer, lesions):
    """Completeness: sum(attributions) = f(x) - f(baseline), f being the target's log-odds.

    The model is a ReLU network with linear pooling and head, so f is piecewise linear along the
    straight path and its path derivative is piecewise constant. Gauss-Legendre quadrature with n
    nodes then errs only near the kinks, by at most the derivative's jumps times the gap between
    nodes (about pi/(2n) of the path at the centre). We allow 2% of |f(x) - f(b)| plus 0.01 at 50
    steps (measured worst case: 0.7%), and check that the error shrinks as steps grow.
    """
    for lesion in lesions:
        x = explainer.input_tensor(lesion.image)
        for baseline_kind in ("black", "blurred"):
            baseline = explainer.baseline(baseline_kind, lesion.image)
            with torch.no_grad():
                difference = (explainer.forward(x) - explainer.forward(baseline))[0, 1].item()
            result = explainer.explain(
                lesion.image, "integrated_gradients", {"n_steps": 50, "baseline": baseline_kind}, 1
            )
            error = abs(float(result.raw.sum()) - difference)
            assert error <= 0.02 * abs(difference) + 0.01, (error, difference)
            assert result.convergence_delta == pytest.approx(error, abs=1e-3)
    coarse = [
        explainer.explain(le.image, "integrated_gradients", {"n_steps": 8, "baseline": "black"}, 1) for le in lesions
    ]
    fine = [
        explainer.explain(le.image, "integrated_gradients", {"n_steps": 128, "baseline": "black"}, 1) for le in lesions
    ]
    assert np.mean([f.convergence_delta for f in fine]) < np.mean([c.convergence_delta for c in coarse])


def test_heatmaps_fail_the_model_randomisation_check(trained, explainer, lesions):
    """Adebayo et al. (2018): maps of a model with re-initialised weights must differ from the trained
    model's, or the method only shows edges. Repeats with the trained model stay alike."""
    _, meta = trained
    torch.manual_seed(123)
    randomised = Explainer(build_model("resnet_tiny"), meta)
    ig_random, ig_repeat, cam_random = [], [], []
    for lesion in lesions:
        ig = explainer.explain(lesion.image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1)
        ig_again = explainer.explain(lesion.image, "integrated_gradients", {"n_steps": 64, "baseline": "black"}, 1)
        ig_rand = randomised.explain(lesion.image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1)
        ig_random.append(spearmanr(np.abs(ig.map).ravel(), np.abs(ig_rand.map).ravel())[0])
        ig_repeat.append(spearmanr(np.abs(ig.map).ravel(), np.abs(ig_again.map).ravel())[0])
        cam = explainer.explain(lesion.image, "gradcam", {}, 1).map
        cam_rand = randomised.explain(lesion.image, "gradcam", {}, 1).map
        cam_random.append(spearmanr(cam.ravel(), cam_rand.ravel())[0])
    assert np.mean(ig_repeat) > 0.95
    assert np.mean(ig_random) < 0.5  # measured about 0.28
    assert np.mean(cam_random) < 0.5  # measured about 0.15


def test_attribution_concentrates_on_the_lesion(explainer, lesions):
    """The share of |attribution| inside the generator's lesion mask, divided by the mask's share of
    the image: 1 means no preference for the lesion. Averaged over 16 lesions we require 1.3 for IG
    and 1.5 for Grad-CAM's positive evidence (measured about 1.5 and 2.0)."""
    ig_ratio, cam_ratio = [], []
    for lesion in lesions:
        area = lesion.mask.mean()
        ig = np.abs(
            explainer.explain(lesion.image, "integrated_gradients", {"n_steps": 50, "baseline": "black"}, 1).map
        )
        ig_ratio.append(ig[lesion.mask].sum() / ig.sum() / area)
        cam = explainer.explain(lesion.image, "gradcam", {}, 1).map
        evidence = np.clip(cam, 0, None) if cam.max() > 0 else np.abs(cam)
        cam_ratio.append(evidence[lesion.mask].sum() / evidence.sum() / area)
    assert np.mean(ig_ratio) > 1.3
    assert np.mean(cam_ratio) > 1.5


def test_every_method_returns_a_map_of_the_input_size(explainer, lesions):
    for method in METHODS:
        params = validate_params(method, {}, input_size=SIZE)
        if method in ("lime", "gradient_shap", "smoothgrad"):
            params = validate_params(method, {"n_samples": 12}, input_size=SIZE)
        result = explainer.explain(lesions[1].image, method, params, 1)
        assert result.map.shape == (SIZE, SIZE), method
        assert np.isfinite(result.map).all() and np.abs(result.map).sum() > 0, method
        assert result.target_class == "malignant"


def test_fused_gradcam_of_the_predictor_equals_captum_layergradcam(trained, explainer, lesions):
    model, meta = trained
    predictor = Predictor(model, meta, device="cpu")
    images = [lesion.image for lesion in lesions[:6]]
    results, cams = predictor.predict_with_gradcam(images)
    plain = predictor.predict(images)
    for image, result, cam, reference in zip(images, results, cams, plain, strict=True):
        assert result.probability_malignant == pytest.approx(reference.probability_malignant, abs=1e-6)
        target = meta.class_names.index(result.label)
        captum_map = explainer.explain(image, "gradcam", {}, target).map
        assert np.allclose(cam, captum_map, atol=1e-5 * max(1.0, np.abs(captum_map).max()))


@pytest.mark.parametrize("classes", [2, 3, 5])
def test_closed_form_gradcam_equals_autograd_through_the_head(classes):
    # Several classes (log-odds against a softmax of the others), a temperature, and a batch with
    # different predicted labels: the closed-form channel weights equal autograd's.
    from mlcore.model import CheckpointMeta

    torch.manual_seed(classes)
    model = build_model("resnet_tiny", num_classes=classes).eval()
    names = tuple(f"class{i}" for i in range(classes - 1)) + ("malignant",)
    meta = CheckpointMeta(arch="resnet_tiny", input_size=SIZE, class_names=names, temperature=1.7)
    predictor = Predictor(model, meta, device="cpu")
    batch = torch.randn(8, 3, SIZE, SIZE) * torch.linspace(0.2, 3, 8)[:, None, None, None]
    meta.threshold = float(predictor.predict_tensors(batch)[:, -1].median())  # both labels in the batch
    if classes > 2:  # the label is the most probable class: centre the logits so that it varies
        with torch.no_grad():
            model.fc.bias -= model(batch).mean(0)
    closed = predictor.predict_with_gradcam_tensors(batch, embeddings=True)
    autograd = predictor._gradcam_by_autograd(batch, torch.autocast("cpu", enabled=False), True)
    assert len({result.label for result in closed[0]}) > 1
    assert [r.label for r in closed[0]] == [r.label for r in autograd[0]]
    for mine, theirs in zip(closed[1], autograd[1], strict=True):
        assert np.abs(mine).max() > 0
        assert np.allclose(mine, theirs, atol=1e-5 * np.abs(theirs).max())
    assert np.allclose(closed[2], autograd[2], atol=1e-6)


def test_a_head_other_than_one_linear_layer_is_differentiated_by_autograd():
    from mlcore.inference import linear_head
    from mlcore.model import CheckpointMeta

    torch.manual_seed(0)
    model = build_model("resnet_tiny").eval()
    linear = model.fc
    weight, bias = linear_head(model)
    assert weight is linear.weight and bias is linear.bias
    predictor = Predictor(model, CheckpointMeta(arch="resnet_tiny", input_size=SIZE), device="cpu")
    batch = torch.randn(3, 3, SIZE, SIZE)
    results, cams = predictor.predict_with_gradcam_tensors(batch)
    handle = linear.register_forward_hook(lambda module, inputs, output: output)
    assert linear_head(model) is None  # a hook the closed form would skip
    handle.remove()
    model.fc = torch.nn.Sequential(torch.nn.Dropout(0.5), linear).eval()  # dropout: the identity
    assert linear_head(model) is None
    other_results, other_cams = predictor.predict_with_gradcam_tensors(batch)
    assert [r.probability_malignant for r in other_results] == pytest.approx([r.probability_malignant for r in results])
    for mine, theirs in zip(other_cams, cams, strict=True):
        assert np.allclose(mine, theirs, atol=1e-5 * np.abs(theirs).max())


def test_target_is_the_predicted_class_at_the_operating_threshold(trained):
    model, meta = trained
    explainer = Explainer(model, meta)
    positive = meta.positive_index

    def row(p):
        return [p if i == positive else 1 - p for i in range(2)]

    assert explainer.target_for(row(meta.threshold)) == positive
    assert explainer.target_for(row(meta.threshold - 1e-6)) != positive


@pytest.mark.parametrize(
    ("method", "params", "code", "words"),
    [
        ("shapley_magic", {}, "unknown_method", "Unknown method"),
        ("integrated_gradients", {"n_steps": 301}, "over_budget", "budget of 300"),
        ("integrated_gradients", {"n_steps": 1}, "invalid_params", "at least 2"),
        ("integrated_gradients", {"n_steps": "fifty"}, "invalid_params", "integer"),
        ("integrated_gradients", {"n_steps": 2.5}, "invalid_params", "integer"),
        ("integrated_gradients", {"baseline": "white"}, "invalid_params", "black, blurred, mean"),
        ("integrated_gradients", {"steps": 10}, "invalid_params", "Unknown parameter"),
        ("occlusion", {"window": 2}, "invalid_params", "at least 4"),
        ("occlusion", {"window": 40}, "invalid_params", "at most 32"),
        ("occlusion", {"window": 4, "stride": 1}, "over_budget", "model evaluations"),
        ("smoothgrad", {"n_samples": 50, "n_steps": 50}, "over_budget", "model evaluations"),
        ("gradient_shap", {"stdevs": -1}, "invalid_params", "between"),
    ],
)
def test_bad_parameters_are_refused_with_a_reason(method, params, code, words):
    with pytest.raises(ExplanationError) as caught:
        validate_params(method, params, input_size=SIZE, max_steps=300, max_evaluations=2000)
    assert caught.value.code == code
    assert words in caught.value.message


def test_parameters_are_canonical_so_identical_requests_match():
    assert validate_params("integrated_gradients", {}, input_size=SIZE) == {"baseline": "blurred", "n_steps": 50}
    explicit = validate_params("integrated_gradients", {"n_steps": 50.0, "baseline": "blurred"}, input_size=SIZE)
    assert explicit == {"baseline": "blurred", "n_steps": 50} and isinstance(explicit["n_steps"], int)
    assert validate_params("occlusion", {}, input_size=SIZE) == {"baseline": "blurred", "stride": 4, "window": 8}


def test_overlay_and_heatmap_have_the_display_size_and_a_legend(explainer, lesions):
    photo = lesions[0].image.resize((300, 200))
    result = explainer.explain(lesions[0].image, "gradcam", {}, 1)
    overlay, heatmap = render(photo, result.map, signed=True, method_label="Grad-CAM", target_class="malignant")
    overlay_image = Image.open(io.BytesIO(overlay))
    heatmap_image = Image.open(io.BytesIO(heatmap))
    assert (overlay_image.format, heatmap_image.format) == ("JPEG", "PNG")
    assert overlay_image.size == (300, 200 + LEGEND_HEIGHT)
    assert heatmap_image.size == (300, 200) and heatmap_image.convert("RGBA").mode == "RGBA"
    assert heatmap_image.mode == "P" and "transparency" in heatmap_image.info  # a palette with alpha
    legend = np.asarray(overlay_image.convert("RGB"))[200:]
    assert (legend < 100).any()  # the legend's text and colour bar are drawn
    big = Image.new("RGB", (6000, 4000), (180, 140, 120))
    assert display_size(*big.size) == (DISPLAY_MAX_SIDE, round(4000 * DISPLAY_MAX_SIDE / 6000))


def test_raw_attribution_is_a_float16_npy(explainer, lesions):
    result = explainer.explain(lesions[0].image, "integrated_gradients", {"n_steps": 8, "baseline": "mean"}, 1)
    loaded = np.load(io.BytesIO(attribution_npy(result.raw)), allow_pickle=False)
    assert loaded.dtype == np.float16 and loaded.shape == (3, SIZE, SIZE)
    assert np.allclose(loaded.astype(np.float32), result.raw, atol=1e-3 * np.abs(result.raw).max() + 1e-4)


def test_internal_batch_size_respects_the_memory_budget(explainer, monkeypatch):
    monkeypatch.setattr("mlcore.explain.available_memory_bytes", lambda device: explainer.sample_bytes() * 4 * 3)
    assert explainer.internal_batch_size(50) == 3
    monkeypatch.setattr("mlcore.explain.available_memory_bytes", lambda device: 1 << 40)
    monkeypatch.setattr(explainer, "memory_budget_bytes", 1 << 40)
    assert explainer.internal_batch_size(50) == 16  # CPU cap
    monkeypatch.setattr(explainer, "memory_budget_bytes", explainer.sample_bytes() * 5)
    assert explainer.internal_batch_size(50) == 5  # the configured budget


def test_draft_decoding_keeps_enough_pixels_for_the_display_size():
    from mlcore.preprocessing import decode_image

    buffer = io.BytesIO()
    Image.new("RGB", (6000, 4000), (150, 110, 90)).save(buffer, format="JPEG", quality=80)
    full = decode_image(buffer.getvalue(), max_bytes=1 << 30, max_pixels=40_000_000)
    reduced = decode_image(buffer.getvalue(), max_bytes=1 << 30, max_pixels=40_000_000, max_side=DISPLAY_MAX_SIDE)
    assert full.image.size == (6000, 4000)
    assert DISPLAY_MAX_SIDE <= max(reduced.image.size) < 6000
    assert reduced.image.size[0] * 2 == reduced.image.size[1] * 3  # aspect ratio kept
