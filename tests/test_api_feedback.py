"""Feedback through the API: clinicians' assessments and histopathology outcomes as ground truth."""

from __future__ import annotations

import pytest

from diagnosis.models import AuditEvent, Feedback
from diagnosis.services.predictions import process_image
from tests.conftest import lesion_jpeg, upload_file


def upload(api_client, django_capture_on_commit_callbacks) -> str:
    with django_capture_on_commit_callbacks():
        response = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=8))}, format="multipart")
    assert response.status_code == 202
    return response.json()["id"]


@pytest.fixture
def done_image_id(api_client, active_model, django_capture_on_commit_callbacks, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    image_id = upload(api_client, django_capture_on_commit_callbacks)
    assert process_image(image_id=image_id, worker_id="w1") == "done"
    return image_id


def test_assessment_and_outcome_are_recorded_with_who_and_when(api_client, clinician, done_image_id, active_model):
    url = f"/api/v1/images/{done_image_id}/feedback/"
    first = api_client.post(url, {"kind": "assessment", "agrees": False, "note": "looks benign"}, format="json")
    assert first.status_code == 201, first.content
    assert first.json()["agrees"] is False
    assert first.json()["recorded_by"] == clinician.username
    assert first.json()["model_version"] == active_model.version

    second = api_client.post(url, {"kind": "histopathology", "diagnosis": "melanoma_in_situ"}, format="json")
    assert second.status_code == 201
    assert second.json()["ground_truth"] == "malignant"

    listed = api_client.get(url).json()
    assert [item["kind"] for item in listed] == ["histopathology", "assessment"]  # newest first
    assert Feedback.objects.filter(image_id=done_image_id, recorded_by=clinician).count() == 2
    assert AuditEvent.objects.filter(action=AuditEvent.Action.RECORD_FEEDBACK, via="api").count() == 2


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "assessment"}, "agrees"),
        ({"kind": "histopathology"}, "diagnosis"),
        ({"kind": "histopathology", "diagnosis": "bad-guess"}, "diagnosis"),
        ({"kind": "opinion", "agrees": True}, "kind"),
    ],
)
def test_bad_feedback_is_a_400_naming_the_field(api_client, done_image_id, body, field):
    response = api_client.post(f"/api/v1/images/{done_image_id}/feedback/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["errors"]
    assert not Feedback.objects.exists()


def test_assessment_before_a_result_is_a_409_but_an_outcome_is_accepted(
    api_client, active_model, django_capture_on_commit_callbacks
):
    image_id = upload(api_client, django_capture_on_commit_callbacks)  # still queued: no worker here
    url = f"/api/v1/images/{image_id}/feedback/"
    refused = api_client.post(url, {"kind": "assessment", "agrees": True}, format="json")
    assert refused.status_code == 409
    assert "no result yet" in refused.json()["detail"]
    accepted = api_client.post(url, {"kind": "histopathology", "diagnosis": "benign_naevus"}, format="json")
    assert accepted.status_code == 201
    assert accepted.json()["ground_truth"] == "benign"


def test_another_clinics_image_feedback_is_404(other_api_client, done_image_id):
    url = f"/api/v1/images/{done_image_id}/feedback/"
    assert other_api_client.get(url).status_code == 404
    assert other_api_client.post(url, {"kind": "assessment", "agrees": True}, format="json").status_code == 404
    assert not Feedback.objects.exists()
