"""End to end through real processes: the API in this process, a real Celery worker process,
the real Redis broker and the real PostgreSQL database."""

from __future__ import annotations

import pytest

from diagnosis.models import ImageState, LesionImage, Prediction
from tests.conftest import lesion_jpeg, token_client, upload_file, wait_for
from tests.factories import ClinicFactory, ClinicianFactory, LesionFactory, PatientFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def e2e_setup(tiny_checkpoint):
    from diagnosis.services.registry import register_model

    clinic = ClinicFactory(name="E2E clinic")
    clinician = ClinicianFactory(membership__clinic=clinic)
    model_version = register_model(checkpoint=tiny_checkpoint, version="e2e-tiny", activate=True)
    return token_client(clinician), clinic, model_version


def poll_until_finished(client, status_url: str, timeout: float = 60):
    def finished():
        body = client.get(status_url).json()
        return body if body["state"] in ("done", "failed") else None

    return wait_for(finished, timeout, interval=0.1, message=f"{status_url} to finish")


def test_upload_is_predicted_by_a_real_worker_over_redis_and_postgres(celery_worker, e2e_setup, tiny_checkpoint):
    from mlcore.inference import Predictor
    from mlcore.preprocessing import decode_image

    client, clinic, model_version = e2e_setup
    lesion = LesionFactory(patient=PatientFactory(clinic=clinic))
    response = client.post(
        "/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=7, size=150)), "lesion": str(lesion.pk)},
        format="multipart",
    )  # fmt: skip
    assert response.status_code == 202, response.content
    assert response.json()["state"] == "queued"

    body = poll_until_finished(client, response.json()["status_url"])
    assert body["state"] == "done", (body, celery_worker.log()[-3000:])
    assert body["prediction"]["model_version"] == "e2e-tiny"

    image = LesionImage.objects.get(pk=body["id"])
    assert image.claimed_by.startswith("test-")  # claimed by the worker process, not this one
    prediction = Prediction.objects.get(image=image, model_version=model_version)
    expected = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict(
        [decode_image(image.file.open("rb").read()).image]
    )[0]
    assert prediction.probability_malignant == pytest.approx(expected.probability_malignant, abs=1e-5)
    assert body["prediction"]["probability_malignant"] == pytest.approx(prediction.probability_malignant)
    assert prediction.label == expected.label
    assert "predict_image_task" in celery_worker.log()


def test_many_uploads_each_get_exactly_one_prediction(celery_worker, e2e_setup):
    client, _, model_version = e2e_setup
    ids = []
    for seed in range(8):
        response = client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=seed))}, format="multipart")
        assert response.status_code == 202
        ids.append(response.json()["id"])
    wait_for(
        lambda: LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE).count() == len(ids),
        90,
        message="all uploads to be done",
    )
    assert Prediction.objects.filter(image_id__in=ids, model_version=model_version).count() == len(ids)
    assert not LesionImage.objects.filter(pk__in=ids, state=ImageState.PROCESSING).exists()
    # each image was claimed once: no message was processed twice
    assert set(LesionImage.objects.filter(pk__in=ids).values_list("attempts", flat=True)) == {1}


def test_image_that_breaks_the_model_ends_failed_with_reason(celery_worker, e2e_setup):
    """Passes upload validation, then the stored file is damaged before the worker reads it."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from diagnosis.services.images import submit_image

    client, clinic, _ = e2e_setup
    clinician = clinic.memberships.get().user
    # Store the upload without enqueuing (no commit hook fires inside atomic), damage it, then enqueue.
    from django.db import transaction

    with transaction.atomic():
        image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=9)))
        default_storage.delete(image.file.name)
        default_storage.save(image.file.name, ContentFile(lesion_jpeg(seed=9)[:400]))
    body = poll_until_finished(client, f"/api/v1/images/{image.pk}/")
    assert body["state"] == "failed"
    assert "could not be decoded" in body["error"] and "truncated" in body["error"]
    assert body["prediction"] is None


def test_running_worker_serves_a_newly_activated_model_without_restart(celery_worker, e2e_setup, tiny_checkpoint):
    from diagnosis.services.registry import activate_model, register_model
    from mlcore.model import CheckpointMeta, checkpoint_bytes, load_checkpoint

    client, _, first_version = e2e_setup
    upload = {"image": upload_file(lesion_jpeg(seed=21))}
    first = poll_until_finished(client, client.post("/api/v1/images/", upload, format="multipart").json()["status_url"])
    assert first["prediction"]["model_version"] == first_version.version

    model, meta = load_checkpoint(tiny_checkpoint)
    meta.threshold = 0.001  # the new version calls everything malignant: easy to tell apart
    second_version = register_model(checkpoint=checkpoint_bytes(model, CheckpointMeta(**meta.to_dict())), version="v2")
    activate_model(model_version=second_version)

    upload = {"image": upload_file(lesion_jpeg(seed=22))}
    second = poll_until_finished(
        client, client.post("/api/v1/images/", upload, format="multipart").json()["status_url"]
    )
    assert second["prediction"]["model_version"] == "v2"
    assert second["prediction"]["threshold"] == pytest.approx(0.001)
    assert second["prediction"]["label"] == "malignant"
    assert celery_worker.process.poll() is None  # the same worker process, never restarted
