"""Predictor and select_device."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from mlcore.heatmap import upsample_bilinear
from mlcore.inference import Predictor, configure_torch_threads, select_device
from mlcore.model import checkpoint_bytes, save_checkpoint

from .helpers import lesion_batch, tiny_meta, tiny_model

CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def model():
    return tiny_model(seed=7)


@pytest.fixture(scope="module")
def images():
    return lesion_batch(10, size=48)


def _probabilities(results) -> list[float]:
    return [result.probability_malignant for result in results]


def test_predict_returns_one_result_per_image_with_probabilities_summing_to_one(model, images):
    results = Predictor(model, tiny_meta(), device="cpu").predict(images)

    assert len(results) == len(images)
    for result in results:
        assert set(result.probabilities) == {"benign", "malignant"}
        assert sum(result.probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert result.probability_malignant == result.probabilities["malignant"]
        assert 0.0 <= result.probability_malignant <= 1.0
        assert result.threshold == 0.5
    # a seeded untrained network still gives each image its own score
    assert len(set(_probabilities(results))) == len(images)


def test_label_is_malignant_exactly_when_probability_reaches_the_threshold(model, images):
    scores = sorted(_probabilities(Predictor(model, tiny_meta(), device="cpu").predict(images)))
    threshold = scores[len(scores) // 2]  # an actual score, so the >= boundary is exercised
    assert 0.0 < threshold < 1.0

    results = Predictor(model, tiny_meta(threshold=threshold), device="cpu").predict(images)

    labels = [result.label for result in results]
    assert labels.count("malignant") == len(scores) - len(scores) // 2
    assert labels.count("benign") == len(scores) // 2
    for result in results:
        assert result.threshold == threshold
        assert (result.label == "malignant") == (result.probability_malignant >= threshold)
    assert any(result.probability_malignant == threshold and result.label == "malignant" for result in results)


def test_batch_results_equal_one_at_a_time_results(model, images):
    predictor = Predictor(model, tiny_meta(), device="cpu")
    batch = predictor.predict(images)
    single = [predictor.predict([image])[0] for image in images]
    for together, alone in zip(batch, single, strict=True):
        assert together.probability_malignant == pytest.approx(alone.probability_malignant, abs=1e-5)
        assert together.label == alone.label


def test_max_batch_size_chunking_gives_the_same_answer_as_one_big_batch(model, images):
    big = Predictor(model, tiny_meta(), device="cpu", max_batch_size=64).predict(images)
    chunked = Predictor(model, tiny_meta(), device="cpu", max_batch_size=3).predict(images)
    assert _probabilities(chunked) == pytest.approx(_probabilities(big), abs=1e-6)


def test_predict_tensors_returns_float32_softmax_rows(model, images):
    predictor = Predictor(model, tiny_meta(), device="cpu", max_batch_size=4)
    batch = torch.stack([predictor.preprocess(image) for image in images])
    probabilities = predictor.predict_tensors(batch)
    assert probabilities.shape == (len(images), 2)
    assert probabilities.dtype == torch.float32
    assert torch.allclose(probabilities.sum(dim=1), torch.ones(len(images)), atol=1e-5)


def test_preprocess_uses_the_checkpoint_input_size(model, images):
    predictor = Predictor(model, tiny_meta(input_size=40), device="cpu")
    assert predictor.preprocess(images[0]).shape == (3, 40, 40)


def test_predict_on_no_images_returns_an_empty_list(model):
    assert Predictor(model, tiny_meta(), device="cpu").predict([]) == []


def test_custom_class_names_with_the_positive_class_first(model, images):
    meta = tiny_meta(class_names=("melanoma", "naevus"), positive_class="melanoma", threshold=0.5)
    results = Predictor(model, meta, device="cpu").predict(images[:4])
    for result in results:
        assert result.probability_malignant == result.probabilities["melanoma"]
        assert result.label == ("melanoma" if result.probability_malignant >= 0.5 else "naevus")


def test_predictor_puts_the_model_in_eval_mode(images):
    model = tiny_model(seed=8).train()
    predictor = Predictor(model, tiny_meta(), device="cpu")
    assert not predictor.model.training
    first = predictor.predict(images[:3])
    second = predictor.predict(images[:3])
    assert _probabilities(first) == _probabilities(second)


def test_from_checkpoint_bytes_predicts_like_the_original_model(model, images):
    meta = tiny_meta(threshold=0.45)
    expected = Predictor(model, meta, device="cpu").predict(images)

    predictor = Predictor.from_checkpoint(checkpoint_bytes(model, meta), device="cpu")

    assert predictor.meta == meta
    assert predictor.device == torch.device("cpu")
    assert [dataclasses.asdict(result) for result in predictor.predict(images)] == [
        dataclasses.asdict(result) for result in expected
    ]


def test_from_checkpoint_path_predicts_like_the_original_model(model, images, tmp_path):
    meta = tiny_meta(threshold=0.55)
    path = tmp_path / "model.pt"
    save_checkpoint(model, meta, path)
    expected = Predictor(model, meta, device="cpu").predict(images)

    for source in (path, str(path)):
        predictor = Predictor.from_checkpoint(source, device="cpu", max_batch_size=4)
        assert predictor.max_batch_size == 4
        assert _probabilities(predictor.predict(images)) == _probabilities(expected)


# --- devices ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("preference", ["cpu", "CPU", " cpu "])
def test_select_device_cpu_is_the_cpu(preference):
    assert select_device(preference) == torch.device("cpu")


@pytest.mark.parametrize("preference", ["auto", None, ""])
def test_select_device_auto_picks_cuda_only_when_cuda_is_available(preference):
    assert select_device(preference).type == ("cuda" if CUDA else "cpu")


@pytest.mark.parametrize("preference", ["cuda", "cuda:0"])
def test_select_device_cuda_raises_when_cuda_is_absent_and_returns_it_otherwise(preference):
    if CUDA:
        assert select_device(preference).type == "cuda"
    else:
        with pytest.raises(RuntimeError, match="CUDA is not available"):
            select_device(preference)


def test_predictor_on_auto_device_matches_the_cpu_predictor(model, images):
    cpu = Predictor(model, tiny_meta(), device="cpu").predict(images[:4])
    auto_predictor = Predictor(tiny_model(seed=7), tiny_meta(), device="auto")
    assert auto_predictor.device.type == ("cuda" if CUDA else "cpu")
    # bf16 autocast on CUDA costs a little precision; on the CPU the answers are identical
    tolerance = 2e-2 if CUDA else 0.0
    assert _probabilities(auto_predictor.predict(images[:4])) == pytest.approx(_probabilities(cpu), abs=tolerance)


def test_configure_torch_threads_follows_the_environment(monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("TORCH_NUM_THREADS", "1")
        assert configure_torch_threads() == 1
        assert torch.get_num_threads() == 1
        monkeypatch.delenv("TORCH_NUM_THREADS")
        assert configure_torch_threads(default=2) == 2
    finally:
        torch.set_num_threads(before)


def test_gradcam_maps_at_the_feature_size_upsample_to_the_prediction_pass_maps(model, images):
    predictor = Predictor(model, tiny_meta(), device="cpu")
    batch = torch.stack([predictor.preprocess(image) for image in images])
    results, maps = predictor.predict_with_gradcam_tensors(batch)
    small_results, small = predictor.predict_with_gradcam_tensors(batch, upsample=False)
    size = predictor.meta.input_size
    assert [r.probability_malignant for r in small_results] == [r.probability_malignant for r in results]
    assert all(m.shape[0] < size and m.shape == m.shape[::-1] for m in small)  # the feature map's own size
    for full, low in zip(maps, small, strict=True):
        assert full.shape == (size, size)
        assert torch.allclose(torch.from_numpy(upsample_bilinear(low, size)), torch.from_numpy(full), atol=1e-6)
