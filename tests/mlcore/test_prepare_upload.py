"""prepare_upload: the web tier checks the header and the file's structure and strips metadata without
decoding pixels; the stored bytes decode to exactly the pixels of the original."""

from __future__ import annotations

import io
import zlib

import numpy as np
import pytest
from PIL import Image, ImageCms, PngImagePlugin

from mlcore.preprocessing import ImageValidationError, decode_image, prepare_upload


def _photo(size=(120, 80), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([x * 2 % 256, y * 3 % 256, (x + y) % 256], -1) + rng.normal(0, 8, (size[1], size[0], 3))
    return Image.fromarray(base.clip(0, 255).astype(np.uint8))


def _jpeg(image: Image.Image, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90, **options)
    return buffer.getvalue()


def _gps_exif(orientation: int | None = None) -> Image.Exif:
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}
    if orientation is not None:
        exif[0x0112] = orientation
    return exif


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data).image)


@pytest.mark.parametrize(
    "options",
    [{}, {"progressive": True}, {"subsampling": 0}, {"restart_marker_blocks": 1}, {"optimize": True}],
    ids=["baseline", "progressive", "444", "restart-markers", "optimized"],
)
def test_jpeg_keeps_its_compressed_pixels_and_loses_its_metadata(options):
    original = _jpeg(_photo(), exif=_gps_exif(), comment=b"patient Jane Doe", **options)
    prepared = prepare_upload(original)
    assert prepared.lossless and prepared.content_type == "image/jpeg" and prepared.extension == "jpg"
    assert (prepared.width, prepared.height) == (120, 80)
    for secret in (b"Exif", b"GPS", b"CameraMaker", b"Jane Doe"):
        assert secret not in prepared.data
    # JFIF's header stays (it tells decoders the data is YCbCr), without a thumbnail: 16 bytes in all
    assert prepared.data[2:6] == b"\xff\xe0\x00\x10" and prepared.data[6:11] == b"JFIF\x00"
    assert len(prepared.data) < len(original)
    np.testing.assert_array_equal(_pixels(prepared.data), _pixels(original))  # not one pixel re-encoded


def test_orientation_is_kept_alone_and_the_size_is_upright():
    original = _jpeg(_photo(), exif=_gps_exif(orientation=6))
    prepared = prepare_upload(original)
    assert prepared.lossless and (prepared.width, prepared.height) == (80, 120)
    exif = Image.open(io.BytesIO(prepared.data)).getexif()
    assert dict(exif) == {0x0112: 6}
    assert b"GPS" not in prepared.data and b"CameraMaker" not in prepared.data
    np.testing.assert_array_equal(_pixels(prepared.data), _pixels(original))
    assert decode_image(prepared.data).image.size == (80, 120)


def test_trailing_data_and_second_pictures_after_the_end_are_dropped():
    original = _jpeg(_photo()) + b"SAMSUNG trailer: patient Jane Doe" + _jpeg(_photo(seed=1))
    prepared = prepare_upload(original)
    assert prepared.lossless and prepared.data.endswith(b"\xff\xd9") and b"Jane Doe" not in prepared.data
    assert prepared.data.count(b"\xff\xd8") == 1
    np.testing.assert_array_equal(_pixels(prepared.data), _pixels(original))


def test_a_valid_colour_profile_stays_and_the_colours_match_a_full_decode():
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    original = _jpeg(_photo(), icc_profile=profile, exif=_gps_exif())
    prepared = prepare_upload(original)
    assert prepared.lossless and Image.open(io.BytesIO(prepared.data)).info["icc_profile"] == profile
    np.testing.assert_array_equal(_pixels(prepared.data), _pixels(original))


def test_a_broken_colour_profile_sends_the_file_down_the_full_path():
    original = _jpeg(_photo(), icc_profile=b"not a profile" * 100)
    prepared = prepare_upload(original)
    assert not prepared.lossless and b"ICC_PROFILE" not in prepared.data and b"not a profile" not in prepared.data
    assert (prepared.width, prepared.height) == (120, 80)


def test_png_text_time_and_exif_chunks_go_transparency_stays():
    image = Image.new("RGBA", (40, 30), (200, 100, 50, 255))
    image.putpixel((0, 0), (0, 0, 0, 0))
    buffer = io.BytesIO()
    info = PngImagePlugin.PngInfo()
    info.add_text("Comment", "patient Jane Doe")
    info.add_itxt("Author", "Dr Who")
    image.save(buffer, format="PNG", pnginfo=info)
    original = buffer.getvalue()
    prepared = prepare_upload(original)
    assert prepared.lossless and prepared.content_type == "image/png"
    assert b"tEXt" not in prepared.data and b"iTXt" not in prepared.data and b"Jane Doe" not in prepared.data
    decoded = decode_image(prepared.data).image
    assert decoded.getpixel((0, 0)) == (255, 255, 255)  # transparent: white, as before
    np.testing.assert_array_equal(np.asarray(decoded), _pixels(original))


def test_png_with_an_exif_block_and_webp_take_the_full_path():
    buffer = io.BytesIO()
    _photo((24, 24)).save(buffer, format="PNG", exif=_gps_exif(orientation=6))
    prepared = prepare_upload(buffer.getvalue())
    assert not prepared.lossless and b"eXIf" not in prepared.data and (prepared.width, prepared.height) == (24, 24)

    buffer = io.BytesIO()
    _photo((24, 24)).save(buffer, format="WEBP", lossless=True, exif=_gps_exif())
    prepared = prepare_upload(buffer.getvalue())
    assert not prepared.lossless and prepared.content_type == "image/png" and b"GPS" not in prepared.data


def test_a_png_chunk_with_a_bad_crc_is_not_vouched_for():
    buffer = io.BytesIO()
    _photo((24, 24)).save(buffer, format="PNG")
    data = bytearray(buffer.getvalue())
    start = data.index(b"IDAT") + 10
    data[start] ^= 0xFF  # damage the compressed pixels; the chunk's CRC no longer matches
    with pytest.raises(ImageValidationError):
        prepare_upload(bytes(data))  # the full path decodes it and refuses it


def test_truncated_jpeg_is_refused_at_upload():
    original = _jpeg(_photo((200, 200)))
    with pytest.raises(ImageValidationError) as info:
        prepare_upload(original[: len(original) // 2])
    assert info.value.code == "truncated_image"


def test_damage_inside_the_scan_is_found_by_the_full_decode_not_the_header_check():
    original = bytearray(_jpeg(_photo((256, 256)), progressive=False))
    scan = original.index(b"\xff\xda")
    start = scan + 200
    original[start : start + 600] = bytes(600)  # zeros: well formed (no marker), but nonsense coefficients
    prepared = prepare_upload(bytes(original))  # the structure is intact, so it is stored as it is
    assert prepared.lossless
    # what the worker then does: its full decode either reads it or says in words what is wrong
    try:
        decode_image(prepared.data)
    except ImageValidationError as exc:
        assert exc.code in ("corrupt_image", "truncated_image") and len(exc.message.split()) > 3


def test_limits_are_checked_from_the_header():
    original = _jpeg(_photo((120, 80)))
    with pytest.raises(ImageValidationError) as info:
        prepare_upload(original, max_pixels=120 * 80 - 1)
    assert info.value.code == "too_many_pixels"
    with pytest.raises(ImageValidationError) as info:
        prepare_upload(original, max_bytes=len(original) - 1)
    assert info.value.code == "file_too_large"
    with pytest.raises(ImageValidationError) as info:
        prepare_upload(b"GIF89a" + bytes(100))
    assert info.value.code == "unsupported_format"


def test_a_segment_running_past_the_end_of_the_file_is_not_stored_as_it_is():
    original = bytearray(_jpeg(_photo()))
    dqt = original.index(b"\xff\xdb")
    original[dqt + 2 : dqt + 4] = (60000).to_bytes(2, "big")  # a table length far past the file's end
    try:
        prepared = prepare_upload(bytes(original))
    except ImageValidationError:
        return
    assert not prepared.lossless  # Pillow may still read it; then it was decoded and re-encoded


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes((marker,)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _after_soi(data: bytes, *segments: bytes) -> bytes:
    return data[:2] + b"".join(segments) + data[2:]


def _before_first(data: bytes, marker: bytes, *segments: bytes) -> bytes:
    index = data.index(marker)
    return data[:index] + b"".join(segments) + data[index:]


JFIF = _segment(0xE0, b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00")


def test_jfif_stays_so_an_rgb_coded_jpeg_decodes_to_the_same_colours():
    # Pillow's keep_rgb writes Adobe's transform 0 (no YCbCr); with JFIF in front, decoders read YCbCr.
    original = _after_soi(_jpeg(_photo(), keep_rgb=True), JFIF)
    prepared = prepare_upload(original)
    np.testing.assert_array_equal(_pixels(prepared.data), _pixels(original))


SECRET = b"PATIENT-JANE-DOE-1970"


@pytest.mark.parametrize(
    "make",
    [
        # an ICC fragment Pillow does not assemble (placed after the frame header)
        lambda: _before_first(_jpeg(_photo()), b"\xff\xda", _segment(0xE2, b"ICC_PROFILE\x00\x01\x01" + SECRET)),
        # Adobe's segment with bytes after its 12
        lambda: _after_soi(_jpeg(_photo()), _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00\x01" + SECRET)),
        # a JPEG extension marker (JPGn) and a quantisation table with bytes after its tables
        lambda: _before_first(_jpeg(_photo()), b"\xff\xda", _segment(0xF3, SECRET)),
        lambda: _after_soi(_jpeg(_photo()), _segment(0xDB, bytes(65) + SECRET)),
    ],
    ids=["icc-fragment-after-frame", "adobe-with-extra-bytes", "jpg-extension-marker", "dqt-with-extra-bytes"],
)
def test_bytes_hidden_in_segments_decoding_needs_never_reach_storage(make):
    original = make()
    try:
        prepared = prepare_upload(original)
    except ImageValidationError:
        return  # refused outright: nothing stored
    assert SECRET not in prepared.data


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def _insert_chunk(png: bytes, before: bytes, chunk: bytes) -> bytes:
    index = png.index(before) - 4
    return png[:index] + chunk + png[index:]


@pytest.mark.parametrize("where", [b"IDAT", b"IEND"])
def test_png_chunks_of_the_wrong_length_or_place_carry_nothing_into_storage(where):
    buffer = io.BytesIO()
    _photo((24, 24)).save(buffer, format="PNG")
    original = _insert_chunk(buffer.getvalue(), where, _png_chunk(b"gAMA", b"\x00\x00\xb1\x8f" + SECRET))
    original = _insert_chunk(original, where, _png_chunk(b"tRNS", SECRET))
    original = _insert_chunk(original, b"IEND", _png_chunk(b"iCCP", b"x\x00\x00" + zlib.compress(SECRET)))
    try:
        prepared = prepare_upload(original)
    except ImageValidationError:
        return
    assert SECRET not in prepared.data and zlib.compress(SECRET) not in prepared.data


def test_a_png_turned_by_its_xmp_is_stored_upright():
    xmp = (b'<x:xmpmeta xmlns:x="adobe:ns:meta/"><rdf:RDF xmlns:rdf="http://www.w3.org/1999/02/22-rdf-syntax-ns#">'
           b'<rdf:Description xmlns:tiff="http://ns.adobe.com/tiff/1.0/" tiff:Orientation="6"/></rdf:RDF>'
           b"</x:xmpmeta>")  # fmt: skip
    buffer = io.BytesIO()
    _photo((64, 48)).save(buffer, format="PNG")
    original = _insert_chunk(
        buffer.getvalue(), b"IDAT", _png_chunk(b"iTXt", b"XML:com.adobe.xmp\x00\x00\x00\x00\x00" + xmp)
    )
    assert decode_image(original).image.size == (48, 64)  # Pillow turns it
    prepared = prepare_upload(original)
    assert not prepared.lossless and (prepared.width, prepared.height) == (48, 64)
    assert decode_image(prepared.data).image.size == (48, 64) and b"xmpmeta" not in prepared.data
