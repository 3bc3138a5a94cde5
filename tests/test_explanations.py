"""The explanations API and its services: requests, validation, idempotency, files, scoping."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

from diagnosis.models import AuditEvent, Explanation, LesionImage
from diagnosis.services.explanation_work import compute_explanation
from diagnosis.services.predictions import process_image
from tests.conftest import lesion_jpeg, upload_file


@pytest.fixture
def done_image(api_client, active_model, django_capture_on_commit_callbacks, settings):
    settings.GRADCAM_PICTURES = "eager"  # the pictures drawn by the render task (on_view: its own tests below)
    with django_capture_on_commit_callbacks():
        response = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=4, size=160))},
                                   format="multipart")  # fmt: skip
    image_id = response.json()["id"]
    with django_capture_on_commit_callbacks() as callbacks:
        assert process_image(image_id=image_id, worker_id="w1") == "done"
    from diagnosis.services.explanation_files import render_explanation

    # The callbacks publish the render (default queue) and IG (explain queue) tasks; run the render here.
    gradcam = Explanation.objects.get(image_id=image_id, method="gradcam")
    assert gradcam.state == Explanation.State.PROCESSING and gradcam.raw_map is not None and not gradcam.overlay
    assert len(gradcam.raw_map) < 1024  # the map at the feature map's size, not at the input size
    assert render_explanation(explanation_id=str(gradcam.pk)) == "done"
    image = LesionImage.objects.get(pk=image_id)
    image.queued_callbacks = callbacks
    return image


def url(image) -> str:
    return f"/api/v1/images/{image.pk}/explanations/"


def test_every_prediction_gets_gradcam_at_once_and_ig_queued(done_image, active_model):
    gradcam = Explanation.objects.get(image=done_image, method="gradcam")
    assert gradcam.state == Explanation.State.DONE and gradcam.model_version == active_model
    assert gradcam.target_class == done_image.predictions.get().label
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    assert ig.state == Explanation.State.QUEUED and ig.params == {"baseline": "blurred", "n_steps": 50}
    assert ig.requested_by is None
    # The render and IG tasks are published once the rows commit (beside the waiters' notifications).
    tasks = [callback for callback in done_image.queued_callbacks if "notify" not in callback.__module__]
    assert len(tasks) == 2, done_image.queued_callbacks


def test_gradcam_files_are_valid_and_sized_for_display(done_image, api_client):
    gradcam = Explanation.objects.get(image=done_image, method="gradcam")
    from mlcore.heatmap import LEGEND_HEIGHT

    overlay = Image.open(gradcam.overlay.open("rb"))
    assert overlay.format == "JPEG" and overlay.size == (160, 160 + LEGEND_HEIGHT)
    heatmap = Image.open(gradcam.heatmap.open("rb"))
    assert heatmap.size == (160, 160) and heatmap.mode == "P" and "transparency" in heatmap.info
    assert heatmap.convert("RGBA").size == (160, 160)  # reads back with its transparency
    raw = np.load(io.BytesIO(gradcam.attribution.open("rb").read()), allow_pickle=False)
    assert raw.dtype == np.float16 and raw.shape == (64, 64)


def test_worker_computes_a_queued_integrated_gradients_explanation(done_image, api_client):
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    assert compute_explanation(explanation_id=str(ig.pk), worker_id="explainer") == "done"
    ig.refresh_from_db()
    assert ig.state == Explanation.State.DONE and ig.duration_ms > 0
    assert ig.convergence_delta is not None and ig.convergence_delta < 0.5
    body = api_client.get(f"/api/v1/explanations/{ig.pk}/").json()
    assert body["state"] == "done" and body["method"] == "integrated_gradients"
    assert body["target_class"] in ("benign", "malignant")
    overlay = api_client.get(body["overlay_url"])
    assert overlay.status_code == 200 and overlay["Content-Type"] == "image/jpeg"
    assert overlay["Content-Disposition"].endswith('-overlay.jpg"')
    assert Image.open(io.BytesIO(b"".join(overlay.streaming_content))).format == "JPEG"
    attribution = api_client.get(body["attribution_url"])
    raw = np.load(io.BytesIO(b"".join(attribution.streaming_content)), allow_pickle=False)
    assert raw.dtype == np.float16 and raw.shape == (3, 64, 64)
    assert attribution["Content-Disposition"].startswith("attachment")
    assert AuditEvent.objects.filter(action="view_explanation", object_id=str(ig.pk)).count() == 2
    assert compute_explanation(explanation_id=str(ig.pk), worker_id="other") == "skipped"


def test_request_another_method_answers_202_then_reuses_it(done_image, api_client, django_capture_on_commit_callbacks):
    body = {"method": "occlusion", "params": {"window": 16}}
    with django_capture_on_commit_callbacks() as callbacks:
        first = api_client.post(url(done_image), body, format="json")
    assert first.status_code == 202, first.content
    assert first.json()["state"] == "queued" and first.json()["params"] == {
        "baseline": "blurred",
        "stride": 8,
        "window": 16,
    }
    assert first["Location"] == first.json()["status_url"]
    assert len(callbacks) == 1
    # The same request with the defaults spelled out is the same request.
    again = api_client.post(
        url(done_image), {"method": "occlusion", "params": {"window": 16, "stride": 8}}, format="json"
    )
    assert again.status_code == 200 and again.json()["id"] == first.json()["id"]
    listed = api_client.get(url(done_image)).json()
    assert {item["method"] for item in listed} == {"gradcam", "integrated_gradients", "occlusion"}
    assert AuditEvent.objects.filter(action="request_explanation").count() == 2


def test_explicit_target_is_a_different_request(done_image, api_client):
    label = done_image.predictions.get().label
    other = "benign" if label == "malignant" else "malignant"
    response = api_client.post(url(done_image), {"method": "gradcam", "target": other}, format="json")
    assert response.status_code == 202
    assert response.json()["target_class"] == other
    same = api_client.post(url(done_image), {"method": "gradcam"}, format="json")
    assert same.status_code == 200 and same.json()["target_class"] == label


@pytest.mark.parametrize(
    ("body", "code", "words"),
    [
        ({"method": "deep_dream"}, "unknown_method", "Unknown method"),
        ({"method": "integrated_gradients", "params": {"n_steps": 301}}, "over_budget", "budget"),
        ({"method": "integrated_gradients", "params": {"n_steps": -3}}, "invalid_params", "at least 2"),
        ({"method": "lime", "params": {"n_segments": "many"}}, "invalid_params", "integer"),
        ({"method": "gradcam", "target": "melanoma"}, "invalid_target", "Unknown target"),
        ({"params": {}}, "invalid", "method"),
    ],
)
def test_bad_requests_get_400_with_a_reason(done_image, api_client, body, code, words):
    before = Explanation.objects.count()
    response = api_client.post(url(done_image), body, format="json")
    assert response.status_code == 400, response.content
    assert response.json()["code"] == code and words in response.json()["detail"]
    assert Explanation.objects.count() == before


def test_image_without_prediction_gets_409(api_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        response = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart")
    answer = api_client.post(
        url(LesionImage.objects.get(pk=response.json()["id"])), {"method": "gradcam"}, format="json"
    )
    assert answer.status_code == 409
    assert answer.json()["code"] == "no_prediction" and "no prediction yet" in answer.json()["detail"]


def test_other_clinic_gets_404_everywhere(done_image, other_api_client):
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    gradcam = Explanation.objects.get(image=done_image, method="gradcam")
    assert other_api_client.post(url(done_image), {"method": "gradcam"}, format="json").status_code == 404
    assert other_api_client.get(url(done_image)).status_code == 404
    for path in (f"/api/v1/explanations/{ig.pk}/", *(f"/api/v1/explanations/{gradcam.pk}/{f}/" for f in
                                                       ("overlay", "heatmap", "attribution"))):  # fmt: skip
        assert other_api_client.get(path).status_code == 404, path


def test_files_of_an_unfinished_explanation_are_404(done_image, api_client):
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    body = api_client.get(f"/api/v1/explanations/{ig.pk}/").json()
    assert body["overlay_url"] is None
    assert api_client.get(f"/api/v1/explanations/{ig.pk}/overlay/").status_code == 404


def test_failed_explanation_is_queued_again_when_requested_again(done_image, api_client):
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    Explanation.objects.filter(pk=ig.pk).update(state=Explanation.State.FAILED, error="worker lost")
    again = api_client.post(url(done_image), {"method": "integrated_gradients"}, format="json")
    assert again.status_code == 202 and again.json()["id"] == str(ig.pk) and again.json()["state"] == "queued"


def test_sweeper_sends_lost_explanation_messages_again(done_image, settings, monkeypatch):
    from datetime import timedelta

    from django.utils import timezone

    from diagnosis.services.images import requeue_stale_images

    sent = []
    monkeypatch.setattr("diagnosis.services.explanations.enqueue_explanation", sent.append)  # the broker is outside
    ig = Explanation.objects.get(image=done_image, method="integrated_gradients")
    assert requeue_stale_images()["explanations"] == 0  # just queued: its message is presumably on its way
    Explanation.objects.filter(pk=ig.pk).update(
        created_at=timezone.now() - timedelta(seconds=settings.REQUEUE_AFTER_SECONDS + 1)
    )
    assert requeue_stale_images()["explanations"] == 1
    assert sent == [str(ig.pk)]
    assert requeue_stale_images()["explanations"] == 0  # not sent again at once


def test_automatic_explanations_can_be_turned_off(
    api_client, active_model, settings, django_capture_on_commit_callbacks
):
    settings.AUTO_EXPLAIN_METHODS = []
    with django_capture_on_commit_callbacks():
        response = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=8))}, format="multipart")
    assert process_image(image_id=response.json()["id"], worker_id="w1") == "done"
    assert list(Explanation.objects.values_list("method", flat=True)) == ["gradcam"]


# --- limits on requested explanations (security review: one token could flood the explain queue) ---


def occlusion(window: int) -> dict:
    return {"method": "occlusion", "params": {"window": window}}


@pytest.fixture
def limits(settings, clinician):
    from diagnosis.services import rates

    settings.EXPLAIN_RATE_LIMIT = ""
    settings.EXPLAIN_MAX_PENDING_PER_USER = 100
    settings.EXPLAIN_MAX_PER_IMAGE = 100
    rates.reset("explanations", clinician.pk)
    yield settings
    rates.reset("explanations", clinician.pk)


def test_requests_over_the_rate_get_429_with_retry_after(done_image, api_client, limits):
    limits.EXPLAIN_RATE_LIMIT = "2/hour"
    assert [api_client.post(url(done_image), occlusion(w), format="json").status_code for w in (8, 12)] == [202, 202]
    before = Explanation.objects.count()
    refused = api_client.post(url(done_image), occlusion(16), format="json")
    assert refused.status_code == 429 and refused.json()["code"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= 3600 and "Try again in" in refused.json()["detail"]
    assert Explanation.objects.count() == before  # nothing queued
    # Asking again for one that exists makes no new work: answered, not counted.
    assert api_client.post(url(done_image), occlusion(8), format="json").status_code == 200


def test_too_many_pending_explanations_of_one_user_get_429(done_image, api_client, limits):
    limits.EXPLAIN_MAX_PENDING_PER_USER = 2
    assert [api_client.post(url(done_image), occlusion(w), format="json").status_code for w in (8, 12)] == [202, 202]
    refused = api_client.post(url(done_image), occlusion(16), format="json")
    assert refused.status_code == 429 and refused.json()["code"] == "too_many_pending"
    assert "Retry-After" in refused
    Explanation.objects.filter(method="occlusion").update(state=Explanation.State.DONE)  # the worker caught up
    assert api_client.post(url(done_image), occlusion(16), format="json").status_code == 202


def test_too_many_requested_explanations_of_one_photo_get_409(done_image, api_client, limits):
    limits.EXPLAIN_MAX_PER_IMAGE = 2
    for window in (8, 12):
        assert api_client.post(url(done_image), occlusion(window), format="json").status_code == 202
    Explanation.objects.filter(method="occlusion").update(state=Explanation.State.DONE)
    refused = api_client.post(url(done_image), occlusion(16), format="json")
    assert refused.status_code == 409 and refused.json()["code"] == "too_many_explanations"
    # A failed one asked for again adds no row: still allowed at the cap.
    Explanation.objects.filter(method="occlusion", params__window=8).update(state=Explanation.State.FAILED)
    assert api_client.post(url(done_image), occlusion(8), format="json").status_code == 202
    # The automatic ones (Grad-CAM, Integrated Gradients) do not count towards it.
    assert Explanation.objects.filter(image=done_image).count() == 4


def test_the_portal_says_why_a_request_is_refused(done_image, client, clinician, limits):
    limits.EXPLAIN_RATE_LIMIT = "1/hour"
    client.force_login(clinician)
    page = f"/images/{done_image.pk}/explanations/"
    client.post(page, {"method": "occlusion"})
    response = client.post(page, {"method": "lime"}, follow=True)
    assert "Too many explanation requests" in response.content.decode()
    assert not Explanation.objects.filter(image=done_image, method="lime").exists()


# --- Grad-CAM's pictures drawn at their first view (GRADCAM_PICTURES=on_view, the default) -------------------


@pytest.fixture
def predicted_on_view(api_client, active_model, django_capture_on_commit_callbacks, settings):
    settings.GRADCAM_PICTURES = "on_view"
    settings.AUTO_EXPLAIN_METHODS = []
    image_id = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=7, size=160))},
                               format="multipart").json()["id"]  # fmt: skip
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        assert process_image(image_id=image_id, worker_id="w1") == "done"
    return image_id, callbacks


def test_on_view_the_worker_keeps_the_map_done_and_sends_no_render_task(predicted_on_view):
    image_id, callbacks = predicted_on_view
    gradcam = Explanation.objects.get(image_id=image_id, method="gradcam")
    assert gradcam.state == Explanation.State.DONE and gradcam.raw_map is not None and not gradcam.overlay
    assert not [callback for callback in callbacks if "enqueue_render" in repr(callback.__code__.co_names)]


def test_on_view_the_first_download_draws_the_pictures_once_and_keeps_them(predicted_on_view, api_client):
    image_id, _ = predicted_on_view
    gradcam = Explanation.objects.get(image_id=image_id, method="gradcam")
    detail = api_client.get(f"/api/v1/explanations/{gradcam.pk}/").json()
    assert detail["state"] == "done" and detail["overlay_url"]
    overlay = api_client.get(f"/api/v1/explanations/{gradcam.pk}/overlay/")
    assert overlay.status_code == 200 and b"".join(overlay.streaming_content)[:2] == b"\xff\xd8"
    gradcam.refresh_from_db()
    stored = (gradcam.overlay.name, gradcam.heatmap.name, gradcam.attribution.name)
    assert all(stored) and gradcam.raw_map is None  # the map now lives in its .npy
    heatmap = api_client.get(f"/api/v1/explanations/{gradcam.pk}/heatmap/")
    picture = Image.open(io.BytesIO(b"".join(heatmap.streaming_content)))
    assert heatmap.status_code == 200 and picture.format == "PNG"
    raw = api_client.get(f"/api/v1/explanations/{gradcam.pk}/attribution/")
    assert np.load(io.BytesIO(b"".join(raw.streaming_content))).shape == (active_size(gradcam),) * 2
    gradcam.refresh_from_db()
    assert (gradcam.overlay.name, gradcam.heatmap.name, gradcam.attribution.name) == stored  # drawn once


def test_on_view_a_photo_that_cannot_be_read_gives_a_404_that_says_so(predicted_on_view, api_client):
    image_id, _ = predicted_on_view
    gradcam = Explanation.objects.get(image_id=image_id, method="gradcam")
    LesionImage.objects.get(pk=image_id).file.delete(save=False)
    response = api_client.get(f"/api/v1/explanations/{gradcam.pk}/overlay/")
    assert response.status_code == 404 and "cannot be drawn" in response.json()["detail"]
    gradcam.refresh_from_db()
    assert gradcam.state == Explanation.State.DONE and not gradcam.overlay and gradcam.raw_map is not None


def active_size(explanation: Explanation) -> int:
    return explanation.model_version.input_size
