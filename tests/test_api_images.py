"""The upload API: 202 on a good photo, a 400 naming the problem on every kind of bad input,
and nothing stored (no row, no file) when a request is refused."""

from __future__ import annotations

import io

import pytest
from PIL import Image

from diagnosis.models import AuditEvent, ImageState, LesionImage
from mlcore.preprocessing import decode_image
from tests.conftest import lesion_jpeg, stored_image_files, upload_file
from tests.factories import LesionFactory, PatientFactory

URL = "/api/v1/images/"


def post_image(client, data: bytes, name: str = "lesion.jpg", **extra):
    return client.post(URL, {"image": upload_file(data, name), **extra}, format="multipart")


def png_bytes(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def assert_nothing_stored():
    assert LesionImage.objects.count() == 0
    assert stored_image_files() == []


def test_upload_returns_202_with_status_url_and_enqueues_on_commit(
    api_client, clinic, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks() as callbacks:
        response = post_image(api_client, lesion_jpeg(size=120))
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["state"] == "queued"
    assert body["prediction"] is None
    assert body["status_url"].endswith(f"/api/v1/images/{body['id']}/")
    assert response["Location"] == body["status_url"]
    assert (body["width"], body["height"]) == (120, 120)
    assert body["disclaimer"] == "Decision support, not a diagnosis."
    image = LesionImage.objects.get(pk=body["id"])
    assert image.clinic == clinic and image.state == ImageState.QUEUED
    assert len(callbacks) == 1  # the prediction task is published only after the row commits
    assert AuditEvent.objects.filter(action="upload_image", object_id=body["id"]).count() == 1


def test_upload_stores_under_random_key_not_the_client_name(api_client):
    response = post_image(api_client, lesion_jpeg(), name="../../etc/passwd Jane Doe.jpg")
    assert response.status_code == 202
    image = LesionImage.objects.get(pk=response.json()["id"])
    assert "passwd" not in image.file.name and "Jane" not in image.file.name
    assert image.file.name.startswith("images/") and image.file.name.endswith(".jpg")


def test_upload_can_attach_to_own_lesion(api_client, clinic):
    lesion = LesionFactory(patient=PatientFactory(clinic=clinic))
    response = post_image(api_client, lesion_jpeg(), lesion=str(lesion.pk))
    assert response.status_code == 202
    assert response.json()["lesion"] == str(lesion.pk)
    assert LesionImage.objects.get().lesion == lesion


def test_upload_strips_gps_and_applies_exif_orientation(api_client):
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90° clockwise to display
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0), 3: "W", 4: (0.0, 7.0, 0.0)}  # GPS IFD
    source = Image.new("RGB", (160, 90), (200, 150, 120))
    buffer = io.BytesIO()
    source.save(buffer, format="JPEG", exif=exif)
    assert b"Exif" in buffer.getvalue()[:200]

    response = post_image(api_client, buffer.getvalue())
    assert response.status_code == 202
    body = response.json()
    assert (body["width"], body["height"]) == (90, 160)
    stored = LesionImage.objects.get(pk=body["id"]).file.open("rb").read()
    assert b"GPS" not in stored
    # The client's compressed pixels are kept; the EXIF block now holds the orientation and nothing else,
    # and every reader (decode_image, a browser) shows the photo upright.
    reopened = Image.open(io.BytesIO(stored))
    assert dict(reopened.getexif()) == {0x0112: 6} and reopened.getexif().get_ifd(0x8825) == {}
    assert decode_image(stored).image.size == (90, 160)


def test_png_upload_is_stored_as_png(api_client):
    data = png_bytes(Image.new("RGBA", (40, 30), (10, 20, 30, 255)))
    response = post_image(api_client, data, name="x.png")
    assert response.status_code == 202
    assert response.json()["content_type"] == "image/png"


@pytest.mark.parametrize(
    ("name", "make_bytes", "code"),
    [
        ("not-an-image.jpg", lambda: b"this is a text file, not a photo\n" * 20, "not_an_image"),
        ("truncated.jpg", lambda: lesion_jpeg(size=200)[:1500], "truncated_image"),
        ("empty.jpg", lambda: b"", "empty_file"),
        ("drawing.svg", lambda: b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', None),
        ("report.pdf", lambda: b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF", None),
        ("animation.gif", lambda: _gif_bytes(), None),
    ],
)
def test_bad_files_get_400_naming_the_problem_and_store_nothing(api_client, name, make_bytes, code):
    response = post_image(api_client, make_bytes(), name=name)
    assert response.status_code == 400, response.content
    body = response.json()
    assert body["code"] == (code or "unsupported_format")
    assert body["errors"]["image"] == [body["detail"]]
    assert len(body["detail"]) > 15
    if code is None:
        assert "JPEG, PNG or WebP" in body["detail"]
    assert_nothing_stored()


def _gif_bytes() -> bytes:
    buffer = io.BytesIO()
    Image.new("P", (10, 10)).save(buffer, format="GIF")
    return buffer.getvalue()


def test_file_over_byte_limit_gets_400(api_client, settings):
    settings.MAX_UPLOAD_BYTES = 10_000
    data = lesion_jpeg(size=256, quality=98)
    assert len(data) > 10_000
    response = post_image(api_client, data)
    assert response.status_code == 400
    assert response.json()["code"] == "file_too_large"
    assert "limit" in response.json()["detail"]
    assert_nothing_stored()


def test_decompression_bomb_gets_400(api_client):
    # 12000 x 12000 black pixels: a small file that would need 144 MP (432 MB as RGB) to decode.
    bomb = png_bytes(Image.new("L", (12000, 12000), 0))
    assert len(bomb) < 2_000_000
    response = post_image(api_client, bomb, name="bomb.png")
    assert response.status_code == 400
    assert response.json()["code"] == "too_many_pixels"
    assert_nothing_stored()


def test_pixel_limit_is_configurable(api_client, settings):
    settings.MAX_IMAGE_PIXELS = 50 * 50
    response = post_image(api_client, lesion_jpeg(size=64))
    assert response.status_code == 400
    assert response.json()["code"] == "too_many_pixels"
    assert "megapixels" in response.json()["detail"]


def test_missing_image_field_gets_400(api_client):
    response = api_client.post(URL, {}, format="multipart")
    assert response.status_code == 400
    assert "image" in response.json()["errors"]
    assert_nothing_stored()


def test_unknown_lesion_gets_400(api_client):
    response = post_image(api_client, lesion_jpeg(), lesion="00000000-0000-0000-0000-000000000000")
    assert response.status_code == 400
    assert "lesion" in response.json()["errors"]
    assert_nothing_stored()


def test_malformed_lesion_id_gets_400(api_client):
    response = post_image(api_client, lesion_jpeg(), lesion="not-a-uuid")
    assert response.status_code == 400
    assert "lesion" in response.json()["errors"]
    assert_nothing_stored()


def test_other_clinics_lesion_gets_400_as_unknown(api_client, other_clinic):
    foreign = LesionFactory(patient=PatientFactory(clinic=other_clinic))
    response = post_image(api_client, lesion_jpeg(), lesion=str(foreign.pk))
    assert response.status_code == 400
    assert "Unknown lesion" in response.json()["errors"]["lesion"][0]
    assert_nothing_stored()


def test_database_failure_after_storing_leaves_no_orphan_file(api_client, monkeypatch):
    # The database refusing the row (here: an integrity error) must take the stored file with it.
    from django.db import IntegrityError

    def refuse(*args, **kwargs):
        raise IntegrityError("simulated")

    monkeypatch.setattr(LesionImage, "save", refuse)
    with pytest.raises(IntegrityError):
        post_image(api_client, lesion_jpeg())
    assert stored_image_files() == []


def _commit_then_drop(monkeypatch, *, committed: bool):
    """The connection drops while COMMIT is under way: the server committed (or not), the client only
    sees the error. The network fault is the outside world; the database and the storage are real."""
    from django.db import OperationalError, connection

    real_commit = connection._commit

    def commit():
        if committed:
            real_commit()
        else:
            connection._rollback()
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(connection, "_commit", commit)


@pytest.mark.django_db(transaction=True)
def test_an_upload_whose_commit_happened_before_the_connection_dropped_keeps_its_file(api_client, monkeypatch):
    _commit_then_drop(monkeypatch, committed=True)
    response = post_image(api_client, lesion_jpeg(seed=3))
    monkeypatch.undo()
    assert response.status_code == 202, response.content  # stored: the sweeper enqueues it
    image = LesionImage.objects.get(pk=response.json()["id"])
    assert image.state == ImageState.QUEUED and [path.name for path in stored_image_files()] == [
        image.file.name.split("/")[-1]
    ]


@pytest.mark.django_db(transaction=True)
def test_an_upload_whose_commit_did_not_happen_leaves_no_file(api_client, monkeypatch):
    _commit_then_drop(monkeypatch, committed=False)
    response = post_image(api_client, lesion_jpeg(seed=4))
    monkeypatch.undo()
    assert response.status_code == 503 and response.json()["code"] == "service_unavailable", response.content
    assert not LesionImage.objects.exists() and stored_image_files() == []


# --- reading ------------------------------------------------------------------------------------


def make_images(client, count: int) -> list[str]:
    ids = []
    for seed in range(count):
        response = post_image(client, lesion_jpeg(seed=seed))
        assert response.status_code == 202
        ids.append(response.json()["id"])
    return ids


def test_list_is_scoped_to_clinic_newest_first_and_paginated(api_client, other_api_client):
    mine = make_images(api_client, 3)
    theirs = make_images(other_api_client, 2)

    first = api_client.get(URL, {"page_size": 2})
    assert first.status_code == 200
    body = first.json()
    assert [item["id"] for item in body["results"]] == mine[::-1][:2]
    assert body["next"]
    second = api_client.get(body["next"]).json()
    assert [item["id"] for item in second["results"]] == mine[::-1][2:]
    assert second["next"] is None
    listed = {item["id"] for item in body["results"] + second["results"]}
    assert listed.isdisjoint(theirs)


def test_list_filters_by_state_and_rejects_unknown_state(api_client):
    ids = make_images(api_client, 2)
    LesionImage.objects.filter(pk=ids[0]).update(state=ImageState.FAILED, error="x")
    failed = api_client.get(URL, {"state": "failed"}).json()["results"]
    assert [item["id"] for item in failed] == [ids[0]]
    response = api_client.get(URL, {"state": "exploded"})
    assert response.status_code == 400
    assert "state" in response.json()["errors"]


def test_other_clinics_image_is_404_for_status_and_file(api_client, other_api_client):
    [image_id] = make_images(other_api_client, 1)
    for path in (f"{URL}{image_id}/", f"{URL}{image_id}/file/"):
        response = api_client.get(path)
        assert response.status_code == 404
        assert response.json() == {"detail": "Not found.", "code": "not_found"}


def test_download_returns_stored_bytes_as_attachment_and_is_audited(api_client, clinician):
    [image_id] = make_images(api_client, 1)
    response = api_client.get(f"{URL}{image_id}/file/")
    assert response.status_code == 200
    content = b"".join(response.streaming_content)
    assert content == LesionImage.objects.get(pk=image_id).file.open("rb").read()
    assert response["Content-Type"] == "image/jpeg"
    assert response["Content-Disposition"].startswith("attachment;")
    assert response["X-Content-Type-Options"] == "nosniff"
    event = AuditEvent.objects.get(action="download_image", object_id=image_id)
    assert event.actor == clinician and event.via == "api"


def test_done_image_shows_prediction_fields(api_client, active_model):
    from diagnosis.services.predictions import process_image

    [image_id] = make_images(api_client, 1)
    assert process_image(image_id=image_id, worker_id="inline") == "done"
    body = api_client.get(f"{URL}{image_id}/").json()
    assert body["state"] == "done"
    prediction = body["prediction"]
    assert 0.0 <= prediction["probability_malignant"] <= 1.0
    assert prediction["label"] in ("benign", "malignant")
    assert prediction["threshold"] == pytest.approx(active_model.threshold)
    assert prediction["above_threshold"] == (prediction["probability_malignant"] >= prediction["threshold"])
    assert prediction["model_version"] == active_model.version
    assert body["processed_at"] and body["created_at"]
    assert AuditEvent.objects.filter(action="view_image", object_id=image_id).exists()


def test_on_commit_hook_enqueues_the_new_image(api_client, django_capture_on_commit_callbacks, monkeypatch):
    sent = []
    monkeypatch.setattr(
        "diagnosis.services.images.announce_upload", lambda image_id, **hints: sent.append((image_id, hints))
    )  # the broker is outside
    with django_capture_on_commit_callbacks(execute=True):
        response = post_image(api_client, lesion_jpeg())
    image_id = response.json()["id"]
    assert sent == [(image_id, {"file": LesionImage.objects.get(pk=image_id).file.name})]  # fmt: skip


def test_stored_png_and_webp_keep_no_metadata(api_client):
    source = Image.new("RGB", (50, 40), (120, 80, 60))
    exif = Image.Exif()
    exif[0x010F] = "CameraMaker"
    for image_format, name in (("PNG", "a.png"), ("WEBP", "b.webp")):
        buffer = io.BytesIO()
        source.save(buffer, format=image_format, exif=exif)
        response = post_image(api_client, buffer.getvalue(), name=name)
        assert response.status_code == 202
        stored = LesionImage.objects.get(pk=response.json()["id"]).file.open("rb").read()
        reopened = Image.open(io.BytesIO(stored))
        assert reopened.format == "PNG"
        assert len(reopened.getexif()) == 0 and b"CameraMaker" not in stored
        assert not {"exif", "icc_profile", "XML:com.adobe.xmp"} & set(reopened.info)


def test_gps_block_is_gone_from_stored_jpeg(api_client):
    exif = Image.Exif()
    exif[0x8825] = {1: "N", 2: (51.0, 30.0, 0.0)}
    buffer = io.BytesIO()
    Image.new("RGB", (60, 60), (200, 150, 120)).save(buffer, format="JPEG", exif=exif)
    assert Image.open(io.BytesIO(buffer.getvalue())).getexif().get_ifd(0x8825)  # the GPS IFD was there
    response = post_image(api_client, buffer.getvalue())
    stored = LesionImage.objects.get(pk=response.json()["id"]).file.open("rb").read()
    assert Image.open(io.BytesIO(stored)).getexif().get_ifd(0x8825) == {}


def test_download_of_missing_file_is_404_and_not_audited(api_client):
    [image_id] = make_images(api_client, 1)
    from django.core.files.storage import default_storage

    default_storage.delete(LesionImage.objects.get(pk=image_id).file.name)
    response = api_client.get(f"{URL}{image_id}/file/")
    assert response.status_code == 404
    assert "missing" in response.json()["detail"]
    assert not AuditEvent.objects.filter(action="download_image").exists()


def test_bad_cursor_gets_400(api_client):
    response = api_client.get(URL, {"cursor": "garbage"})
    assert response.status_code == 400
    assert "cursor" in response.json()["errors"]


def test_status_is_one_query_scoped_to_the_clinic_and_audited_once_done(api_client, other_api_client, active_model,
                                                                          settings):  # fmt: skip
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from diagnosis.services.predictions import process_image

    settings.AUTO_EXPLAIN_METHODS = []
    image_id = post_image(api_client, lesion_jpeg()).json()["id"]
    url = f"/api/v1/images/{image_id}/status/"
    with CaptureQueriesContext(connection) as queries:
        body = api_client.get(url).json()
    assert body["state"] == "queued" and body["prediction"] is None and body["error"] == ""
    image_queries = [q["sql"] for q in queries.captured_queries if "diagnosis_lesionimage" in q["sql"]]
    assert len(image_queries) == 1, image_queries  # state, clinic scope and prediction: one statement
    assert '"diagnosis_lesionimage"."id" =' in image_queries[0]  # by primary key: indexed
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_IMAGE).exists()

    assert other_api_client.get(url).status_code == 404  # another clinic's image does not exist for it
    assert process_image(image_id=image_id, worker_id="w") == "done"
    response = api_client.get(url)
    body = response.json()
    full = api_client.get(f"/api/v1/images/{image_id}/").json()
    assert body["state"] == "done" and response["Cache-Control"] == "no-store"
    assert body["prediction"]["probability_malignant"] == full["prediction"]["probability_malignant"]
    assert body["prediction"]["model_version"] == full["prediction"]["model_version"] == active_model.version
    assert body["prediction"]["above_threshold"] == full["prediction"]["above_threshold"]
    assert AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_IMAGE, object_id=image_id).count() == 2
    assert api_client.get("/api/v1/images/not-a-uuid/status/").status_code in (400, 404)
