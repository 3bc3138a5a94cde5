"""The hostile-upload corpus (tests/corpus) through the real upload API, the real worker step and the
portal's upload: every file is either accepted and stored as clean RGB pixels under a random key, or
refused with a 4xx JSON answer naming the problem and nothing stored. Never a 5xx, never an exception.

Requests are multipart bodies written by hand, so a file name reaches the server exactly as a hostile
client sends it (Django's test client would already strip "../" from names on the client side).
"""

from __future__ import annotations

import io
import logging
import re
from pathlib import Path
from urllib.parse import quote

import pytest
from django.urls import reverse
from PIL import Image, ImageCms

from diagnosis.models import ImageState, LesionImage, Prediction
from diagnosis.services.patients import create_lesion, create_patient
from diagnosis.services.predictions import process_image
from tests.conftest import stored_image_files
from tests.corpus import Case, build_corpus

URL = "/api/v1/images/"
BOUNDARY = "corpus-7f3a9c1e5b2d4a6f8e0c"
CASES = build_corpus()
PORTAL_CASES = [case for case in CASES if case.portal]
STORED_KEY = re.compile(r"images/[0-9a-f]{32}\.(jpg|png)")
EXTENSIONS = {"image/jpeg": "jpg", "image/png": "png"}
FORMATS = {"image/jpeg": "JPEG", "image/png": "PNG"}
# What a stored file may keep: only what changes how its pixels look (prepare_upload).
FORBIDDEN_KEYS = {"xmp", "XML:com.adobe.xmp", "comment", "photoshop", "exif_thumbnail"}
METADATA_MARKERS = (b"eXIf", b"tEXt", b"zTXt", b"iTXt", b"http://ns.adobe.com", b"8BIM", b"MPF")
ORIENTATION = 0x0112

# --- helpers -------------------------------------------------------------------------------------


def multipart_body(field: str, case: Case) -> bytes:
    """One file part, named as the client names it. A name a quoted string cannot carry as it is (control
    characters, quotes, non-ASCII) is also sent as RFC 5987 filename*=UTF-8''…, which Django prefers."""
    name = case.filename
    if name.isascii() and name.isprintable() and '"' not in name:
        disposition = f'form-data; name="{field}"; filename="{name}"'
    else:
        shown = name.replace('"', "%22").replace("\r", "%0D").replace("\n", "%0A")  # as browsers escape them
        disposition = f'form-data; name="{field}"; filename="{shown}"; filename*=UTF-8\'\'{quote(name, safe="")}'
    head = f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\nContent-Type: {case.content_type}\r\n\r\n"
    assert BOUNDARY.encode() not in case.data
    return head.encode("utf-8") + case.data + f"\r\n--{BOUNDARY}--\r\n".encode()


def post_case(client, url: str, field: str, case: Case, **extra):
    return client.post(
        url, data=multipart_body(field, case), content_type=f"multipart/form-data; boundary={BOUNDARY}", **extra
    )


def client_name_parts(filename: str) -> set[str]:
    """The words of the client's file name (its extension aside) that must never reach the stored name."""
    return {part.lower() for part in re.findall(r"[^\W_]{3,}", filename)} - {"jpg", "jpeg", "png", "webp"}


def apply_settings(settings, case: Case) -> None:
    for name, value in case.settings:
        setattr(settings, name, value)


def assert_nothing_stored() -> None:
    assert LesionImage.objects.count() == 0
    assert stored_image_files() == []


def assert_stored_cleanly(case: Case, image: LesionImage) -> None:
    """The stored file: a random key; no metadata (an EXIF block may hold the orientation alone, a valid
    colour profile may stay); and decode_image of it gives 8-bit RGB of the expected size and colours."""
    from django.conf import settings

    from mlcore.preprocessing import MAX_KEPT_PROFILE_BYTES, decode_image

    assert STORED_KEY.fullmatch(image.file.name), image.file.name
    assert image.file.name.endswith("." + EXTENSIONS[case.stored_type])  # from the content, not the client
    leaked = {part for part in client_name_parts(case.filename) if part in image.file.name.lower()}
    assert not leaked, f"the stored name {image.file.name!r} carries the client's {leaked}"
    path = Path(settings.MEDIA_ROOT) / image.file.name
    assert stored_image_files() == [path]
    assert path.stat().st_mode & 0o777 == 0o600  # FILE_UPLOAD_PERMISSIONS: patient photos are private

    stored = path.read_bytes()
    assert image.file_size == len(stored) and image.content_type == case.stored_type
    for marker in (*METADATA_MARKERS, *case.absent):
        assert marker not in stored, f"{marker!r} survived into the stored file"
    reopened = Image.open(io.BytesIO(stored))
    assert reopened.format == FORMATS[case.stored_type]
    exif = reopened.getexif()
    assert set(exif) <= {ORIENTATION}, dict(exif)
    assert stored.count(b"Exif") <= 1 and not exif.get_ifd(0x8825) and not exif.get_ifd(0x8769)
    assert not FORBIDDEN_KEYS & set(reopened.info), reopened.info.keys()
    profile = reopened.info.get("icc_profile")
    if profile:
        assert len(profile) <= MAX_KEPT_PROFILE_BYTES
        ImageCms.ImageCmsProfile(io.BytesIO(profile))  # a real profile, not a carrier for other bytes
    assert getattr(reopened, "n_frames", 1) == 1
    if reopened.format == "PNG":
        assert reopened.text == {}
        assert stored.endswith(b"IEND\xaeB`\x82")  # nothing after the image
    else:
        assert stored.endswith(b"\xff\xd9")
    decoded = decode_image(stored).image
    assert decoded.mode == "RGB" and decoded.size == case.size
    for probe in case.probes:
        pixel = decoded.getpixel((probe.x, probe.y))
        assert max(abs(got - want) for got, want in zip(pixel, probe.rgb, strict=True)) <= probe.tolerance, (
            f"pixel ({probe.x}, {probe.y}) is {pixel}, expected about {probe.rgb}"
        )


def assert_refusal_in_words(body: dict, case: Case) -> None:
    assert set(body) >= {"detail", "code"}, body
    assert body["code"] == case.code, body
    assert isinstance(body["detail"], str) and len(body["detail"].split()) >= 3  # a sentence, not a code


# --- the API -------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", CASES, ids=[case.name for case in CASES])
def test_api_upload_then_worker(case, api_client, settings, request, caplog):
    apply_settings(settings, case)
    assert_nothing_stored()

    response = post_case(api_client, URL, "image", case)

    assert response.status_code < 500, response.content
    assert response["Content-Type"].startswith("application/json")
    body = response.json()
    if not case.accepted:
        assert response.status_code == 400, body
        assert_refusal_in_words(body, case)
        if body["code"] not in ("invalid", "parse_error"):  # refused by read_upload / decode_image
            assert body["errors"] == {"image": [body["detail"]]}
        assert_nothing_stored()
        return

    assert response.status_code == 202, body
    assert body["state"] == "queued" and body["prediction"] is None
    assert (body["width"], body["height"]) == case.size
    assert body["content_type"] == case.stored_type
    image = LesionImage.objects.get(pk=body["id"])
    assert image.upload_bytes == len(case.data)
    assert_stored_cleanly(case, image)

    # The worker step decodes the stored file again and predicts: it must end done, and nothing in it
    # may fail quietly (Grad-CAM and drift features are logged, not raised, when they fail).
    request.getfixturevalue("active_model")
    with caplog.at_level(logging.WARNING):
        result = process_image(image_id=str(image.pk), worker_id="w")
    image.refresh_from_db()
    assert result == image.state, (result, image.state, image.error)
    if result == ImageState.FAILED:
        assert image.error.strip()
    assert result == ImageState.DONE, image.error
    assert image.error == "" and Prediction.objects.filter(image=image).count() == 1
    problems = [record.getMessage() for record in caplog.records if record.levelno >= logging.WARNING]
    assert problems == []


# --- the portal ----------------------------------------------------------------------------------


@pytest.fixture
def portal_lesion(client, clinic, clinician):
    client.force_login(clinician)
    patient = create_patient(clinic=clinic, reference="PT-CORPUS-1", created_by=clinician, via="portal")
    return create_lesion(patient=patient, body_site="back", created_by=clinician, via="portal")


@pytest.mark.parametrize("case", PORTAL_CASES, ids=[case.name for case in PORTAL_CASES])
def test_portal_upload(case, client, portal_lesion, settings):
    apply_settings(settings, case)
    url = reverse("portal:lesion-upload", args=[portal_lesion.pk])

    response = post_case(client, url, "images", case, headers={"accept": "application/json"})

    assert response.status_code < 500, response.content
    # The page's script asks for JSON and shows the answer's words; an HTML error page leaves it with none.
    assert response["Content-Type"].startswith("application/json"), (
        f"the portal answered {response.status_code} {response['Content-Type']} to a JSON client: "
        f"{response.content[:200]!r}"
    )
    body = response.json()
    if case.portal_code == "bad_request":  # the body itself was refused before the view could read it
        assert response.status_code == 400
        message = body.get("error") or body.get("detail")
        assert isinstance(message, str) and len(message.split()) >= 3, body
        assert_nothing_stored()
        return
    if case.portal_code == "no_files":  # the parser dropped the nameless part: the form had no file
        assert response.status_code == 400
        assert body == {"error": "Choose at least one image to upload.", "files": []}
        assert_nothing_stored()
        return
    if not case.accepted:
        assert response.status_code == 400, body
        (result,) = body["files"]
        assert result["ok"] is False and result["code"] == case.code
        assert len(result["error"].split()) >= 3 and result["error"] != result["code"]
        assert_nothing_stored()
        return

    assert response.status_code == 202, body
    (result,) = body["files"]
    assert result["ok"] is True and result["state"] == "queued"
    # The name echoed back is the one Django kept: no path, no control characters.
    assert "/" not in result["name"] and "\\" not in result["name"] and result["name"].isprintable()
    image = LesionImage.objects.get(pk=result["id"])
    assert image.lesion == portal_lesion and (image.width, image.height) == case.size
    assert_stored_cleanly(case, image)


def test_corpus_covers_what_it_must():
    """The corpus itself: enough cases, each kind the brief names, both outcomes, and the portal subset."""
    names = {case.name for case in CASES}
    assert len(CASES) >= 35
    required = {
        "jpeg_truncated", "png_truncated", "zero_bytes", "random_bytes", "exif_usercomment_60k", "exif_gps_jpeg",
        "png_iccp_garbage_300k", "png_iccp_bomb", "png_ztxt_large", "png_ztxt_bomb", "png_bomb_header_20000x20000",
        "png_16bit_gray", "jpeg_cmyk", "png_palette_transparent", "png_grayscale", "png_rgba", "webp_animated",
        "svg_as_jpeg", "html_as_jpeg", "pdf_as_jpeg", "polyglot_jpeg_html_after_eoi", "name_traversal_unix",
        "name_unicode_control", "name_rtl_override", "name_10000_chars", "jpeg_declared_png", "gif",
        "tiff_little_endian", "bmp", "one_pixel", "extreme_aspect_10000x2", "exif_orientation_6",
        "jpeg_one_byte_over_max_upload_bytes", "over_max_image_pixels",
    }  # fmt: skip
    assert required <= names, required - names
    assert {case.outcome for case in CASES} == {"accepted", "rejected"}
    portal = {case.name for case in PORTAL_CASES}
    assert {"svg_as_jpeg", "html_as_jpeg", "pdf_as_jpeg", "gif", "tiff_little_endian", "bmp"} <= portal
    assert {case.name for case in CASES if case.name.startswith("name_")} <= portal
