"""POST /api/v1/images/batch/ and GET /api/v1/batches/{id}/: per-file validation, partial acceptance."""

from __future__ import annotations

from django.core.files.base import ContentFile
from django.core.files.storage import default_storage

from diagnosis.models import AuditEvent, ImageState, LesionImage, Prediction, UploadBatch
from diagnosis.services.predictions import process_image
from tests.conftest import lesion_jpeg, stored_image_files, upload_file

BATCH = "/api/v1/images/batch/"


def send(client, files):
    return client.post(BATCH, {"images": files}, format="multipart")


def test_valid_files_are_accepted_and_each_invalid_one_is_listed(api_client, django_capture_on_commit_callbacks):
    files = [
        upload_file(lesion_jpeg(seed=1), "a.jpg"),
        upload_file(b"not an image at all", "notes.jpg"),
        upload_file(lesion_jpeg(seed=2), "b.jpg"),
        upload_file(b"", "empty.jpg"),
        upload_file(lesion_jpeg(seed=3), "c.jpg"),
    ]
    with django_capture_on_commit_callbacks() as callbacks:
        response = send(api_client, files)
    assert response.status_code == 202, response.content
    body = response.json()
    assert body["submitted"] == 5
    assert [item["position"] for item in body["accepted"]] == [0, 2, 4]
    assert [(item["position"], item["code"]) for item in body["rejected"]] == [(1, "not_an_image"), (3, "empty_file")]
    assert all(item["detail"] for item in body["rejected"])
    assert response["Location"] == body["status_url"]
    assert LesionImage.objects.count() == 3 == len(stored_image_files())
    assert len(callbacks) == 1  # recorded in one transaction, announced once (one message per 16 photos)
    assert AuditEvent.objects.filter(action=AuditEvent.Action.UPLOAD_IMAGE).count() == 3
    batch = UploadBatch.objects.get()
    assert set(batch.images.values_list("pk", flat=True)) == {LesionImage.objects.get(pk=i["id"]).pk
                                                             for i in body["accepted"]}  # fmt: skip
    # The client's file names are not kept.
    assert "notes.jpg" not in str(batch.rejected)


def test_a_database_error_while_recording_a_batch_accepts_nothing_and_keeps_no_file(api_client, monkeypatch):
    from django.db import OperationalError

    def fails(**kwargs):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr("diagnosis.services.images.record_events", fails)  # the database fails mid-way
    response = send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (11, 12, 13)])
    assert response.status_code == 503 and response.json()["detail"]
    assert not LesionImage.objects.exists() and not UploadBatch.objects.exists()
    assert stored_image_files() == []  # the three stored files were removed with the transaction


def test_a_large_batch_wakes_one_worker_per_sixteen_photos(
    api_client, monkeypatch, settings, django_capture_on_commit_callbacks
):
    from diagnosis.services import wakeups

    settings.INFERENCE_BATCH_SIZE = 16
    announced = []
    monkeypatch.setattr("diagnosis.services.images.announce_upload", announced.append)  # the broker is outside
    with django_capture_on_commit_callbacks(execute=True):
        body = send(api_client, [upload_file(lesion_jpeg(seed=s, size=32)) for s in range(40)]).json()
    ids = [item["id"] for item in body["accepted"]]
    assert len(ids) == 40
    assert announced == ([ids[0], ids[16], ids[32]] if wakeups.enabled() else ids)


def test_batch_status_follows_its_images(api_client, active_model, django_capture_on_commit_callbacks, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    with django_capture_on_commit_callbacks():
        body = send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (4, 5)]).json()
    status = api_client.get(body["status_url"]).json()
    assert status["accepted"] == 2 and status["states"]["queued"] == 2 and status["finished"] is False
    for item in body["accepted"]:
        assert process_image(image_id=item["id"], worker_id="w") == "done"
    status = api_client.get(body["status_url"]).json()
    assert status["states"] == {"queued": 0, "processing": 0, "done": 2, "failed": 0}
    assert status["finished"] is True
    assert {image["id"] for image in status["images"]} == {item["id"] for item in body["accepted"]}


def test_a_poison_image_fails_alone(api_client, active_model, django_capture_on_commit_callbacks, settings):
    """One photo passes validation but is damaged before the worker reads it: only it fails."""
    settings.AUTO_EXPLAIN_METHODS = []
    with django_capture_on_commit_callbacks():
        body = send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (6, 7, 8)]).json()
    poison = LesionImage.objects.get(pk=body["accepted"][1]["id"])
    default_storage.delete(poison.file.name)
    default_storage.save(poison.file.name, ContentFile(lesion_jpeg(seed=7)[:300]))
    outcomes = [process_image(image_id=item["id"], worker_id="w") for item in body["accepted"]]
    assert outcomes == ["done", "failed", "done"]
    poison.refresh_from_db()
    assert poison.state == ImageState.FAILED and "could not be decoded" in poison.error
    assert Prediction.objects.count() == 2
    states = api_client.get(body["status_url"]).json()["states"]
    assert states["done"] == 2 and states["failed"] == 1


def test_a_batch_with_no_valid_file_is_a_400_and_stores_nothing(api_client):
    response = send(api_client, [upload_file(b"x", "a.jpg"), upload_file(b"%PDF-1.4", "b.jpg")])
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "no_valid_file" and "None of the 2 files" in body["detail"]
    assert [item["position"] for item in body["rejected"]] == [0, 1]
    assert LesionImage.objects.count() == 0 and stored_image_files() == []


def test_too_many_files_is_a_400_naming_the_limit(api_client, settings):
    settings.MAX_BATCH_FILES = 2
    response = send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (9, 10, 11)])
    assert response.status_code == 400
    assert "at most 2" in response.json()["errors"]["images"][0]
    assert LesionImage.objects.count() == 0


def test_no_files_is_a_400(api_client):
    response = api_client.post(BATCH, {}, format="multipart")
    assert response.status_code == 400 and "images" in response.json()["errors"]


def test_another_clinics_batch_is_404(api_client, other_api_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        body = send(api_client, [upload_file(lesion_jpeg(seed=12))]).json()
    assert other_api_client.get(body["status_url"]).status_code == 404
    assert api_client.get(body["status_url"]).status_code == 200


def test_a_batch_counts_each_photo_against_the_upload_limit(api_client, settings, django_capture_on_commit_callbacks):
    from django.core.cache import cache

    cache.clear()
    settings.API_UPLOAD_RATE_LIMIT = "5/minute"
    with django_capture_on_commit_callbacks():
        assert send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (13, 14, 15)]).status_code == 202
        refused = send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (16, 17, 18)])  # 3 + 3 > 5
        assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
        assert send(api_client, [upload_file(lesion_jpeg(seed=s)) for s in (19, 20)]).status_code == 202  # 3 + 2
    assert LesionImage.objects.count() == 5
    cache.clear()
