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


def _resize(image: torch.Tensor, size: int) -> torch.Tensor:
    """uint8 or float C x H x W -> float 1 x C x size x size, squashed like resize_for_model, antialiased."""
    batch = image.unsqueeze(0).float()
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
    results: list[TensorImage | Exception] = []
    for image, orientation in zip(decoded, orientations, strict=True):
        if isinstance(image, Exception):
            results.append(image)
            continue
        try:
            upright = orient(image, orientation)
            model_input = ((_resize(upright, spec.input_size) - mean) / std)[0]
            thumbnail = _resize(upright, feature_size)[0].round().clamp(0, 255).to(torch.uint8)
            pixels = np.ascontiguousarray(thumbnail.permute(1, 2, 0).cpu().numpy())
        except Exception as exc:  # out of memory on a huge photo, say: this one goes to Pillow
            results.append(exc)
            continue
        results.append(TensorImage(tensor=model_input, thumbnail=Image.fromarray(pixels, mode="RGB")))
    return results


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
