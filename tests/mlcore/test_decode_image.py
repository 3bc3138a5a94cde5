"""decode_image / encode_for_storage: what an upload must look like to be accepted, and what comes out."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import ExifTags, Image, ImageCms

from mlcore.preprocessing import DecodedImage, decode_image, encode_for_storage

from .helpers import encode, lesion_image, pixels, rejection

# --- accepted formats -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("image_format", "save_options"),
    [("JPEG", {"quality": 92}), ("PNG", {}), ("WEBP", {"lossless": True})],
)
def test_jpeg_png_and_webp_are_accepted_as_rgb_of_the_right_size(image_format, save_options):
    source = lesion_image(size=64).resize((72, 56))
    decoded = decode_image(encode(source, image_format, **save_options))

    assert isinstance(decoded, DecodedImage)
    assert decoded.source_format == image_format
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (72, 56)
    assert (decoded.width, decoded.height) == (72, 56)
    difference = np.abs(pixels(decoded.image) - pixels(source))
    if image_format == "JPEG":
        assert difference.mean() < 4
    else:
        assert difference.max() == 0


def test_file_exactly_at_max_bytes_is_accepted():
    data = encode(lesion_image(size=32), "PNG")
    assert decode_image(data, max_bytes=len(data)).image.size == (32, 32)


# --- rejections -------------------------------------------------------------------------------------------------


def test_empty_bytes_are_rejected_with_empty_file_code():
    assert rejection(b"").code == "empty_file"


def test_file_one_byte_over_max_bytes_is_rejected_with_file_too_large_code():
    data = encode(lesion_image(size=32), "PNG")
    error = rejection(data, max_bytes=len(data) - 1)
    assert error.code == "file_too_large"
    assert "limit" in error.message


@pytest.mark.parametrize(
    "data",
    [
        np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        b"This is a text file that somebody renamed to lesion.jpg\n" * 20,
        b'{"image": "lesion.png"}',
        b"PK\x03\x04" + bytes(200),  # a zip archive
    ],
    ids=["random-bytes", "text", "json", "zip"],
)
def test_bytes_that_are_not_an_image_are_rejected_with_not_an_image_code(data):
    error = rejection(data)
    assert error.code == "not_an_image"
    assert "JPEG, PNG or WebP" in error.message


def test_truncated_jpeg_is_rejected_with_truncated_image_code():
    data = encode(lesion_image(size=96), "JPEG", quality=92)
    error = rejection(data[: len(data) // 2])
    assert error.code == "truncated_image"
    assert "truncated" in error.message


def test_truncated_png_is_rejected_with_truncated_image_code():
    data = encode(lesion_image(size=96), "PNG")
    error = rejection(data[: len(data) // 2])
    assert error.code == "truncated_image"


def test_jpeg_missing_only_its_last_bytes_is_rejected_with_truncated_image_code():
    data = encode(lesion_image(size=96), "JPEG", quality=92)
    assert rejection(data[:-200]).code == "truncated_image"


@pytest.mark.parametrize(
    ("image_format", "kept_tail"),
    [("JPEG", 0), ("PNG", 30), ("WEBP", 0)],
    ids=["jpeg", "png", "webp"],
)
def test_upload_cut_short_at_any_point_is_rejected_never_decoded(image_format, kept_tail):
    # Every prefix is refused (a PNG missing only its final checksum and IEND chunk has all its pixels, so the last
    # few cuts are allowed to pass). Which code a header cut gets depends on where it falls; it must be one of these.
    data = encode(lesion_image(size=32), image_format)
    for length in range(1, len(data) - kept_tail):
        error = rejection(data[:length])
        assert error.code in {"not_an_image", "truncated_image", "corrupt_image"}, length


def _tiff_big_endian() -> bytes:
    return b"MM\x00*" + bytes(100)


def _svg() -> bytes:
    return b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>'


def _svg_with_xml_declaration() -> bytes:
    return b'  <?xml version="1.0" encoding="UTF-8"?>\n' + _svg()


@pytest.mark.parametrize(
    ("make_bytes", "format_name"),
    [
        (lambda: encode(Image.new("P", (16, 16)), "GIF"), "GIF"),
        (lambda: encode(Image.new("RGB", (16, 16), (200, 100, 50)), "PDF"), "PDF"),
        (_svg, "SVG"),
        (_svg_with_xml_declaration, "SVG"),
        (lambda: encode(Image.new("RGB", (16, 16), (200, 100, 50)), "BMP"), "BMP"),
        (lambda: encode(Image.new("RGB", (16, 16), (200, 100, 50)), "TIFF"), "TIFF"),
        (_tiff_big_endian, "TIFF"),
        (lambda: b"\x00\x00\x00\x18ftypheic" + bytes(100), "HEIC"),
    ],
    ids=["gif", "pdf", "svg", "svg-xml", "bmp", "tiff-le", "tiff-be", "heic"],
)
def test_other_formats_are_rejected_with_unsupported_format_code_naming_the_format(make_bytes, format_name):
    error = rejection(make_bytes())
    assert error.code == "unsupported_format"
    assert format_name in error.message
    assert "JPEG, PNG or WebP" in error.message


def test_decompression_bomb_png_is_rejected_with_too_many_pixels_code():
    # 144 megapixels of zeros compress to well under a megabyte: Pillow's bomb check must fire at open.
    data = encode(Image.new("L", (12000, 12000)), "PNG", compress_level=1)
    assert len(data) < 2_000_000
    error = rejection(data)
    assert error.code == "too_many_pixels"


def test_image_over_max_pixels_is_rejected_with_too_many_pixels_code():
    data = encode(Image.new("RGB", (100, 100), (10, 20, 30)), "PNG")
    error = rejection(data, max_pixels=1000)
    assert error.code == "too_many_pixels"
    assert "100×100" in error.message


def test_image_exactly_at_max_pixels_is_accepted():
    data = encode(Image.new("RGB", (100, 100), (10, 20, 30)), "PNG")
    assert decode_image(data, max_pixels=10_000).width == 100


# --- mode conversions -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("cmyk", "rgb"),
    [((0, 255, 255, 0), (255, 0, 0)), ((0, 0, 0, 0), (255, 255, 255)), ((0, 0, 0, 255), (0, 0, 0))],
    ids=["red", "white", "black"],
)
def test_cmyk_jpeg_decodes_to_the_matching_rgb_colour(cmyk, rgb):
    data = encode(Image.new("CMYK", (16, 16), cmyk), "JPEG", quality=100)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    decoded = decode_image(data).image
    assert decoded.mode == "RGB"
    assert np.abs(pixels(decoded) - np.array(rgb)).max() <= 3


def _palette_image() -> Image.Image:
    image = Image.new("P", (4, 2))
    image.putpalette([255, 0, 0, 0, 255, 0, 0, 0, 255, 10, 20, 30])
    image.putdata([0, 1, 2, 3, 0, 1, 2, 3])
    return image


def test_palette_png_without_transparency_decodes_to_its_palette_colours():
    decoded = decode_image(encode(_palette_image(), "PNG")).image
    expected = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (10, 20, 30)] * 2
    assert decoded.mode == "RGB"
    assert [tuple(p) for p in pixels(decoded).reshape(-1, 3).tolist()] == expected


def test_palette_png_with_a_transparent_index_turns_that_colour_white():
    data = encode(_palette_image(), "PNG", transparency=1)  # green is transparent
    decoded = decode_image(data).image
    expected = [(255, 0, 0), (255, 255, 255), (0, 0, 255), (10, 20, 30)] * 2
    assert [tuple(p) for p in pixels(decoded).reshape(-1, 3).tolist()] == expected


def test_grayscale_l_png_decodes_to_equal_rgb_channels():
    gray = Image.fromarray(np.array([[0, 100], [200, 255]], dtype=np.uint8), mode="L")
    decoded = decode_image(encode(gray, "PNG")).image
    assert decoded.mode == "RGB"
    assert pixels(decoded).tolist() == [[[0] * 3, [100] * 3], [[200] * 3, [255] * 3]]


def test_la_png_is_composited_on_white():
    luminance = np.array([[50, 50, 0]], dtype=np.uint8)
    alpha = np.array([[255, 0, 128]], dtype=np.uint8)
    image = Image.merge("LA", [Image.fromarray(luminance, mode="L"), Image.fromarray(alpha, mode="L")])
    decoded = pixels(decode_image(encode(image, "PNG")).image)
    assert decoded[0, 0].tolist() == [50, 50, 50]  # opaque: unchanged
    assert decoded[0, 1].tolist() == [255, 255, 255]  # transparent: white
    assert np.abs(decoded[0, 2] - 127).max() <= 1  # half-transparent black over white: mid grey


def test_rgba_png_transparent_areas_become_white():
    rgba = np.zeros((2, 2, 4), dtype=np.uint8)
    rgba[0, 0] = (200, 30, 40, 255)
    rgba[0, 1] = (200, 30, 40, 0)
    rgba[1, 0] = (0, 0, 0, 0)
    rgba[1, 1] = (0, 0, 255, 128)
    decoded = pixels(decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "PNG")).image)
    assert decoded[0, 0].tolist() == [200, 30, 40]
    assert decoded[0, 1].tolist() == [255, 255, 255]
    assert decoded[1, 0].tolist() == [255, 255, 255]
    assert np.abs(decoded[1, 1] - np.array([127, 127, 255])).max() <= 1


def test_rgb_png_with_a_transparent_colour_turns_that_colour_white():
    rgb = np.zeros((1, 2, 3), dtype=np.uint8)
    rgb[0, 0] = (0, 255, 0)
    rgb[0, 1] = (90, 60, 30)
    data = encode(Image.fromarray(rgb, mode="RGB"), "PNG", transparency=(0, 255, 0))
    decoded = pixels(decode_image(data).image)
    assert decoded[0].tolist() == [[255, 255, 255], [90, 60, 30]]


def test_rgba_webp_transparent_areas_become_white():
    rgba = np.zeros((8, 8, 4), dtype=np.uint8)
    rgba[:, :4] = (20, 40, 60, 255)
    decoded = pixels(decode_image(encode(Image.fromarray(rgba, mode="RGBA"), "WEBP", lossless=True)).image)
    assert (decoded[:, :4] == [20, 40, 60]).all()
    assert (decoded[:, 4:] == 255).all()


def test_16_bit_grayscale_png_is_scaled_to_8_bits():
    values = np.array([[0, 65535, 32768, 257 * 100]], dtype=np.uint16)
    source = Image.fromarray(values)
    data = encode(source, "PNG")
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    decoded = pixels(decode_image(data).image)
    assert decoded[0, :, 0].tolist() == [0, 255, 128, 100]
    assert (decoded[..., 0] == decoded[..., 1]).all() and (decoded[..., 1] == decoded[..., 2]).all()


def test_animated_webp_decodes_to_its_first_frame_as_rgb():
    frames = [Image.new("RGB", (24, 16), colour) for colour in ((220, 20, 20), (20, 20, 220), (20, 220, 20))]
    data = encode(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3

    decoded = decode_image(data)
    assert decoded.source_format == "WEBP"
    assert decoded.image.mode == "RGB"
    assert decoded.image.size == (24, 16)
    assert (pixels(decoded.image) == [220, 20, 20]).all()


# --- orientation and metadata -----------------------------------------------------------------------------------


def _exif_with_gps(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[ExifTags.Base.Make] = "PhoneCam"
    if orientation is not None:
        exif[ExifTags.Base.Orientation] = orientation
    gps = exif.get_ifd(ExifTags.IFD.GPSInfo)
    gps[ExifTags.GPS.GPSLatitudeRef] = "N"
    gps[ExifTags.GPS.GPSLatitude] = (51.0, 30.0, 12.0)
    gps[ExifTags.GPS.GPSLongitudeRef] = "W"
    gps[ExifTags.GPS.GPSLongitude] = (0.0, 7.0, 40.0)
    return exif


def _red_corner_photo() -> Image.Image:
    """60 wide, 40 high, blue with a red top-left corner."""
    image = Image.new("RGB", (60, 40), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 12, 12))
    return image


def _is_red(pixel: np.ndarray) -> bool:
    return bool(pixel[0] > 200 and pixel[1] < 60 and pixel[2] < 60)


def test_exif_orientation_6_is_applied_so_the_image_is_rotated_clockwise():
    data = encode(_red_corner_photo(), "JPEG", quality=95, exif=_exif_with_gps(orientation=6))
    decoded = decode_image(data)

    assert decoded.image.size == (40, 60)
    assert (decoded.width, decoded.height) == (40, 60)
    array = pixels(decoded.image)
    # A 90° clockwise turn moves the top-left corner to the top-right.
    assert _is_red(array[2, -3])
    assert not _is_red(array[2, 2])
    assert not _is_red(array[-3, -3])
    assert not _is_red(array[-3, 2])


def test_image_without_orientation_keeps_its_layout():
    decoded = decode_image(encode(_red_corner_photo(), "JPEG", quality=95))
    assert decoded.image.size == (60, 40)
    assert _is_red(pixels(decoded.image)[2, 2])


def _metadata_rich_jpeg() -> bytes:
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    xmp = b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF/></x:xmpmeta>'
    data = encode(
        lesion_image(size=64), "JPEG", quality=95, exif=_exif_with_gps(), icc_profile=icc, xmp=xmp, comment=b"pt 42"
    )
    source = Image.open(io.BytesIO(data))
    # Make sure the input really carries what the decoder must strip.
    assert source.getexif().get_ifd(ExifTags.IFD.GPSInfo)
    assert "icc_profile" in source.info
    assert "xmp" in source.info
    return data


def test_decoded_image_carries_no_exif_icc_xmp_or_comment():
    decoded = decode_image(_metadata_rich_jpeg()).image
    for key in ("exif", "icc_profile", "xmp", "comment", "dpi", "jfif"):
        assert key not in decoded.info
    assert len(decoded.getexif()) == 0


def test_stored_jpeg_has_no_exif_and_no_gps_even_when_the_upload_had_gps():
    data, extension, content_type = encode_for_storage(decode_image(_metadata_rich_jpeg()))

    assert (extension, content_type) == ("jpg", "image/jpeg")
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "JPEG"
    assert "exif" not in stored.info
    assert "icc_profile" not in stored.info
    assert "xmp" not in stored.info
    assert len(stored.getexif()) == 0
    assert len(stored.getexif().get_ifd(ExifTags.IFD.GPSInfo)) == 0
    assert b"Exif\x00\x00" not in data
    assert b"PhoneCam" not in data


def test_stored_jpeg_keeps_the_pixels_closely():
    decoded = decode_image(encode(lesion_image(size=64), "JPEG", quality=95))
    stored = Image.open(io.BytesIO(encode_for_storage(decoded)[0])).convert("RGB")
    assert stored.size == decoded.image.size
    assert np.abs(pixels(stored) - pixels(decoded.image)).mean() < 2


@pytest.mark.parametrize(
    ("image_format", "save_options"),
    [("PNG", {}), ("WEBP", {"lossless": True}), ("WEBP", {"quality": 80})],
    ids=["png", "webp-lossless", "webp-lossy"],
)
def test_png_and_webp_are_stored_as_lossless_png_without_exif(image_format, save_options):
    source = encode(lesion_image(size=48), image_format, exif=_exif_with_gps(), **save_options)
    assert Image.open(io.BytesIO(source)).getexif().get_ifd(ExifTags.IFD.GPSInfo)
    decoded = decode_image(source)

    data, extension, content_type = encode_for_storage(decoded)

    assert (extension, content_type) == ("png", "image/png")
    stored = Image.open(io.BytesIO(data))
    assert stored.format == "PNG"
    assert "exif" not in stored.info
    assert len(stored.getexif()) == 0
    assert (pixels(stored.convert("RGB")) == pixels(decoded.image)).all()
