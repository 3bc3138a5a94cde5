"""Decode and validate uploaded image bytes, and the one eval transform shared by training and serving.

Decoding imports only Pillow and NumPy, so the web tier can validate uploads without loading torch.
"""

from __future__ import annotations

import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

if TYPE_CHECKING:
    import torch

ACCEPTED_FORMATS = ("JPEG", "PNG", "WEBP")
DEFAULT_MAX_BYTES = 20 * 1024 * 1024
DEFAULT_MAX_PIXELS = 40_000_000

# Never accept a truncated file silently: a half-grey lesion photo would still get a risk score.
ImageFile.LOAD_TRUNCATED_IMAGES = False

_MAGIC = (
    (b"GIF87a", "GIF"),
    (b"GIF89a", "GIF"),
    (b"%PDF", "PDF"),
    (b"BM", "BMP"),
    (b"II*\x00", "TIFF"),
    (b"MM\x00*", "TIFF"),
    (b"\x00\x00\x01\x00", "ICO"),
    (b"8BPS", "PSD"),
)


class ImageValidationError(ValueError):
    """The bytes are not an image we accept. ``code`` is stable for API clients; the message is for people."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass(frozen=True)
class DecodedImage:
    image: Image.Image  # RGB, EXIF orientation applied, metadata gone
    source_format: str  # JPEG, PNG or WEBP
    width: int
    height: int


def _too_many_pixels(max_pixels: int) -> ImageValidationError:
    return ImageValidationError(
        "too_many_pixels", f"The image has too many pixels; the limit is {max_pixels / 1e6:.0f} megapixels."
    )


def _truncated() -> ImageValidationError:
    return ImageValidationError(
        "truncated_image", "The image file is truncated: part of it is missing. Upload it again."
    )


def _damaged() -> ImageValidationError:
    return ImageValidationError(
        "corrupt_image", "The image is damaged or incomplete and cannot be read. Upload the original again."
    )


def _sniff_unsupported(data: bytes) -> str | None:
    head = data[:512]
    for magic, name in _MAGIC:
        if head.startswith(magic):
            return name
    text = head.lstrip().lower()
    if text.startswith((b"<svg", b"<?xml")) or b"<svg" in text:
        return "SVG"
    if text.startswith((b"<!doctype html", b"<html")):
        return "HTML"
    if head[4:12] in (b"ftypheic", b"ftypheix", b"ftypmif1", b"ftypavif"):
        return "HEIC/AVIF"
    return None


def _to_rgb(image: Image.Image) -> Image.Image:
    """Convert any accepted mode to 8-bit sRGB without silently mangling colours."""
    icc = image.info.get("icc_profile")
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float64)
        maximum = 65535.0 if image.mode.startswith("I;16") or array.max() > 255 else 255.0
        array = np.clip(array / maximum * 255.0 + 0.5, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    elif image.mode == "F":
        array = np.nan_to_num(np.asarray(image, dtype=np.float64))
        array = np.clip(array, 0, 255).astype(np.uint8)
        image = Image.fromarray(array, mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "RGB" and "transparency" in image.info):
        # Transparent areas become white, as they would look on a printed report.
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    if icc and image.mode in ("RGB", "RGBA", "CMYK", "L"):
        try:
            source_profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
            target_profile = ImageCms.createProfile("sRGB")
            image = ImageCms.profileToProfile(image, source_profile, target_profile, outputMode="RGB")
        except (ImageCms.PyCMSError, OSError, ValueError):
            pass  # a broken profile is dropped; the pixels are still usable as plain RGB
    return image.convert("RGB")


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
) -> DecodedImage:
    """Validate and fully decode image bytes into an oriented RGB image.

    max_side: where only a smaller copy is needed (an explanation's overlay), a large JPEG is
    decoded at a reduced DCT scale (Pillow's draft mode) whose longest side is still at least this:
    a 6000x4000 photo then costs a sixteenth of the memory and time.

    Raises ImageValidationError with a message a clinician can act on.
    """
    if not data:
        raise ImageValidationError("empty_file", "The file is empty (0 bytes).")
    if len(data) > max_bytes:
        raise ImageValidationError(
            "file_too_large",
            f"The file is {len(data) / 1e6:.1f} MB; the limit is {max_bytes / 1e6:.0f} MB.",
        )
    unsupported = _sniff_unsupported(data)
    if unsupported:
        raise ImageValidationError(
            "unsupported_format", f"{unsupported} files are not accepted. Upload a JPEG, PNG or WebP photo."
        )
    with warnings.catch_warnings():
        # Our own max_pixels check below is the limit; Pillow's warning would only duplicate it.
        # (Pillow still refuses images over twice its MAX_IMAGE_PIXELS, about 179 MP, outright.)
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            image = Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS)
        except UnidentifiedImageError:
            raise ImageValidationError(
                "not_an_image", "The file is not a readable image. Upload a JPEG, PNG or WebP photo."
            ) from None
        except Image.DecompressionBombError:
            raise _too_many_pixels(max_pixels) from None
        except Exception as exc:
            if "truncated" in str(exc).lower():
                raise _truncated() from None
            raise _damaged() from None

        width, height = image.size
        if width < 1 or height < 1:
            raise ImageValidationError("corrupt_image", "The image has no pixels.")
        if width * height > max_pixels:
            raise ImageValidationError(
                "too_many_pixels",
                f"The image is {width}×{height} pixels ({width * height / 1e6:.0f} megapixels); "
                f"the limit is {max_pixels / 1e6:.0f} megapixels.",
            )
        source_format = image.format or "UNKNOWN"
        if max_side is not None and source_format == "JPEG" and max(width, height) > 2 * max_side:
            scale = max_side / max(width, height)
            image.draft("RGB", (max(1, int(width * scale + 0.999)), max(1, int(height * scale + 0.999))))
        try:
            image.load()  # the full decode: catches truncation and corrupt data
        except Image.DecompressionBombError:
            raise _too_many_pixels(max_pixels) from None
        except Exception as exc:
            if "truncated" in str(exc).lower():
                raise _truncated() from None
            raise _damaged() from None

        try:
            oriented = ImageOps.exif_transpose(image)
        except Exception:  # a corrupt EXIF block must not reject a good photo
            oriented = image
        rgb = _to_rgb(oriented if oriented is not None else image)
    # A fresh image carries no info dict: EXIF (GPS included), XMP, ICC and comments are all gone.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    return DecodedImage(image=clean, source_format=source_format, width=clean.width, height=clean.height)


def encode_for_storage(decoded: DecodedImage) -> tuple[bytes, str, str]:
    """Re-encode pixels only. Returns (bytes, extension, content type).

    JPEGs stay JPEG at high quality with full chroma resolution; PNG and WebP become lossless PNG.
    """
    buffer = io.BytesIO()
    if decoded.source_format == "JPEG":
        decoded.image.save(buffer, format="JPEG", quality=95, subsampling=0, optimize=True)
        return buffer.getvalue(), "jpg", "image/jpeg"
    decoded.image.save(buffer, format="PNG", optimize=False, compress_level=6)
    return buffer.getvalue(), "png", "image/png"


@dataclass(frozen=True)
class TransformSpec:
    input_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]


def resize_for_model(image: Image.Image, input_size: int) -> Image.Image:
    """Squash to a square rather than centre-crop: no part of a lesion is ever cut off, and a heatmap
    computed on the model input maps back onto the whole photo."""
    if image.mode != "RGB":
        image = _to_rgb(image)  # the same conversion as uploads: transparency becomes white, not black
    if image.size == (input_size, input_size):
        return image
    return image.resize((input_size, input_size), Image.Resampling.BILINEAR, reducing_gap=3.0)


def to_tensor(image: Image.Image, spec: TransformSpec) -> torch.Tensor:
    """The eval transform: resize, scale to [0, 1], normalise. Training applies augmentations first."""
    import torch

    array = np.asarray(resize_for_model(image, spec.input_size), dtype=np.float32) / 255.0
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    array = (array - mean) / std
    return torch.from_numpy(np.ascontiguousarray(array.transpose(2, 0, 1)))
