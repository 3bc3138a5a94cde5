"""The photo-quality gate end to end (issue 20): the gate built at training and stored with the model
version, used by a real worker process over the real broker and database; the four decisions in the
API's payloads, the schema and the batch; the `check` option; a version registered before the gate."""

from __future__ import annotations

import io
import uuid

import pytest
from PIL import Image, ImageFilter

from diagnosis.models import LesionImage, Prediction
from tests.conftest import lesion_jpeg, token_client, upload_file, wait_for
from tests.factories import ClinicFactory, ClinicianFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def blurred_jpeg(*, seed: int, size: int = 128, radius: float = 4) -> bytes:
    image = Image.open(io.BytesIO(lesion_jpeg(seed=seed, size=size))).filter(ImageFilter.GaussianBlur(radius))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def document_png() -> bytes:
    """A photographed letter rather than skin."""
    from PIL import ImageDraw

    page = Image.new("RGB", (160, 160), (250, 250, 250))
    draw = ImageDraw.Draw(page)
    for line in range(12):
        draw.line((12, 12 + line * 12, 148, 12 + line * 12), fill=(30, 30, 30), width=2)
    buffer = io.BytesIO()
    page.save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def client():
    clinic = ClinicFactory(name=f"Gate {uuid.uuid4().hex[:6]}")
    return token_client(ClinicianFactory(membership__clinic=clinic))


def upload(client, data: bytes, *, path: str = "/api/v1/images/", name: str = "lesion.jpg", **fields) -> dict:
    """Upload one photo and poll until the worker has finished it; returns the full record."""
    response = client.post(path, {"image": upload_file(data, name=name), **fields}, format="multipart")
    assert response.status_code == 202, response.content
    url = response.json()["status_url"]

    def finished():
        body = client.get(url).json()
        return body if body["state"] in ("done", "failed") else None

    return wait_for(finished, 90, interval=0.1, message=f"{url} to finish")


def test_a_sharp_photo_gets_a_call_and_a_blurred_one_is_not_assessable(celery_worker, gated_model, client):
    sharp = upload(client, lesion_jpeg(seed=31, size=128))
    assert sharp["state"] == "done", celery_worker.log()[-3000:]
    assert sharp["decision"] in ("above_threshold", "below_threshold", "uncertain") and sharp["assessable"] is True
    assert sharp["prediction"]["decision"] == sharp["decision"] and sharp["ood_score"] is not None
    checks = {check["name"]: check for check in sharp["quality"]["checks"]}
    assert set(checks) == {"focus", "brightness", "clipped", "skin", "lesion_size", "lesion_offset", "resolution"}
    assert all(check["passed"] for check in checks.values()) and checks["focus"]["threshold"] is not None
    assert checks["resolution"]["value"] == 128 and sharp["quality"]["gate"] == "strict"

    blurred = upload(client, blurred_jpeg(seed=31))
    assert blurred["state"] == "done" and blurred["decision"] == "not_assessable" and blurred["assessable"] is False
    assert blurred["quality"]["reasons"][0].startswith("out of focus")
    assert blurred["prediction"]["above_threshold"] is None  # no call is shown, the probability is kept
    assert 0 <= blurred["prediction"]["probability_malignant"] <= 1
    stored = Prediction.objects.get(image_id=blurred["id"])
    assert stored.decision == "not_assessable" and stored.assessable is False and stored.model_version == gated_model
    focus = next(check for check in stored.quality["checks"] if check["name"] == "focus")
    assert focus["threshold"] == pytest.approx(gated_model.quality_gate["thresholds"]["focus:low"])  # the stored one

    status = client.get(f"/api/v1/images/{blurred['id']}/status/").json()
    assert status["decision"] == "not_assessable" and status["prediction"]["decision"] == "not_assessable"
    assert status["quality"]["reasons"] == blurred["quality"]["reasons"] and status["ood_score"] == stored.ood_score


def test_a_document_is_refused_as_not_skin_and_unlike_the_training_photos(celery_worker, gated_model, client):
    body = upload(client, document_png(), name="letter.png")
    assert body["decision"] == "not_assessable", body
    reasons = " ".join(body["quality"]["reasons"])
    assert "does not look like a photo of skin" in reasons
    assert body["ood_score"] > gated_model.quality_gate["ood"]["threshold"] or "skin" in reasons


def test_near_the_threshold_the_result_is_uncertain(celery_worker, tiny_checkpoint, tiny_gate, client):
    from diagnosis.services.registry import register_model

    register_model(checkpoint=tiny_checkpoint, version=f"wide-band-{uuid.uuid4().hex[:6]}", activate=True,
                   quality_gate={**tiny_gate, "band": [0.0, 1.0]})  # fmt: skip
    body = upload(client, lesion_jpeg(seed=32, size=128))
    assert body["decision"] == "uncertain" and body["assessable"] is True
    assert body["quality"]["advice"] == "uncertain: specialist review recommended"
    assert body["prediction"]["above_threshold"] in (True, False)  # an uncertain result still has its probability


def test_the_check_option_relaxes_the_gate_per_upload(celery_worker, gated_model, client):
    off = upload(client, blurred_jpeg(seed=33), check="off")
    assert off["decision"] in ("above_threshold", "below_threshold", "uncertain"), off
    assert off["quality"]["gate"] == "off" and off["quality"]["warnings"][0].startswith("out of focus")
    lenient = upload(client, blurred_jpeg(seed=33), check="lenient")
    assert lenient["decision"] != "not_assessable" and lenient["quality"]["gate"] == "lenient"
    assert upload(client, document_png(), name="letter.png", check="lenient")["decision"] == "not_assessable"
    assert LesionImage.objects.get(pk=off["id"]).quality_check == "off"


def test_the_clinic_setting_is_the_default_check(celery_worker, gated_model, client):
    from diagnosis.models import Clinic

    image_clinic = Clinic.objects.get(memberships__user__auth_token_set__isnull=False, name__startswith="Gate")
    image_clinic.quality_check = "off"
    image_clinic.save(update_fields=["quality_check"])
    body = upload(client, blurred_jpeg(seed=34))
    assert body["quality"]["gate"] == "off" and body["decision"] != "not_assessable"


def test_a_batch_reports_the_decision_per_file(celery_worker, gated_model, client):
    response = client.post(
        "/api/v1/images/batch/",
        {"images": [upload_file(lesion_jpeg(seed=35, size=128)), upload_file(blurred_jpeg(seed=35))]},
        format="multipart",
    )
    assert response.status_code == 202, response.content
    url = response.json()["status_url"]

    def finished():
        body = client.get(url).json()
        return body if all(image["state"] == "done" for image in body["images"]) else None

    body = wait_for(finished, 90, interval=0.2, message="the batch to finish")
    decisions = [image["prediction"]["decision"] for image in body["images"]]
    assert decisions[1] == "not_assessable" and decisions[0] != "not_assessable", body
    assert body["images"][1]["prediction"]["quality"]["reasons"]


def test_a_version_registered_before_the_gate_keeps_working_with_a_note(celery_worker, active_model, client):
    body = upload(client, blurred_jpeg(seed=36))
    assert body["state"] == "done" and body["decision"] in ("above_threshold", "below_threshold"), body
    assert body["assessable"] is True and body["ood_score"] is None
    assert body["quality"]["gate"] == "off" and "registered before the photo-quality gate" in body["quality"]["note"]
    assert all(check["threshold"] is None for check in body["quality"]["checks"] if check["name"] != "resolution")


@pytest.mark.parametrize("value", ["loose", "", "STRICT"])
def test_a_bad_check_option_is_a_400_naming_the_field(active_model, client, value):
    response = client.post(
        "/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=37)), "check": value}, format="multipart"
    )
    assert response.status_code == 400 and "check" in response.json()["errors"], response.content
    assert not LesionImage.objects.exists()
    batch = client.post(
        "/api/v1/images/batch/", {"images": [upload_file(lesion_jpeg(seed=37))], "check": value}, format="multipart"
    )
    assert batch.status_code == 400 and "check" in batch.json()["errors"] and not LesionImage.objects.exists()


def test_the_schema_documents_the_gate():
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    components = schema["components"]["schemas"]
    image = components["Image"]["properties"]
    assert {"decision", "assessable", "quality", "ood_score"} <= set(image)
    status = components["ImageStatus"]["properties"]
    assert {"decision", "assessable", "quality", "ood_score"} <= set(status)
    assert components["Prediction"]["properties"]["decision"]["allOf"] == [
        {"$ref": "#/components/schemas/DecisionEnum"}
    ]
    assert set(components["DecisionEnum"]["enum"]) == {
        "above_threshold",
        "below_threshold",
        "uncertain",
        "not_assessable",
    }
    assert {"checks", "reasons", "ood", "band"} <= set(components["Quality"]["properties"])
    upload_body = schema["paths"]["/api/v1/images/"]["post"]["requestBody"]["content"]["multipart/form-data"]
    check = upload_body["schema"]["$ref"].split("/")[-1]
    assert "check" in components[check]["properties"]


@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        ({"focus:lo": 1.0}, "'focus:lo' is not a threshold"),
        ({"focus:low": "sharp"}, "'focus:low' must be a number"),
        ({"band": [0.6, 0.4]}, "'band' must be [low, high]"),
        ({"ood": True}, "'ood' must be a number"),
    ],
)
def test_a_mistyped_gate_override_is_a_system_check_error(settings, overrides, named):
    from django.core.checks import run_checks

    settings.QUALITY_GATE_OVERRIDES = {"focus:low": -2.5, "ood": 3.0, "band": [0.2, 0.4]}
    assert not [error for error in run_checks() if error.id == "diagnosis.E003"]
    settings.QUALITY_GATE_OVERRIDES = overrides
    errors = [error for error in run_checks() if error.id == "diagnosis.E003"]
    assert len(errors) == 1 and named in errors[0].msg, errors


def test_a_mistyped_augmentation_choice_is_a_system_check_error(settings):
    from django.core.checks import run_checks

    settings.TEST_TIME_AUGMENTATION = "always"
    errors = [error for error in run_checks() if error.id == "diagnosis.E002"]
    assert len(errors) == 1 and "TEST_TIME_AUGMENTATION" in errors[0].msg
