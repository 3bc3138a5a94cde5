"""Decode and validate uploaded image bytes, and the one eval transform shared by training and serving.

Decoding imports only Pillow and NumPy, so the web tier can validate uploads without loading torch.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image, ImageCms, ImageFile, ImageOps, UnidentifiedImageError

# The metadata stripping of JPEG and PNG uploads lives in mlcore.metadata; ORIENTATION_TAG stays importable here.
from .metadata import ORIENTATION_TAG, strip_jpeg, strip_png

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
    width: int  # of `image` (reduced where max_side let Pillow's draft mode decode at a smaller scale)
    height: int
    full_width: int = 0  # the photo's own upright size, whatever scale it was decoded at
    full_height: int = 0


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


def _open_checked(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """Size, sniffing and the header: an opened but not yet decoded image, its pixel count checked.
    Call inside _quiet_bomb_warnings()."""
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
    return image


@contextlib.contextmanager
def _quiet_bomb_warnings():
    # Our own max_pixels check is the limit; Pillow's warning would only duplicate it.
    # (Pillow still refuses images over twice its MAX_IMAGE_PIXELS, about 179 MP, outright.)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        yield


def decode_image(
    data: bytes,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int | None = None,
    copy_pixels: bool = True,
) -> DecodedImage:
    """Validate and fully decode image bytes into an oriented RGB image.

    max_side: where only a smaller copy is needed (the model's input, an explanation's overlay), a
    large JPEG is decoded at a reduced DCT scale (Pillow's draft mode) whose longest side is still at
    least this: a 6000x4000 photo then costs a sixteenth of the memory and time. `width` and `height`
    are then those of the reduced image.

    copy_pixels: the returned image is a fresh copy with no info dict at all (what may be written out
    again); a worker that only computes on the pixels skips the copy.

    Raises ImageValidationError with a message a clinician can act on.
    """
    with _quiet_bomb_warnings():
        image = _open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels)
        width, height = image.size
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
        loaded_size = image.size
        rgb = _to_rgb(oriented if oriented is not None else image)
    full_width, full_height = (height, width) if rgb.size != loaded_size else (width, height)  # turned upright
    if not copy_pixels:
        return DecodedImage(image=rgb, source_format=source_format, width=rgb.width, height=rgb.height,
                            full_width=full_width, full_height=full_height)  # fmt: skip
    # A fresh image carries no info dict: EXIF (GPS included), XMP, ICC and comments are all gone.
    clean = Image.frombytes("RGB", rgb.size, rgb.tobytes())
    return DecodedImage(image=clean, source_format=source_format, width=clean.width, height=clean.height,
                        full_width=full_width, full_height=full_height)  # fmt: skip


# --- uploads: validate the header, strip metadata without decoding ---------------------------------


@dataclass(frozen=True)
class PreparedUpload:
    """What is stored for an upload: `data` under `extension` / `content_type`, and the upright size."""

    data: bytes
    extension: str
    content_type: str
    width: int
    height: int
    source_format: str
    lossless: bool  # the client's compressed pixels, metadata segments removed (else decoded and re-encoded)
    camera: str = ""  # the camera's make and model from the EXIF block (kept for monitoring; the block is not)


_TRANSPOSED = (5, 6, 7, 8)  # EXIF orientations that swap width and height


def prepare_upload(
    data: bytes, *, max_bytes: int = DEFAULT_MAX_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS,
    max_convert_pixels: int | None = None, convert_slot=contextlib.nullcontext,
) -> PreparedUpload:  # fmt: skip
    """The web tier's validation: only as much decoding as it needs.

    A JPEG or PNG is checked from its header (format, size, pixel count) and its segment structure
    (every segment complete, CRCs of PNG chunks, a JPEG that ends), then stored as the client's own
    compressed pixels with every metadata segment removed: EXIF (GPS, camera, dates, thumbnails), XMP,
    IPTC, comments, PNG text and time chunks, and anything after the image's end. What only affects how
    the pixels look is kept: a valid colour profile of at most 64 KB, Adobe's colour transform flag, PNG
    transparency and gamma, and the EXIF orientation (rewritten as an EXIF block that holds nothing else). decode_image
    applies them. No pixel is decoded or re-encoded: the worker's full decode finds any damage inside
    the compressed data and fails that image with the reason.

    Anything else (WebP, arithmetic-coded or 12-bit JPEG, a PNG with an EXIF block, a colour profile
    that is broken or over 64 KB, a file whose structure is not clean) is decoded in full here and
    re-encoded from its pixels, as before: encode_for_storage. That costs about 20 bytes of memory per
    pixel, whatever the file's size (a 422-byte lossless WebP of 3000 x 3000 took 195 MB), so the caller
    bounds it: a file over `max_convert_pixels` is refused (code too_large_to_convert), and the decode
    runs inside `convert_slot()` (a context manager: the web tier's semaphore). Raises
    ImageValidationError.
    """
    with _quiet_bomb_warnings():
        header = _open_checked(data, max_bytes=max_bytes, max_pixels=max_pixels)
        stripped = None
        if not _plausible_profile(header.info.get("icc_profile")):
            pass  # decode_image drops a profile that is no profile, or converts and drops a huge one
        elif header.format in ("JPEG", "MPO"):
            stripped = strip_jpeg(data, _orientation(header), header.info.get("icc_profile"))
        elif header.format == "PNG":
            stripped = strip_png(data, header.info.get("icc_profile"))
        if stripped is not None and _same_header(stripped, header):
            orientation = _orientation(header) if header.format != "PNG" else 1
            width, height = header.size
            if orientation in _TRANSPOSED:
                width, height = height, width
            png = header.format == "PNG"
            return PreparedUpload(
                data=stripped, extension="png" if png else "jpg", content_type="image/png" if png else "image/jpeg",
                width=width, height=height, source_format="PNG" if png else "JPEG", lossless=True,
                camera=camera_of(header),
            )  # fmt: skip
    width, height = header.size
    if max_convert_pixels is not None and width * height > max_convert_pixels:
        kind = "JPEG or PNG" if header.format in ("JPEG", "MPO", "PNG") else header.format or "image"
        raise ImageValidationError(
            "too_large_to_convert",
            f"This {kind} file ({width} x {height} pixels) has to be converted on the server, which takes photos "
            f"of up to {max_convert_pixels / 1e6:.0f} megapixels. Send it as a plain JPEG or PNG, or smaller.",
        )
    with convert_slot():
        decoded = decode_image(data, max_bytes=max_bytes, max_pixels=max_pixels)
        clean, extension, content_type = encode_for_storage(decoded)
    return PreparedUpload(
        data=clean, extension=extension, content_type=content_type, width=decoded.width, height=decoded.height,
        source_format=decoded.source_format, lossless=False, camera=camera_of(header),
    )  # fmt: skip


def camera_of(image: Image.Image) -> str:
    """ "Make Model" from the EXIF block (tags 0x010F and 0x0110), printable characters only, at most 100;
    "" when there is none. Not personal data: a clinic's monitoring groups its photos by camera."""
    try:
        exif = image.getexif()
        parts = [str(exif.get(tag, "")).strip("\x00 ").strip() for tag in (0x010F, 0x0110)]
    except Exception:  # a corrupt EXIF block
        return ""
    make, model = ("".join(ch for ch in part if ch.isprintable()) for part in parts)
    if make and model.lower().startswith(make.lower()):
        make = ""  # "Apple iPhone 15" rather than "Apple Apple iPhone 15"
    return " ".join(part for part in (make, model) if part)[:100]


MAX_KEPT_PROFILE_BYTES = 64 * 1024  # sRGB is 3 KB, Display P3 and Adobe RGB under 1 KB


def _plausible_profile(icc: bytes | None) -> bool:
    """No profile, or a real ICC profile of a sensible size: worth keeping with the pixels."""
    if not icc:
        return True
    if len(icc) > MAX_KEPT_PROFILE_BYTES:
        return False
    try:
        ImageCms.ImageCmsProfile(io.BytesIO(icc))
    except (ImageCms.PyCMSError, OSError, ValueError, TypeError):
        return False
    return True


def _orientation(image: Image.Image) -> int:
    try:
        value = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # a corrupt EXIF block: decode_image would not turn the photo either
        return 1
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


def _same_header(stripped: bytes, original: Image.Image) -> bool:
    try:
        reopened = Image.open(io.BytesIO(stripped), formats=("JPEG", "PNG"))
    except Exception:
        return False
    return reopened.size == original.size and reopened.mode == original.mode


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
