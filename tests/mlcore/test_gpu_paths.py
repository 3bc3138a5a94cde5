"""What the H100 measurements changed, checked on the CPU: decode_batch resizes photos of one shape
together (and keeps every result in its place), the Grad-CAM maps come back in one copy, the blurred
baseline is computed from the model input on its device, and Integrated Gradients can run under bf16
autocast (EXPLAIN_PRECISION) with maps that agree with fp32's."""

from __future__ import annotations

import io
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image, ImageFilter

from mlcore import tensor_decode
from mlcore.drift import FEATURE_SIZE
from mlcore.explain import Explainer, gaussian_blur, resolve_precision
from mlcore.preprocessing import TransformSpec, resize_for_model, to_tensor
from tests.mlcore.helpers import lesion_batch, tiny_meta, tiny_model

SPEC = TransformSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
CPU = torch.device("cpu")


def _jpeg(size: tuple[int, int], seed: int, orientation: int = 1) -> bytes:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    pixels = np.stack([x * 3 % 256, y * 2 % 256, (x + 2 * y) % 256], -1) + rng.normal(0, 8, (size[1], size[0], 3))
    image = Image.fromarray(pixels.clip(0, 255).astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, exif=exif.tobytes())
    return buffer.getvalue()


# --- decode_batch: photos of one shape together ------------------------------------------------------


def test_a_mixed_batch_gives_each_photo_what_it_gets_alone_in_its_place():
    # Two shapes, turned photos that end up in a third shape, a broken file between them.
    payloads = [_jpeg((96, 64), 1), _jpeg((80, 80), 2), b"\xff\xd8 not a jpeg", _jpeg((96, 64), 3, 6),
                _jpeg((96, 64), 4), _jpeg((64, 96), 5)]  # fmt: skip
    orientations = [1, 1, 1, 6, 1, 1]
    batch = tensor_decode.decode_batch(payloads, orientations, spec=SPEC, feature_size=FEATURE_SIZE, device=CPU)
    assert len(batch) == len(payloads)
    assert isinstance(batch[2], Exception)
    for index in (0, 1, 3, 4, 5):
        (alone,) = tensor_decode.decode_batch([payloads[index]], [orientations[index]], spec=SPEC,
                                              feature_size=FEATURE_SIZE, device=CPU)  # fmt: skip
        torch.testing.assert_close(batch[index].tensor, alone.tensor, atol=1e-5, rtol=0)
        assert np.array_equal(np.asarray(batch[index].thumbnail), np.asarray(alone.thumbnail)), index
    # The turned photo (orientation 6) and the portrait one share a shape but not their pixels.
    assert not torch.equal(batch[3].tensor, batch[5].tensor)
    assert not torch.equal(batch[0].tensor, batch[4].tensor)


def test_a_group_larger_than_the_float_budget_is_resized_in_chunks(monkeypatch):
    payloads = [_jpeg((96, 64), seed) for seed in range(5)]
    whole = tensor_decode.decode_batch(payloads, [1] * 5, spec=SPEC, feature_size=FEATURE_SIZE, device=CPU)
    sizes = []
    original = tensor_decode._prepare_group

    def spy(images, *args):
        sizes.append(len(images))
        return original(images, *args)

    monkeypatch.setattr(tensor_decode, "_prepare_group", spy)
    monkeypatch.setattr(tensor_decode, "GROUP_BYTES", 2 * 3 * 96 * 64 * 4)  # two photos' float pixels
    chunked = tensor_decode.decode_batch(payloads, [1] * 5, spec=SPEC, feature_size=FEATURE_SIZE, device=CPU)
    assert sizes == [2, 2, 1]
    for a, b in zip(whole, chunked, strict=True):
        torch.testing.assert_close(a.tensor, b.tensor)


def test_a_failing_group_falls_back_to_one_photo_at_a_time(monkeypatch):
    payloads = [_jpeg((96, 64), seed) for seed in range(3)]
    original = tensor_decode._prepare_group

    def fails_for_groups(images, *args):
        if len(images) > 1:
            raise RuntimeError("CUDA out of memory")
        return original(images, *args)

    monkeypatch.setattr(tensor_decode, "_prepare_group", fails_for_groups)
    results = tensor_decode.decode_batch(payloads, [1] * 3, spec=SPEC, feature_size=FEATURE_SIZE, device=CPU)
    assert all(isinstance(result, tensor_decode.TensorImage) for result in results)


# --- the blurred baseline -----------------------------------------------------------------------------


def test_gaussian_blur_keeps_constants_and_the_mean_and_smooths():
    flat = torch.full((1, 3, 20, 20), 0.7)
    torch.testing.assert_close(gaussian_blur(flat, 3.0), flat)
    noise = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    blurred = gaussian_blur(noise, 2.0)
    assert blurred.shape == noise.shape
    assert float(blurred.std()) < 0.5 * float(noise.std())
    # Images are blurred independently, channel by channel.
    torch.testing.assert_close(gaussian_blur(noise[1:], 2.0), blurred[1:])
    # A sigma wider than the image still works (edges extended).
    assert torch.isfinite(gaussian_blur(noise, 40.0)).all()


def test_the_blurred_baseline_matches_pillows_gaussian_blur_of_the_photo():
    explainer = Explainer(tiny_model(seed=1), tiny_meta())
    size = explainer.meta.input_size
    for image in lesion_batch(3, size=80, seed=11):
        ours = explainer.baseline("blurred", image)[0]
        pillow = to_tensor(resize_for_model(image, size).filter(ImageFilter.GaussianBlur(radius=size / 12)),
                           explainer.spec)  # fmt: skip
        # Same sigma; Pillow approximates the Gaussian with box blurs and rounds to 8 bits.
        correlation = np.corrcoef(ours.numpy().ravel(), pillow.numpy().ravel())[0, 1]
        assert correlation > 0.98
        assert float((ours - pillow).abs().mean()) < 0.05


def test_black_and_mean_baselines_are_what_their_names_say():
    explainer = Explainer(tiny_model(seed=1), tiny_meta())
    image = lesion_batch(1, size=48, seed=3)[0]
    black = explainer.baseline("black", image)
    reference = explainer.input_tensor(Image.new("RGB", image.size, (0, 0, 0)))
    torch.testing.assert_close(black, reference, atol=1e-6, rtol=0)
    assert torch.count_nonzero(explainer.baseline("mean", image)) == 0


# --- precision ----------------------------------------------------------------------------------------


def test_auto_precision_is_bf16_on_cuda_and_fp32_elsewhere():
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("auto", CPU) == "fp32"
    assert resolve_precision("bf16", CPU) == "bf16"
    with pytest.raises(ValueError, match="precision"):
        resolve_precision("fp16", CPU)


def test_bf16_integrated_gradients_agree_with_fp32():
    model, meta = tiny_model(seed=3), tiny_meta()
    exact = Explainer(model, meta, precision="fp32")
    fast = Explainer(model, meta, precision="bf16")
    assert fast.ig_forward.bf16 and not exact.ig_forward.bf16
    assert not fast.forward.bf16  # the other methods stay in fp32
    images = lesion_batch(3, size=48, seed=21)
    params = {"n_steps": 16, "baseline": "blurred"}
    reference = exact.explain_batch(images, "integrated_gradients", params, [1, 0, 1])
    approximate = fast.explain_batch(images, "integrated_gradients", params, [1, 0, 1])
    for a, b in zip(reference, approximate, strict=True):
        assert a.target_index == b.target_index
        assert np.corrcoef(a.map.ravel(), b.map.ravel())[0, 1] > 0.95
        assert not np.array_equal(a.map, b.map)  # it did run in another precision


def test_inputs_prepared_on_an_executor_equal_those_prepared_in_line():
    model, meta = tiny_model(seed=3), tiny_meta()
    images = lesion_batch(4, size=48, seed=5)
    with ThreadPoolExecutor(2) as pool:
        threaded = Explainer(model, meta, executor=pool).input_tensors(images)
    plain = Explainer(model, meta).input_tensors(images)
    assert threaded.shape == (4, 3, meta.input_size, meta.input_size)
    torch.testing.assert_close(threaded, plain, atol=0, rtol=0)
