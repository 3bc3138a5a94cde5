"""The portal's smaller copies of a stored photo (a 240 px thumbnail, the 1,024 px display size),
drawn once and kept beside the photo in the same private storage, instead of decoded again on every
page view. Their names follow from the photo's, so erasing an image erases them too
(retention._lock_and_list_files)."""

from __future__ import annotations

import logging
from pathlib import PurePosixPath

from django.conf import settings
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from mlcore.heatmap import DISPLAY_MAX_SIDE, display_jpeg
from mlcore.preprocessing import ImageValidationError

from ..models import LesionImage

logger = logging.getLogger(__name__)

THUMB_SIDE = 240
SIZES = ("thumb", "display")


class PreviewUnavailable(Exception):
    """The stored photo is missing or cannot be decoded, or the image was erased meanwhile."""


def preview_name(stored_name: str, size: str) -> str:
    """previews/<the photo's stem>-<size>.jpg"""
    return f"previews/{PurePosixPath(stored_name).stem}-{size}.jpg"


def preview_names(stored_names) -> list[str]:
    """Every preview a photo may have, drawn or not (deleting one that was never drawn is a no-op)."""
    return [preview_name(name, size) for name in stored_names if name for size in SIZES]


def preview_jpeg(image: LesionImage, size: str) -> bytes:
    """The JPEG of this size: the one kept from an earlier request, or drawn now and kept. Drawn with
    the model's and the heatmaps' decode (upright, colour-managed, transparency over white; a large
    JPEG at a reduced DCT scale), from pixels only: no metadata."""
    if size not in SIZES:
        raise ValueError(f"unknown preview size {size!r}")
    name = preview_name(image.file.name, size)
    try:
        with default_storage.open(name, "rb") as handle:
            return handle.read()
    except FileNotFoundError:
        pass
    data = _draw(image, size)
    saved = default_storage.save(name, ContentFile(data))
    if saved != name:  # another request drew it at the same moment: keep theirs only
        default_storage.delete(saved)
    if not LesionImage.objects.filter(pk=image.pk).exists():  # erased while it was drawn
        default_storage.delete(name)
        raise PreviewUnavailable("The image was deleted.")
    return data


def _draw(image: LesionImage, size: str) -> bytes:
    try:
        with image.file.open("rb") as handle:
            data = handle.read()
        return display_jpeg(data, THUMB_SIDE if size == "thumb" else DISPLAY_MAX_SIDE,  # the heatmaps' size
                            quality=85 if size == "thumb" else 90, max_pixels=settings.MAX_IMAGE_PIXELS,
                            max_bytes=max(settings.MAX_UPLOAD_BYTES, len(data)))  # fmt: skip
    except (FileNotFoundError, ImageValidationError) as exc:
        raise PreviewUnavailable(str(exc)) from None
