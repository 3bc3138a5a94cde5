"""Small builders shared by the mlcore tests. Nothing here imports Django."""

from __future__ import annotations

import io
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from mlcore.data import generate_lesion
from mlcore.model import CheckpointMeta, build_model
from mlcore.preprocessing import ImageValidationError, decode_image


def encode(image: Image.Image, image_format: str, **kwargs: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **kwargs)
    return buffer.getvalue()


def lesion_image(*, size: int = 64, seed: int = 0, malignant: bool = True) -> Image.Image:
    return generate_lesion(np.random.default_rng(seed), malignant=malignant, size=size).image


def rejection(data: bytes, **kwargs: int) -> ImageValidationError:
    """Decode bytes that must be refused and return the error."""
    with pytest.raises(ImageValidationError) as info:
        decode_image(data, **kwargs)
    return info.value


def pixels(image: Image.Image) -> np.ndarray:
    return np.asarray(image, dtype=np.int16)


def tiny_model(seed: int = 0, *, num_classes: int = 2) -> torch.nn.Module:
    """A seeded resnet_tiny whose batch-norm buffers are no longer at their defaults, in eval mode."""
    torch.manual_seed(seed)
    model = build_model("resnet_tiny", num_classes=num_classes)
    model.train()
    with torch.no_grad():
        model(torch.randn(8, 3, 32, 32))  # moves the running mean / var away from 0 / 1
    return model.eval()


def tiny_meta(**overrides: object) -> CheckpointMeta:
    values: dict[str, object] = {"arch": "resnet_tiny", "input_size": 32}
    values.update(overrides)
    return CheckpointMeta(**values)  # type: ignore[arg-type]


def lesion_batch(count: int, *, size: int = 48, seed: int = 100) -> list[Image.Image]:
    return [lesion_image(size=size, seed=seed + index, malignant=bool(index % 2)) for index in range(count)]


class HostilePayload:
    """Unpickling this runs a shell command that creates ``marker``: what a malicious checkpoint would do."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return os.system, (f"touch '{self.marker}'",)
