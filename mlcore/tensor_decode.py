"""JPEG decoding straight into model tensors with torchvision (nvJPEG on CUDA), for GPU workers.

On a GPU worker, CPU decoding is the bottleneck (about 15 ms per 1024x768 photo on one core, against
well under 0.1 ms per image for resnet18's forward pass). `torchvision.io.decode_jpeg(..., device="cuda")`
decodes a whole batch on the GPU; orientation, resizing and normalisation then stay on the GPU too.

Only plain JPEGs go this way: 8-bit, RGB or greyscale, without a colour profile (a profile needs
Pillow's colour management). Everything else, and any file the batch decoder refuses, goes through
mlcore.preprocessing.decode_image on the CPU, which also turns real damage into a message in words.
The same code runs on the CPU (device "cpu"), which is how the tests cover it on machines without a GPU.
"""

from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from .preprocessing import ORIENTATION_TAG, TransformSpec

GROUP_BYTES = 256 << 20  # float pixels resized in one call


@dataclass(frozen=True)
class TensorImage:
    tensor: torch.Tensor  # normalised model input, 3 x input_size x input_size, on the decode device
    thumbnail: Image.Image  # RGB, feature_size x feature_size: what the drift features are computed on


def eligible(data: bytes, *, max_pixels: int) -> tuple[bool, int]:
    """Whether the bytes can be decoded by decode_jpeg, and their EXIF orientation (1 when none)."""
    try:
        image = Image.open(io.BytesIO(data), formats=("JPEG",))
    except Exception:
        return False, 1
    if image.format != "JPEG" or image.mode not in ("RGB", "L") or image.info.get("icc_profile"):
        return False, 1
    if image.info.get("adobe_transform") == 0:  # RGB-coded: Pillow's reading of it is the reference
        return False, 1
    if image.width * image.height > max_pixels or getattr(image, "bits", 8) != 8:
        return False, 1
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:
        orientation = 1
    return True, orientation if isinstance(orientation, int) and 1 <= orientation <= 8 else 1


def orient(image: torch.Tensor, orientation: int) -> torch.Tensor:
    """EXIF orientation on a C x H x W tensor, exactly as PIL.ImageOps.exif_transpose does it."""
    if orientation == 2:
        return image.flip(-1)
    if orientation == 3:
        return image.flip(-1, -2)
    if orientation == 4:
        return image.flip(-2)
    if orientation == 5:
        return image.transpose(-1, -2)
    if orientation == 6:
        return torch.rot90(image, -1, dims=(-2, -1))
    if orientation == 7:
        return image.transpose(-1, -2).flip(-1, -2)
    if orientation == 8:
        return torch.rot90(image, 1, dims=(-2, -1))
    return image


def _resize_batch(batch: torch.Tensor, size: int) -> torch.Tensor:
    """float N x C x H x W -> N x C x size x size, squashed like resize_for_model, antialiased."""
    if batch.shape[-2:] == (size, size):
        return batch
    return F.interpolate(batch, size=(size, size), mode="bilinear", antialias=True, align_corners=False)


def decode_batch(
    payloads: list[bytes], orientations: list[int], *, spec: TransformSpec, feature_size: int, device: torch.device
) -> list[TensorImage | Exception]:
    """Decode JPEG bytes on `device` and prepare each for the model. One entry per payload: the
    prepared image, or the exception that decoding it raised (its caller decodes it on the CPU instead)."""
    from torchvision.io import ImageReadMode, decode_jpeg

    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in payloads]
    try:
        decoded: list[torch.Tensor | Exception] = list(decode_jpeg(tensors, mode=ImageReadMode.RGB, device=device))
    except Exception:  # one bad file fails the whole batched call: decode them one by one
        decoded = []
        for tensor in tensors:
            try:
                decoded.append(decode_jpeg(tensor, mode=ImageReadMode.RGB, device=device))
            except Exception as exc:
                decoded.append(exc)
    mean = torch.tensor(spec.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(spec.std, device=device).view(1, 3, 1, 1) * 255
    results: list[TensorImage | Exception | None] = [None] * len(payloads)
    # Photos of one shape (one camera, say) are resized together: a few kernels for the whole group
    # instead of a few per photo, and one copy of all thumbnails to the host instead of one per photo.
    groups: dict[tuple[int, ...], list[tuple[int, torch.Tensor]]] = {}
    for index, (image, orientation) in enumerate(zip(decoded, orientations, strict=True)):
        if isinstance(image, Exception):
            results[index] = image
            continue
        upright = orient(image, orientation)
        groups.setdefault(tuple(upright.shape), []).append((index, upright))
    chunks = []
    for members in groups.values():  # at most GROUP_BYTES of float pixels at a time
        _, height, width = members[0][1].shape
        per_chunk = max(1, GROUP_BYTES // (3 * height * width * 4))
        chunks += [members[start : start + per_chunk] for start in range(0, len(members), per_chunk)]
    for members in chunks:
        try:
            prepared = _prepare_group([upright for _, upright in members], spec, feature_size, mean, std)
        except Exception:  # out of memory on a huge group, say: each photo alone
            prepared = []
            for _, upright in members:
                try:
                    prepared += _prepare_group([upright], spec, feature_size, mean, std)
                except Exception as exc:  # this one goes to Pillow
                    prepared.append(exc)
        for (index, _), item in zip(members, prepared, strict=True):
            results[index] = item
    return results  # type: ignore[return-value]


def _prepare_group(
    images: list[torch.Tensor], spec: TransformSpec, feature_size: int, mean: torch.Tensor, std: torch.Tensor
) -> list[TensorImage | Exception]:
    """Upright uint8 images of one shape -> model inputs (on their device) and RGB thumbnails."""
    batch = torch.stack(images).float()
    model_inputs = (_resize_batch(batch, spec.input_size) - mean) / std
    thumbnails = _resize_batch(batch, feature_size).round().clamp(0, 255).to(torch.uint8)
    pixels = thumbnails.permute(0, 2, 3, 1).contiguous().cpu().numpy()
    return [
        TensorImage(tensor=model_input, thumbnail=Image.fromarray(np.ascontiguousarray(rgb), mode="RGB"))
        for model_input, rgb in zip(model_inputs, pixels, strict=True)
    ]


def available(device: torch.device) -> bool:
    """Whether decode_jpeg runs on this device (nvJPEG ships with torchvision's CUDA builds)."""
    if device.type == "cpu":
        return True
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    try:
        from torchvision.io import decode_jpeg

        probe = io.BytesIO()
        Image.new("RGB", (16, 16), (10, 20, 30)).save(probe, format="JPEG")
        decode_jpeg(torch.frombuffer(bytearray(probe.getvalue()), dtype=torch.uint8), device=device)
        return True
    except Exception:
        return False
