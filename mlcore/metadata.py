"""Metadata stripped from JPEG and PNG uploads without decoding a pixel: each file is rebuilt from the
segments (JPEG) or chunks (PNG) that decoding needs and those that change how the pixels look, and
everything else (EXIF, XMP, IPTC, comments, text and time chunks, trailers) is left out.

Pillow only, no torch: the web tier calls these through mlcore.preprocessing.prepare_upload.
"""

from __future__ import annotations

import re
import zlib

from PIL import Image

ORIENTATION_TAG = 0x0112

_SOF_HUFFMAN_8BIT = {0xC0, 0xC1, 0xC2}  # baseline, extended and progressive Huffman: what Pillow decodes
_NEXT_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")  # the end of entropy-coded data
_ICC_CHUNK = 65519  # an APP2 segment's room for profile bytes


def _segment(marker: int, payload: bytes) -> bytes:
    return b"\xff" + bytes((marker,)) + (len(payload) + 2).to_bytes(2, "big") + payload


def _exif_orientation_segment(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    return _segment(0xE1, exif.tobytes())  # b"Exif\0\0" and a TIFF block with this one tag


def _exact_table_length(marker: int, payload: bytes) -> bool:
    """Whether a table, frame or scan header is exactly as long as its own fields say: no room for
    other bytes."""
    try:
        if marker == 0xDB:  # DQT: tables of 1 + 64 (8-bit) or 1 + 128 (16-bit) bytes
            position = 0
            while position < len(payload):
                position += 1 + (128 if payload[position] >> 4 else 64)
            return position == len(payload)
        if marker == 0xC4:  # DHT: 1 + 16 counts + the symbols they count
            position = 0
            while position < len(payload):
                position += 17 + sum(payload[position + 1 : position + 17])
            return position == len(payload)
        if marker == 0xDD:  # DRI
            return len(payload) == 2
        if marker in _SOF_HUFFMAN_8BIT:
            return len(payload) == 6 + 3 * payload[5]
        if marker == 0xDA:  # SOS
            return len(payload) == 4 + 2 * payload[0]
    except IndexError:
        return False
    return False


def strip_jpeg(data: bytes, orientation: int, profile: bytes | None) -> bytes | None:
    """The JPEG rebuilt from what decoding needs: quantisation and Huffman tables, the restart interval,
    the frame header and the scans (each exactly as long as its fields say), with fresh minimal
    segments for what changes how it looks: JFIF's header without its thumbnail, the orientation, the
    colour profile Pillow assembled, and Adobe's colour-transform flag. Every other segment (EXIF, XMP,
    IPTC, MPF, comments, thumbnails, unknown markers) and anything after the end of the image goes.
    None where the structure is not one we can vouch for (the full path decides)."""
    if data[:2] != b"\xff\xd8":
        return None
    jfif = adobe = b""
    body: list[bytes] = []
    position, frame = 2, False
    while True:
        segment = _read_segment(data, position)
        if segment is None:
            return None
        marker, payload, position = segment
        if marker == 0xD9:  # EOI: what follows (camera trailers, MPO's other pictures) is dropped
            break
        if marker == 0xE0 and payload.startswith(b"JFIF\x00") and len(payload) >= 14 and not jfif:
            # Its presence tells decoders the data is YCbCr; version and density stay, the thumbnail goes.
            jfif = _segment(0xE0, payload[:12] + b"\x00\x00")
        elif marker == 0xEE and payload.startswith(b"Adobe") and len(payload) >= 12 and not adobe:
            adobe = _segment(0xEE, b"Adobe\x00\x64\x00\x00\x00\x00" + payload[11:12])
        elif 0xE0 <= marker <= 0xEF or marker == 0xFE:
            continue  # metadata: EXIF, XMP, ICC (re-emitted below), IPTC, MPF, comments, ...
        elif marker in (0xDB, 0xC4, 0xDD, 0xDA) or marker in _SOF_HUFFMAN_8BIT:
            if not _exact_table_length(marker, payload):
                return None
            if marker in _SOF_HUFFMAN_8BIT:
                if payload[:1] != b"\x08" or frame:
                    return None
                frame = True
            elif marker == 0xDA and not frame:
                return None
            body.append(_segment(marker, payload))
            if marker == 0xDA:  # the scan's entropy-coded data runs up to the next marker
                following = _NEXT_MARKER.search(data, position)
                if following is None:
                    return None  # no end: truncated (decode_image says so)
                body.append(data[position : following.start()])
                position = following.start()
        else:
            return None  # arithmetic coding, 12-bit, hierarchical, DNL, unknown markers: the full path
    if not frame:
        return None
    return _assemble_jpeg(jfif, adobe, body, orientation, profile)


def _read_segment(data: bytes, position: int) -> tuple[int, bytes, int] | None:
    """(marker, payload, position after it) of the JPEG segment at `position` (after any fill bytes); the
    end of image has an empty payload. None where the data ends or is no segment."""
    size = len(data)
    if position >= size or data[position] != 0xFF:
        return None
    while position < size and data[position] == 0xFF:  # fill bytes
        position += 1
    if position >= size:
        return None
    marker = data[position]
    position += 1
    if marker == 0xD9:
        return marker, b"", position
    if position + 2 > size:
        return None
    end = position + int.from_bytes(data[position : position + 2], "big")
    if end > size or end < position + 2:
        return None
    return marker, data[position + 2 : end], end


def _assemble_jpeg(jfif: bytes, adobe: bytes, body: list[bytes], orientation: int, profile: bytes | None) -> bytes:
    """The stripped JPEG: start of image, JFIF's header, the orientation and colour profile written
    afresh, Adobe's flag, the tables, frame and scans, and the end of image."""
    out = [b"\xff\xd8", jfif]
    if orientation != 1:
        out.append(_exif_orientation_segment(orientation))
    if profile:
        chunks = [profile[i : i + _ICC_CHUNK] for i in range(0, len(profile), _ICC_CHUNK)]
        out += [_segment(0xE2, b"ICC_PROFILE\x00" + bytes((n + 1, len(chunks))) + chunk)
                for n, chunk in enumerate(chunks)]  # fmt: skip
    return b"".join([*out, adobe, *body, b"\xff\xd9"])


# Chunks that change how the pixels look, with the exact lengths they may have.
_PNG_FIXED = {b"gAMA": 4, b"cHRM": 32, b"sRGB": 1, b"IEND": 0, b"IHDR": 13}
_PNG_TEXT = (b"tEXt", b"zTXt", b"iTXt")
_PNG_ORIENTATION_KEYWORDS = (b"XML:com.adobe.xmp", b"Raw profile type")  # Pillow reads an orientation there


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    return len(payload).to_bytes(4, "big") + kind + payload + zlib.crc32(kind + payload).to_bytes(4, "big")


def strip_png(data: bytes, profile: bytes | None) -> bytes | None:
    """The PNG rebuilt from its header, palette, transparency, gamma, chromaticities, sRGB intent,
    significant bits and image data, each of the exact length its kind allows, and the colour profile
    Pillow read, re-compressed under a neutral name. Text, time, EXIF, animation and private chunks,
    and anything after IEND, go. None where a chunk is damaged or holds an orientation (the full path
    turns such a photo upright)."""
    if data[:8] != b"\x89PNG\r\n\x1a\n":
        return None
    out = [data[:8]]
    position, size, colour_type, seen_data, palette_entries = 8, len(data), -1, False, 0
    while position + 12 <= size:
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        end = position + 12 + length
        if end > size:
            return None
        payload = data[position + 8 : end - 4]
        if zlib.crc32(data[position + 4 : end - 4]) != int.from_bytes(data[end - 4 : end], "big"):
            return None
        position = end
        if kind == b"eXIf" or (kind in _PNG_TEXT and payload.startswith(_PNG_ORIENTATION_KEYWORDS)):
            return None
        if kind in _PNG_FIXED and len(payload) != _PNG_FIXED[kind]:
            return None
        if kind == b"IHDR":
            colour_type = payload[9]
            out.append(_png_chunk(kind, payload))
            if profile:
                out.append(_png_chunk(b"iCCP", b"ICC Profile\x00\x00" + zlib.compress(profile)))
        elif kind == b"PLTE":
            if length % 3 or length > 768:
                return None
            palette_entries = length // 3
            out.append(_png_chunk(kind, payload))
        elif kind == b"tRNS":
            allowed = {0: 2, 2: 6}.get(colour_type)
            if (
                (allowed is not None and length != allowed)
                or (colour_type == 3 and length > palette_entries)
                or (colour_type in (4, 6))
            ):
                return None
            out.append(_png_chunk(kind, payload))
        elif kind == b"sBIT":
            if not 1 <= length <= 4:
                return None
            out.append(_png_chunk(kind, payload))
        elif kind in (b"gAMA", b"cHRM", b"sRGB"):
            if not seen_data:
                out.append(_png_chunk(kind, payload))
        elif kind == b"IDAT":
            seen_data = True
            out.append(_png_chunk(kind, payload))
        elif kind == b"IEND":
            out.append(_png_chunk(kind, payload))
            return b"".join(out)
    return None
