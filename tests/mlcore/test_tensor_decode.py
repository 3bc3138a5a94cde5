"""mlcore.tensor_decode: the GPU worker's JPEG path (torchvision's decode_jpeg), run here on the CPU,
against the Pillow path it replaces; and the Predictor's tensor entry point and warm-up."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image, ImageCms, ImageOps

from mlcore import tensor_decode
from mlcore.drift import FEATURE_SIZE
from mlcore.inference import Predictor, decode_side, warm_up
from mlcore.model import CheckpointMeta, build_model
from mlcore.preprocessing import TransformSpec, decode_image, to_tensor

SPEC = TransformSpec(64, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def _photo(size=(160, 120), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 1.5 % 256, y * 2 % 256, (x + y) % 256], -1) + rng.normal(0, 6, (size[1], size[0], 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92, **options)
    return buffer.getvalue()


def _with_orientation(image: Image.Image, orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return _jpeg(image, exif=exif)


@pytest.mark.parametrize("orientation", range(1, 9))
def test_orient_turns_a_tensor_exactly_as_pillow_turns_the_photo(orientation):
    data = _with_orientation(_photo((40, 24)), orientation)
    expected = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data)).convert("RGB")))
    raw = torch.from_numpy(np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))).permute(2, 0, 1)
    got = tensor_decode.orient(raw, orientation).permute(1, 2, 0).numpy()
    np.testing.assert_array_equal(got, expected)


@pytest.mark.parametrize("orientation", [1, 6, 3, 8])
def test_batch_decode_matches_the_pillow_path(orientation):
    payloads = [_with_orientation(_photo(seed=seed), orientation) for seed in range(3)]
    ok = [tensor_decode.eligible(data, max_pixels=10**8) for data in payloads]
    assert ok == [(True, orientation)] * 3
    results = tensor_decode.decode_batch(payloads, [orientation] * 3, spec=SPEC, feature_size=FEATURE_SIZE,
                                         device=torch.device("cpu"))  # fmt: skip
    for data, result in zip(payloads, results, strict=True):
        reference = decode_image(data).image
        assert result.tensor.shape == (3, 64, 64)
        assert result.thumbnail.size == (FEATURE_SIZE, FEATURE_SIZE)
        # the same photo, the same way up: only the resize's rounding differs
        expected = np.asarray(reference.resize((FEATURE_SIZE, FEATURE_SIZE), Image.Resampling.BILINEAR), np.float32)
        difference = np.abs(np.asarray(result.thumbnail, np.float32) - expected)
        assert difference.mean() < 2.0, difference.mean()
        pillow_tensor = to_tensor(reference, SPEC)
        assert (result.tensor - pillow_tensor).abs().mean() < 0.05


def test_files_decode_jpeg_cannot_read_faithfully_are_not_eligible():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    with_profile = _jpeg(_photo(), icc_profile=profile)
    cmyk = _jpeg(_photo().convert("CMYK"))
    png = io.BytesIO()
    _photo().save(png, format="PNG")
    assert tensor_decode.eligible(with_profile, max_pixels=10**8) == (False, 1)
    assert tensor_decode.eligible(cmyk, max_pixels=10**8) == (False, 1)
    assert tensor_decode.eligible(png.getvalue(), max_pixels=10**8) == (False, 1)
    assert tensor_decode.eligible(_jpeg(_photo()), max_pixels=100) == (False, 1)  # over the pixel limit
    assert tensor_decode.eligible(_jpeg(_photo().convert("L")), max_pixels=10**8) == (True, 1)


def test_one_undecodable_file_in_a_batch_is_reported_alone():
    good = _jpeg(_photo())
    broken = good[:200] + bytes(len(good) - 200)  # headers intact, scan data gone
    results = tensor_decode.decode_batch([good, broken, good], [1, 1, 1], spec=SPEC, feature_size=FEATURE_SIZE,
                                         device=torch.device("cpu"))  # fmt: skip
    assert isinstance(results[0], tensor_decode.TensorImage) and isinstance(results[2], tensor_decode.TensorImage)
    torch.testing.assert_close(results[0].tensor, results[2].tensor)
    # decode_jpeg may read a zeroed scan as grey rather than fail; either way it is not the good photo
    assert isinstance(results[1], Exception) or not torch.allclose(results[1].tensor, results[0].tensor)


def test_the_cpu_can_always_decode_and_cuda_only_when_present():
    assert tensor_decode.available(torch.device("cpu"))
    if not torch.cuda.is_available():
        assert not tensor_decode.available(torch.device("cuda"))


def test_tensor_entry_point_and_pil_entry_point_agree_and_warm_up_runs():
    torch.manual_seed(0)
    predictor = Predictor(build_model("resnet18").eval(), CheckpointMeta(arch="resnet18", input_size=64),
                          device="cpu")  # fmt: skip
    images = [decode_image(_jpeg(_photo(seed=seed))).image for seed in range(3)]
    by_pil = predictor.predict_with_gradcam(images, embeddings=True)
    by_tensor = predictor.predict_with_gradcam_tensors(torch.stack([predictor.preprocess(i) for i in images]),
                                                       embeddings=True)  # fmt: skip
    assert [r.probability_malignant for r in by_pil[0]] == [r.probability_malignant for r in by_tensor[0]]
    np.testing.assert_array_equal(by_pil[2], by_tensor[2])
    assert predictor.to_device(torch.zeros(1, 3, 64, 64)).device.type == "cpu"
    assert warm_up(predictor, (1, 4)) > 0


def test_decode_side_is_twice_the_largest_resize():
    assert decode_side(224) == 2 * max(224, FEATURE_SIZE)
    assert decode_side(512) == 1024
