"""The drift reference is described from the same pixels as an upload in service: a large JPEG is decoded
in Pillow's draft mode by the training pipeline exactly as by an inference worker."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from mlcore import drift
from mlcore.datasets import load_files
from mlcore.inference import decode_side
from mlcore.model import CheckpointMeta
from mlcore.preprocessing import TransformSpec, decode_image, prepare_upload


def large_photo(width: int = 2400, height: int = 1800, orientation: int = 6) -> bytes:
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    blob = np.exp(-(((x - width * 0.55) ** 2 + (y - height * 0.45) ** 2) / (2 * (height * 0.2) ** 2)))
    rgb = np.array([205, 160, 135], np.float32) * (1 - blob[..., None]) + np.array([90, 55, 40]) * blob[..., None]
    rgb += (np.sin(x / 3.0) * np.cos(y / 4.0))[..., None] * 8 + rng.normal(0, 6, (height, width, 3))
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def test_a_large_photo_gets_the_same_drift_features_in_training_and_in_service(tmp_path):
    from diagnosis.services.decoding import _decode_and_prepare

    data = large_photo()
    (tmp_path / "benign").mkdir()
    (tmp_path / "benign" / "photo.jpg").write_bytes(data)
    split = load_files([(tmp_path / "benign" / "photo.jpg", 0)], root=tmp_path, image_size=64, what="test",
                       with_features=True, progress=False)  # fmt: skip
    reference = split.items[0].features

    # What a worker stores for the same photo uploaded: the upload's upright size from the web tier's header
    # check, the pixels from the worker's own decode (services.monitoring.record_upload_features).
    upload = prepare_upload(data)
    meta = CheckpointMeta(arch="resnet_tiny", input_size=64)
    prepared = _decode_and_prepare(upload.data, TransformSpec(64, meta.mean, meta.std), decode_side(64))
    served = {**drift.image_features(prepared.image),
              **drift.file_features(width=upload.width, height=upload.height, file_size=len(data))}  # fmt: skip
    assert (upload.width, upload.height) == (1800, 2400)  # turned upright
    assert served == pytest.approx(reference, rel=1e-9)

    # A full decode, as the training pipeline used to describe the reference, sees different pixels:
    full = drift.image_features(decode_image(data).image)
    assert abs(full["sharpness"] / served["sharpness"] - 1) > 0.01
