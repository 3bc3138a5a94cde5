"""The clinician portal, page by page, through Django's test client: logins, clinic scoping (another
clinic's objects answer 404), form errors shown on the form, the lesion timeline and its rising
flag, results in words with the disclaimer, feedback, history filters, API tokens, the audit trail,
login throttling with django-axes, and the demo patient.

Images are stored with the real upload service; their predictions are written with the ORM, so no
worker is needed (publishing happens on commit, which a plain `db` test never reaches).
"""

from __future__ import annotations

import html
import io
import re
import uuid
from datetime import timedelta

import pytest
from django.contrib.auth.hashers import make_password
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.test import Client
from django.urls import reverse
from django.utils import timezone
from PIL import Image
from rest_framework.test import APIClient

from diagnosis.models import (
    ApiToken,
    AuditEvent,
    ClinicMembership,
    Explanation,
    Feedback,
    ImageState,
    Lesion,
    LesionImage,
    Patient,
    Prediction,
)
from diagnosis.services.explanations import canonical_key
from diagnosis.services.images import submit_image
from diagnosis.services.tokens import create_api_token
from tests.conftest import lesion_jpeg, stored_image_files, upload_file
from tests.factories import LesionFactory, PatientFactory, UserFactory

DISCLAIMER = "Decision support, not a diagnosis."
NOT_FOUND_TEXT = "There is nothing here, or it belongs to another clinic."
NO_CLINIC_TEXT = "not attached to a clinic"
PASSWORD = "correct-horse-battery"  # tests.factories.UserFactory's password


# --- helpers -------------------------------------------------------------------------------------


def url(name: str, *args) -> str:
    return reverse(name if name in ("login", "logout", "password_change") else f"portal:{name}", args=args)


def text_of(response) -> str:
    """The page as a person reads it: entities decoded, non-breaking spaces as spaces."""
    return html.unescape(response.content.decode()).replace("\xa0", " ")


def jpeg_of(width: int, height: int, color=(180, 120, 90)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def png_of(color=(255, 0, 0, 128), size=(32, 32)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGBA", size, color).save(buffer, format="PNG")
    return buffer.getvalue()


def add_image(
    lesion,
    user,
    *,
    probability: float | None = None,
    model=None,
    threshold: float = 0.5,
    state: str | None = None,
    error: str = "",
    days_ago: float = 0,
    data: bytes | None = None,
) -> LesionImage:
    """An image stored by the upload service, then (optionally) scored with a Prediction row."""
    clinic = lesion.patient.clinic
    image = submit_image(uploader=user, clinic=clinic, upload=upload_file(data or lesion_jpeg(size=64)), lesion=lesion)
    fields = {"created_at": timezone.now() - timedelta(days=days_ago)}
    if probability is not None:
        Prediction.objects.create(
            image=image,
            model_version=model,
            probability_malignant=probability,
            label="malignant" if probability >= threshold else "benign",
            threshold=threshold,
            probabilities={"benign": 1 - probability, "malignant": probability},
        )
        fields.update(state=ImageState.DONE, processed_at=timezone.now())
    elif state is not None:
        fields.update(state=state, error=error)
    LesionImage.objects.filter(pk=image.pk).update(**fields)
    image.refresh_from_db()
    return image


def add_explanation(image, model, *, method: str = "gradcam", state: str = Explanation.State.DONE) -> Explanation:
    """An explanation of the image's prediction; a done one has its overlay and heatmap in storage."""
    prediction = image.predictions.order_by("-created_at").first()
    target_index = list(model.class_names).index(prediction.label)
    files = {}
    if state == Explanation.State.DONE:
        folder = f"explanations/{uuid.uuid4().hex}"
        files["overlay"] = default_storage.save(f"{folder}/overlay.png", ContentFile(png_of((200, 0, 0, 255))))
        files["heatmap"] = default_storage.save(f"{folder}/heatmap.png", ContentFile(png_of((0, 0, 200, 128))))
    return Explanation.objects.create(
        image=image, model_version=model, method=method, params={}, params_key=canonical_key(method, {}, target_index),
        target_index=target_index, target_class=model.class_names[target_index], state=state, **files,
    )  # fmt: skip


def private_no_store(response) -> bool:
    """Browsers and proxies must keep no copy of patient pictures."""
    directives = {part.strip() for part in response["Cache-Control"].split(",")}
    return {"private", "no-store"} <= directives


def portal_events(action: str, **filters):
    return AuditEvent.objects.filter(action=action, via="portal", **filters)


# --- fixtures ------------------------------------------------------------------------------------


@pytest.fixture
def portal(client, clinician):
    client.force_login(clinician)
    return client


@pytest.fixture
def other_portal(client, other_clinician):
    client.force_login(other_clinician)
    return client


@pytest.fixture
def patient(clinic):
    return PatientFactory(clinic=clinic, reference="PT-0001")


@pytest.fixture
def lesion(patient):
    return LesionFactory(patient=patient, note="Irregular border")


@pytest.fixture
def done_image(lesion, clinician, active_model):
    return add_image(lesion, clinician, probability=0.8, model=active_model)


@pytest.fixture
def explanation(done_image, active_model):
    return add_explanation(done_image, active_model)


# --- logins and clinics --------------------------------------------------------------------------


@pytest.fixture
def object_urls(lesion, done_image, explanation):
    """(method, url, data) for every page and action of the portal that touches one clinic's objects."""
    return [
        ("get", url("patient", lesion.patient.pk), None),
        ("post", url("patient", lesion.patient.pk), {"body_site": "face"}),
        ("get", url("lesion", lesion.pk), None),
        ("get", url("lesion", lesion.pk) + "?partial=timeline", None),
        ("post", url("lesion-upload", lesion.pk), {"images": [upload_file(lesion_jpeg(seed=5, size=64))]}),
        ("get", url("lesion-report", lesion.pk), None),
        ("get", url("image", done_image.pk), None),
        ("get", url("image-status", done_image.pk), None),
        ("get", url("image-photo", done_image.pk), None),
        ("get", url("image-photo", done_image.pk) + "?size=thumb", None),
        ("get", url("image-photo", done_image.pk) + "?size=original", None),
        ("post", url("image-explanations", done_image.pk), {"method": "occlusion"}),
        ("post", url("image-feedback", done_image.pk), {"kind": "assessment", "agrees": "yes"}),
        ("post", url("image-feedback", done_image.pk), {"kind": "histopathology", "diagnosis": "melanoma"}),
        ("get", url("explanation-file", explanation.pk, "overlay"), None),
        ("get", url("explanation-file", explanation.pk, "heatmap"), None),
    ]


def test_every_page_sends_anonymous_visitors_to_the_login_page(client, object_urls):
    token, _ = create_api_token(user=UserFactory(), name="someone's")
    pages = [
        *object_urls,
        ("get", url("index"), None),
        ("get", url("patients"), None),
        ("post", url("patients"), {"reference": "PT-0099"}),
        ("get", url("history"), None),
        ("get", url("tokens"), None),
        ("post", url("tokens"), {"name": "EHR", "expires_in_days": "30", "password": PASSWORD}),
        ("post", url("token-revoke", token.token_key), None),
        ("get", url("password_change"), None),
    ]
    images, feedback, explanations = LesionImage.objects.count(), Feedback.objects.count(), Explanation.objects.count()
    for method, address, data in pages:
        response = getattr(client, method)(address, data or {})
        assert response.status_code == 302, (method, address, response.status_code)
        assert response["Location"].startswith(url("login") + "?next="), (method, address, response["Location"])
    # Nothing was created or changed by the refused requests.
    assert Patient.objects.filter(reference="PT-0099").count() == 0
    assert Lesion.objects.count() == 1
    assert (LesionImage.objects.count(), Feedback.objects.count(), Explanation.objects.count()) == (
        images,
        feedback,
        explanations,
    )
    assert ApiToken.objects.filter(pk=token.pk).exists()
    assert not AuditEvent.objects.filter(via="portal").exists()


def test_login_redirect_keeps_the_page_asked_for(client, lesion):
    address = url("lesion", lesion.pk)
    response = client.get(address)
    assert response.status_code == 302
    assert response["Location"] == f"{url('login')}?next={address}"


def test_another_clinic_gets_404_for_every_object(other_portal, other_clinician, object_urls, lesion, done_image):
    lesions, images = Lesion.objects.count(), LesionImage.objects.count()
    for method, address, data in object_urls:
        response = getattr(other_portal, method)(address, data or {})
        assert response.status_code == 404, (method, address, response.status_code)
        assert NOT_FOUND_TEXT in text_of(response), address
    # Nothing of the first clinic was changed, and no file was stored for the refused upload.
    assert (Lesion.objects.count(), LesionImage.objects.count()) == (lesions, images)
    assert len(stored_image_files()) == 1  # done_image's own file only
    assert Feedback.objects.count() == 0
    assert Explanation.objects.filter(image=done_image).count() == 1  # only the fixture's
    assert not AuditEvent.objects.filter(actor=other_clinician).exists()


def test_another_clinic_sees_its_own_patients_only(other_portal, patient, other_clinic):
    PatientFactory(clinic=other_clinic, reference="PT-OTHER")
    page = text_of(other_portal.get(url("patients")))
    assert "PT-OTHER" in page
    assert patient.reference not in page


def test_user_without_a_clinic_gets_the_no_clinic_page(client, lesion, done_image):
    user = UserFactory()
    assert not ClinicMembership.objects.filter(user=user).exists()
    client.force_login(user)
    addresses = [
        url("patients"),
        url("patient", lesion.patient.pk),
        url("lesion", lesion.pk),
        url("lesion-report", lesion.pk),
        url("image", done_image.pk),
        url("image-status", done_image.pk),
        url("image-photo", done_image.pk),
        url("history"),
        url("tokens"),
    ]
    for address in addresses:
        response = client.get(address)
        assert response.status_code == 403, address
        assert NO_CLINIC_TEXT in text_of(response), address
    response = client.post(url("patients"), {"reference": "PT-0100"})
    assert response.status_code == 403
    assert not Patient.objects.filter(reference="PT-0100").exists()
    # The index still requires nothing more than a login and then shows the same page.
    assert client.get(url("index"), follow=True).status_code == 403


# --- patients ------------------------------------------------------------------------------------


def test_index_redirects_to_the_patient_list(portal):
    response = portal.get(url("index"))
    assert response.status_code == 302 and response["Location"] == url("patients")


def test_patient_list_shows_counts_and_searches_by_reference(portal, clinic, lesion, clinician, done_image):
    PatientFactory(clinic=clinic, reference="XY-77")
    response = portal.get(url("patients"))
    assert response.status_code == 200
    page = text_of(response)
    assert "PT-0001" in page and "XY-77" in page
    row = re.search(r"PT-0001</a></td>\s*<td>(\d+)</td>\s*<td>(\d+)</td>", page)
    assert row is not None and row.groups() == ("1", "1")  # one lesion, one image

    found = text_of(portal.get(url("patients"), {"q": "xy"}))
    assert "XY-77" in found and "PT-0001" not in found
    assert "No patient reference contains “nothing”" in text_of(portal.get(url("patients"), {"q": "nothing"}))


def test_patient_list_is_paginated(portal, clinic, settings):
    settings.PORTAL_PAGE_SIZE = 2
    for number, days in ((1, 3), (2, 2), (3, 1)):
        PatientFactory(clinic=clinic, reference=f"PG-{number}", created_at=timezone.now() - timedelta(days=days))
    first = text_of(portal.get(url("patients")))
    assert "PG-3" in first and "PG-2" in first and "PG-1" not in first  # newest first
    assert "Page 1 of 2" in first and 'href="?page=2"' in first
    second = text_of(portal.get(url("patients"), {"page": 2}))
    assert "PG-1" in second and "PG-3" not in second and "Page 2 of 2" in second
    searched = text_of(portal.get(url("patients"), {"q": "PG"}))
    assert 'href="?q=PG&page=2"' in searched  # the search is kept across pages


def test_create_patient_redirects_to_its_page(portal, clinic, clinician):
    response = portal.post(url("patients"), {"reference": " PT-0042 "})
    patient = Patient.objects.get(clinic=clinic, reference="PT-0042")
    assert response.status_code == 302 and response["Location"] == url("patient", patient.pk)
    assert patient.created_by == clinician
    assert portal_events("create_patient", object_id=str(patient.pk), actor=clinician).count() == 1
    page = text_of(portal.get(response["Location"]))
    assert "Patient PT-0042 created." in page


@pytest.mark.parametrize("reference", ["PT 0042", "Jane Doe", ""])
def test_invalid_patient_reference_is_shown_on_the_form(portal, reference):
    response = portal.post(url("patients"), {"reference": reference})
    assert response.status_code == 400
    page = text_of(response)
    expected = "This field is required." if not reference else "no spaces"
    error = rf'<div class="error" id="id_reference_error" role="alert"><p>[^<]*{re.escape(expected)}'
    assert re.search(error, page), page
    assert f'value="{reference}"' in page  # the form keeps what was typed
    assert Patient.objects.count() == 0


def test_duplicate_patient_reference_is_shown_on_the_form(portal, patient, other_clinic):
    response = portal.post(url("patients"), {"reference": patient.reference})
    assert response.status_code == 400
    assert "A patient with this reference already exists in your clinic." in text_of(response)
    assert Patient.objects.filter(reference=patient.reference).count() == 1
    # Another clinic may use the same code for its own patient.
    PatientFactory(clinic=other_clinic, reference="PT-0002")
    assert portal.post(url("patients"), {"reference": "PT-0002"}).status_code == 302
    assert Patient.objects.filter(reference="PT-0002").count() == 2


# --- patient detail and lesions -------------------------------------------------------------------


def test_patient_page_lists_lesions_with_latest_risk(portal, patient, lesion, clinician, active_model):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=30)
    add_image(lesion, clinician, probability=0.45, model=active_model, days_ago=1)
    LesionFactory(patient=patient, body_site="forearm", note="Stable")
    response = portal.get(url("patient", patient.pk))
    assert response.status_code == 200
    page = text_of(response)
    assert "Patient PT-0001" in page and "Back" in page and "Forearm" in page
    assert "45%" in page and "below threshold" in page and "▲ rising" in page
    assert url("lesion", lesion.pk) in page


def test_add_lesion_redirects_to_its_timeline(portal, patient, clinician):
    response = portal.post(url("patient", patient.pk), {"body_site": "forearm", "note": "  New, 4 mm  "})
    lesion = Lesion.objects.get(patient=patient)
    assert response.status_code == 302 and response["Location"] == url("lesion", lesion.pk)
    assert (lesion.body_site, lesion.note, lesion.created_by) == ("forearm", "New, 4 mm", clinician)
    assert portal_events("create_lesion", object_id=str(lesion.pk)).count() == 1
    assert "Lesion on the forearm added." in text_of(portal.get(response["Location"]))


@pytest.mark.parametrize(
    ("body_site", "message"), [("", "This field is required."), ("tail", "Select a valid choice.")]
)
def test_add_lesion_with_a_bad_body_site_is_shown_on_the_form(portal, patient, body_site, message):
    response = portal.post(url("patient", patient.pk), {"body_site": body_site, "note": "kept"})
    assert response.status_code == 400
    page = text_of(response)
    assert message in page
    assert "kept</textarea>" in page
    assert not Lesion.objects.filter(patient=patient).exists()


# --- the lesion timeline --------------------------------------------------------------------------


def timeline_rows(page: str) -> list[str]:
    return re.findall(r'<li class="timeline-item[^"]*".*?</li>', page, flags=re.S)


def test_timeline_flags_a_rise_of_more_than_ten_points(portal, lesion, clinician, active_model):
    first = add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=60)
    second = add_image(lesion, clinician, probability=0.45, model=active_model, days_ago=2)
    response = portal.get(url("lesion", lesion.pk))
    assert response.status_code == 200
    rows = timeline_rows(text_of(response))
    assert len(rows) == 2
    newest, oldest = rows
    assert str(second.pk) in newest and str(first.pk) in oldest  # newest first
    assert 'class="timeline-item flagged"' in newest
    assert '<span class="change flag">▲ +25 pts since previous</span>' in newest
    assert "45%" in newest and "Below referral threshold" in newest
    assert "flagged" not in oldest and "since previous" not in oldest  # nothing to compare with
    assert "more than 10 percentage points" in text_of(response)


def test_timeline_does_not_flag_a_small_rise_or_a_fall(portal, lesion, clinician, active_model):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=60)
    add_image(lesion, clinician, probability=0.25, model=active_model, days_ago=30)
    add_image(lesion, clinician, probability=0.05, model=active_model, days_ago=1)
    rows = timeline_rows(text_of(portal.get(url("lesion", lesion.pk))))
    assert len(rows) == 3
    assert '<span class="change">-20 pts since previous</span>' in rows[0]
    assert '<span class="change">+5 pts since previous</span>' in rows[1]
    assert not any("flagged" in row or "▲" in row for row in rows)


def test_timeline_compares_with_the_previous_scored_image(portal, lesion, clinician, active_model):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=60)
    add_image(lesion, clinician, state=ImageState.FAILED, error="The photo is too blurred.", days_ago=30)
    add_image(lesion, clinician, state=ImageState.QUEUED, days_ago=20)
    add_image(lesion, clinician, probability=0.35, model=active_model, days_ago=1)
    rows = timeline_rows(text_of(portal.get(url("lesion", lesion.pk))))
    assert len(rows) == 4
    assert "▲ +15 pts since previous" in rows[0] and "flagged" in rows[0]
    assert "Queued" in rows[1] and 'data-state="queued"' in rows[1]
    assert "Failed" in rows[2] and "The photo is too blurred." in rows[2]


def test_timeline_flag_follows_the_setting(portal, lesion, clinician, active_model, settings):
    settings.RISK_RISE_FLAG = 0.30
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=60)
    add_image(lesion, clinician, probability=0.45, model=active_model, days_ago=1)
    page = text_of(portal.get(url("lesion", lesion.pk)))
    assert "+25 pts since previous" in page and "flagged" not in page
    assert "more than 30 percentage points" in page


def test_timeline_partial_is_the_fragment_only(portal, lesion, clinician, active_model):
    image = add_image(lesion, clinician, probability=0.3, model=active_model)
    response = portal.get(url("lesion", lesion.pk), {"partial": "timeline"})
    assert response.status_code == 200
    page = text_of(response)
    assert page.lstrip().startswith('<ol class="timeline">')
    assert "<html" not in page and "Add photos" not in page
    assert str(image.pk) in page and "30%" in page
    assert not portal_events("view_lesion").exists()  # polling is not a visit

    empty = LesionFactory(patient=lesion.patient)
    assert "No photos of this lesion yet." in text_of(portal.get(url("lesion", empty.pk), {"partial": "timeline"}))


def test_lesion_page_accepts_only_get(portal, lesion):
    assert portal.post(url("lesion", lesion.pk)).status_code == 405


# --- uploads ---------------------------------------------------------------------------------------


def test_upload_with_script_answers_json_with_the_image_status(portal, lesion, clinician):
    response = portal.post(
        url("lesion-upload", lesion.pk),
        {"images": [upload_file(lesion_jpeg(seed=1, size=80), "Jane Doe.jpg")]},
        headers={"accept": "application/json"},
    )
    assert response.status_code == 202, response.content
    (result,) = response.json()["files"]
    image = LesionImage.objects.get()
    assert result["ok"] is True and result["name"] == "Jane Doe.jpg"
    assert result["id"] == str(image.pk) and result["state"] == "queued" and result["final"] is False
    assert result["result_url"] == url("image", image.pk)
    assert result["status_url"] == url("image-status", image.pk)
    assert result["thumb_url"] == url("image-photo", image.pk) + "?size=thumb"
    assert result["probability"] is None and result["decision"] is None
    assert (image.lesion, image.clinic, image.uploaded_by) == (lesion, lesion.patient.clinic, clinician)
    assert "Jane" not in image.file.name
    assert portal_events("upload_image", object_id=str(image.pk)).count() == 1


def test_upload_of_a_non_image_answers_400_json_and_stores_nothing(portal, lesion):
    response = portal.post(
        url("lesion-upload", lesion.pk),
        {"images": [upload_file(b"name,date of birth\nJane,1970-01-01\n", "notes.csv", "text/csv")]},
        headers={"accept": "application/json"},
    )
    assert response.status_code == 400
    (result,) = response.json()["files"]
    assert result["ok"] is False and result["name"] == "notes.csv" and result["code"]
    assert len(result["error"].split()) >= 3 and result["error"] != result["code"]  # a sentence, not a code
    assert LesionImage.objects.count() == 0
    assert stored_image_files() == []


def test_upload_without_files_answers_400_json(portal, lesion):
    response = portal.post(url("lesion-upload", lesion.pk), {}, headers={"accept": "application/json"})
    assert response.status_code == 400
    assert response.json() == {"error": "Choose at least one image to upload.", "files": []}


def test_upload_without_script_redirects_to_the_lesion_with_a_message_per_file(portal, lesion):
    files = [
        upload_file(lesion_jpeg(seed=1, size=64), "a.jpg"),
        upload_file(lesion_jpeg(seed=2, size=64), "b.jpg"),
        upload_file(b"%PDF-1.4 not a photo", "scan.pdf", "application/pdf"),
    ]
    response = portal.post(url("lesion-upload", lesion.pk), {"images": files})
    assert response.status_code == 302 and response["Location"] == url("lesion", lesion.pk)
    assert LesionImage.objects.filter(lesion=lesion).count() == 2
    page = text_of(portal.get(response["Location"]))
    assert "2 images uploaded; results appear below." in page
    # Named by position, not by file name (a file name may hold a person's name).
    assert re.search(r'<li class="message error">File \d of 3: [A-Z][^<]+</li>', page), page
    assert "scan.pdf" not in page
    assert len(timeline_rows(page)) == 2

    response = portal.post(url("lesion-upload", lesion.pk), {}, follow=True)
    assert "Choose at least one image to upload." in text_of(response)


def test_upload_accepts_only_post(portal, lesion):
    assert portal.get(url("lesion-upload", lesion.pk)).status_code == 405


# --- results in words --------------------------------------------------------------------------


def test_result_page_above_the_threshold(portal, done_image, explanation, active_model):
    response = portal.get(url("image", done_image.pk))
    assert response.status_code == 200
    page = text_of(response)
    assert "<strong>80%</strong>" in page and "(threshold 50%)" in page
    assert "<strong>Above referral threshold</strong>" in page and "Below referral threshold" not in page
    assert "consider specialist review" in page
    assert DISCLAIMER in page and f"Model version {active_model.version}" in page
    assert url("explanation-file", explanation.pk, "heatmap") in page  # Grad-CAM is shown first
    assert "Heatmap of Grad-CAM over the photo" in page
    assert 'value="gradcam"' not in page.split('id="id_method"')[1].split("</select>")[0]  # not offered again


def test_result_page_below_the_threshold(portal, lesion, clinician, active_model):
    image = add_image(lesion, clinician, probability=0.2, model=active_model)
    page = text_of(portal.get(url("image", image.pk)))
    assert "<strong>20%</strong>" in page
    assert "<strong>Below referral threshold</strong>" in page and "Above referral threshold" not in page
    assert "Clinical judgement still applies." in page and DISCLAIMER in page
    assert "The heatmap appears when it is ready." in page  # no explanation yet


def test_result_near_the_threshold_shows_one_decimal(portal, lesion, clinician, active_model):
    image = add_image(lesion, clinician, probability=0.497, model=active_model)
    page = text_of(portal.get(url("image", image.pk)))
    assert "<strong>49.7%</strong>" in page and "(threshold 50.0%)" in page
    assert "<strong>Below referral threshold</strong>" in page


def test_result_just_below_the_threshold_never_looks_equal_to_it(portal, lesion, clinician, active_model):
    """A probability below the threshold must not be printed as the threshold itself ("50.0%" below
    a "50.0%" threshold): the ambiguity the one-decimal rule exists to remove."""
    probability = 0.4996
    image = add_image(lesion, clinician, probability=probability, model=active_model)
    page = text_of(portal.get(url("image", image.pk)))
    assert "<strong>Below referral threshold</strong>" in page
    shown = re.search(r'<span class="label">Malignancy probability</span> <strong>([^<]+)</strong>', page).group(1)
    threshold = re.search(r"\(threshold ([^)]+)\)", page).group(1)
    assert shown != threshold, f"probability {probability} is shown as {shown}, the same as the threshold {threshold}"


def test_result_page_of_a_queued_and_of_a_failed_image(portal, lesion, clinician):
    queued = add_image(lesion, clinician, state=ImageState.QUEUED)
    page = text_of(portal.get(url("image", queued.pk)))
    assert "The result appears here when the model has scored the photo." in page
    assert "referral threshold</strong>" not in page and "Your assessment" not in page
    assert "Histopathology outcome" in page  # an outcome can be recorded whatever the state

    failed = add_image(lesion, clinician, state=ImageState.FAILED, error="The photo is too dark to score.")
    page = text_of(portal.get(url("image", failed.pk)))
    assert "This photo could not be scored." in page and "The photo is too dark to score." in page


def test_report_shows_every_image_in_words_with_the_disclaimer(portal, lesion, clinician, active_model, clinic):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=60)
    high = add_image(lesion, clinician, probability=0.8, model=active_model, days_ago=1)
    add_explanation(high, active_model)
    add_image(lesion, clinician, state=ImageState.QUEUED, days_ago=0)
    response = portal.get(url("lesion-report", lesion.pk))
    assert response.status_code == 200
    page = text_of(response)
    assert "Lesion report" in page and "PT-0001" in page and "Back" in page and clinic.name in page
    assert DISCLAIMER in page
    assert "Above referral threshold" in page and "Below referral threshold" in page
    assert "▲ +60 pts" in page
    assert active_model.version in page and f"by {clinician.username}" in page
    rows = re.findall(r"<tr>\s*<td>.*?</tr>", page.split('<table class="report-table">')[1], flags=re.S)
    assert len(rows) == 3 and "Queued" in rows[0]
    assert page.count('class="report-figure"') == 2  # scored images only
    assert "heatmap: Grad-CAM" in page


# --- image status, photos and explanation files -------------------------------------------------------


def test_status_json_follows_the_image_state(portal, lesion, clinician, done_image, explanation, active_model):
    queued = add_image(lesion, clinician, state=ImageState.QUEUED)
    body = portal.get(url("image-status", queued.pk)).json()
    assert body["state"] == "queued" and body["state_label"] == "Queued" and body["final"] is False
    assert body["probability"] is None and body["explanations"] == []

    failed = add_image(lesion, clinician, state=ImageState.FAILED, error="Unreadable file.")
    body = portal.get(url("image-status", failed.pk)).json()
    assert body["final"] is True and body["error"] == "Unreadable file." and body["decision"] is None

    response = portal.get(url("image-status", done_image.pk))
    assert response.status_code == 200 and response["Content-Type"] == "application/json"
    assert "no-store" in response["Cache-Control"]
    body = response.json()
    assert body["state"] == "done" and body["final"] is True
    assert body["probability"] == pytest.approx(0.8) and body["percent"] == "80%"
    assert body["decision"] == "Above referral threshold" and body["above_threshold"] is True
    assert body["model_version"] == active_model.version
    (payload,) = body["explanations"]
    assert payload["id"] == str(explanation.pk) and payload["state"] == "done" and payload["label"] == "Grad-CAM"
    assert payload["heatmap_url"] == url("explanation-file", explanation.pk, "heatmap")
    assert payload["overlay_url"] == url("explanation-file", explanation.pk, "overlay")


@pytest.fixture
def wide_image(lesion, clinician):
    return add_image(lesion, clinician, state=ImageState.QUEUED, data=jpeg_of(1200, 600))


def photo_of(response) -> Image.Image:
    assert response["Content-Type"] == "image/jpeg"
    assert private_no_store(response) and response["X-Content-Type-Options"] == "nosniff"
    return Image.open(io.BytesIO(response.content))


def test_photo_thumb_and_display_sizes(portal, wide_image):
    thumb = portal.get(url("image-photo", wide_image.pk), {"size": "thumb"})
    assert thumb.status_code == 200
    assert photo_of(thumb).size == (240, 120)
    display = portal.get(url("image-photo", wide_image.pk))
    assert display.status_code == 200
    assert photo_of(display).size == (1024, 512)
    assert portal.get(url("image-photo", wide_image.pk), {"size": "display"}).content == display.content
    assert not portal_events("download_image").exists()  # only the original download is logged


def test_a_preview_is_drawn_once_kept_privately_without_metadata_and_erased_with_its_image(
    portal, lesion, clinician, monkeypatch
):
    from django.core.files.storage import default_storage

    from diagnosis.services import previews
    from diagnosis.services.retention import delete_images

    exif = Image.Exif()
    exif[0x0112] = 6  # turned upright in the preview
    exif[0x010F] = "CameraMaker"
    buffer = io.BytesIO()
    Image.new("RGB", (600, 300), (150, 90, 70)).save(buffer, format="JPEG", exif=exif)
    image = add_image(lesion, clinician, state=ImageState.QUEUED, data=buffer.getvalue())
    drawn = []
    real = previews._draw
    monkeypatch.setattr(previews, "_draw", lambda *args: drawn.append(args[1]) or real(*args))  # counted
    first = portal.get(url("image-photo", image.pk), {"size": "thumb"})
    again = portal.get(url("image-photo", image.pk), {"size": "thumb"})
    assert first.status_code == again.status_code == 200 and first.content == again.content
    assert drawn == ["thumb"]  # the second request read the kept copy
    assert photo_of(again).size == (120, 240) and not photo_of(again).getexif()  # upright, no metadata
    portal.get(url("image-photo", image.pk))
    assert drawn == ["thumb", "display"]
    kept = [previews.preview_name(image.file.name, size) for size in previews.SIZES]
    assert all(name.startswith("previews/") and default_storage.exists(name) for name in kept)
    delete_images(LesionImage.objects.filter(pk=image.pk))
    assert not any(default_storage.exists(name) for name in kept)  # erased with the image


def test_a_preview_drawn_while_its_image_is_erased_is_not_kept(portal, wide_image, monkeypatch):
    from django.core.files.storage import default_storage

    from diagnosis.services import previews

    real = previews._draw

    def draw_then_erase(image, size):  # the purge commits while the preview is being drawn
        data = real(image, size)
        LesionImage.objects.filter(pk=image.pk).delete()
        return data

    monkeypatch.setattr(previews, "_draw", draw_then_erase)
    assert portal.get(url("image-photo", wide_image.pk), {"size": "thumb"}).status_code == 404
    assert not default_storage.exists(previews.preview_name(wide_image.file.name, "thumb"))


def test_photo_original_is_the_stored_file_as_a_download(portal, wide_image, clinician):
    response = portal.get(url("image-photo", wide_image.pk), {"size": "original"})
    assert response.status_code == 200
    body = b"".join(response.streaming_content)
    with wide_image.file.open("rb") as stored:
        assert body == stored.read()
    assert response["Content-Type"] == "image/jpeg" and private_no_store(response)
    assert response["Content-Disposition"] == f'attachment; filename="lesion-image-{wide_image.pk}.jpg"'
    assert portal_events("download_image", object_id=str(wide_image.pk), actor=clinician).count() == 1


def test_photo_with_an_unknown_size_is_a_400(portal, wide_image):
    response = portal.get(url("image-photo", wide_image.pk), {"size": "huge"})
    assert response.status_code == 400
    assert b"size must be thumb, display or original." in response.content


def test_photo_whose_file_is_missing_is_a_404(portal, wide_image):
    default_storage.delete(wide_image.file.name)
    assert portal.get(url("image-photo", wide_image.pk), {"size": "thumb"}).status_code == 404


def test_explanation_files_are_served_privately(portal, explanation, done_image, active_model):
    for kind in ("overlay", "heatmap"):
        response = portal.get(url("explanation-file", explanation.pk, kind))
        assert response.status_code == 200, kind
        assert response["Content-Type"] == "image/png" and private_no_store(response)
        assert response["X-Content-Type-Options"] == "nosniff"
        body = b"".join(response.streaming_content)
        with getattr(explanation, kind).open("rb") as stored:
            assert body == stored.read()
    assert portal.get(url("explanation-file", explanation.pk, "attribution")).status_code == 404
    assert portal.get(url("explanation-file", uuid.uuid4(), "overlay")).status_code == 404
    waiting = add_explanation(done_image, active_model, method="occlusion", state=Explanation.State.QUEUED)
    assert portal.get(url("explanation-file", waiting.pk, "overlay")).status_code == 404


# --- explanations on request ------------------------------------------------------------------------


def test_request_explanation_before_a_prediction_is_a_409_with_a_message(portal, lesion, clinician):
    queued = add_image(lesion, clinician, state=ImageState.QUEUED)
    response = portal.post(
        url("image-explanations", queued.pk), {"method": "occlusion"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 409
    body = response.json()
    assert body["code"] == "no_prediction" and "no prediction yet" in body["error"]
    assert not Explanation.objects.exists()


def test_request_explanation_with_an_unknown_method_is_a_400(portal, done_image):
    response = portal.post(
        url("image-explanations", done_image.pk), {"method": "astrology"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 400
    body = response.json()
    assert body["code"] == "unknown_method" and "Unknown method 'astrology'" in body["error"]
    assert not Explanation.objects.exists()


def test_request_explanation_queues_it(portal, done_image, clinician, active_model):
    response = portal.post(
        url("image-explanations", done_image.pk), {"method": "occlusion"}, headers={"accept": "application/json"}
    )
    assert response.status_code == 202
    explanation = Explanation.objects.get(image=done_image)
    body = response.json()
    assert body["id"] == str(explanation.pk) and body["method"] == "occlusion" and body["label"] == "Occlusion"
    assert body["state"] == "queued" and body["heatmap_url"] is None
    assert (explanation.requested_by, explanation.model_version, explanation.target_class) == (
        clinician,
        active_model,
        "malignant",
    )
    assert portal_events("request_explanation", object_id=str(explanation.pk)).count() == 1

    # Without script the form posts and comes back to the result page with a message.
    response = portal.post(url("image-explanations", done_image.pk), {"method": "lime"})
    assert response.status_code == 302 and response["Location"] == url("image", done_image.pk)
    page = text_of(portal.get(response["Location"]))
    assert "LIME requested; it appears here when ready." in page
    assert "(queued)" in page  # both requests are listed with their state
    response = portal.post(url("image-explanations", done_image.pk), {"method": "nope"}, follow=True)
    assert "Unknown method 'nope'" in text_of(response)


# --- feedback ------------------------------------------------------------------------------------


def test_assessment_is_recorded_and_shown_on_the_timeline(portal, done_image, clinician, lesion):
    response = portal.post(
        url("image-feedback", done_image.pk), {"kind": "assessment", "agrees": "no", "note": " Looks benign "}
    )
    assert response.status_code == 302 and response["Location"] == url("image", done_image.pk) + "#feedback"
    feedback = Feedback.objects.get(image=done_image)
    assert feedback.kind == "assessment" and feedback.agrees is False and feedback.note == "Looks benign"
    assert feedback.recorded_by == clinician
    assert feedback.prediction == done_image.predictions.get()
    assert portal_events("record_feedback", object_id=str(feedback.pk), actor=clinician).count() == 1

    page = text_of(portal.get(url("image", done_image.pk)))
    assert "Your assessment was recorded." in page
    assert "disagrees with the result" in page and "“Looks benign”" in page and clinician.username in page
    timeline = text_of(portal.get(url("lesion", lesion.pk)))
    assert f"Clinician disagreed ({clinician.username}," in timeline


def test_histopathology_outcome_is_recorded_and_shown_on_the_timeline(portal, done_image, clinician, lesion):
    response = portal.post(
        url("image-feedback", done_image.pk), {"kind": "histopathology", "diagnosis": "melanoma", "note": "H-123"}
    )
    assert response.status_code == 302
    feedback = Feedback.objects.get(image=done_image)
    assert (feedback.kind, feedback.diagnosis, feedback.ground_truth) == ("histopathology", "melanoma", "malignant")
    assert feedback.recorded_by == clinician and feedback.note == "H-123"
    assert portal_events("record_feedback", object_id=str(feedback.pk)).count() == 1
    timeline = text_of(portal.get(url("lesion", lesion.pk)))
    assert f"Histopathology: <strong>Melanoma (invasive)</strong> ({clinician.username}," in timeline
    report = text_of(portal.get(url("lesion-report", lesion.pk)))
    assert "Melanoma (invasive)" in report


def test_newest_feedback_of_each_kind_is_shown_on_the_timeline(portal, done_image, lesion):
    portal.post(url("image-feedback", done_image.pk), {"kind": "assessment", "agrees": "no"})
    portal.post(url("image-feedback", done_image.pk), {"kind": "assessment", "agrees": "yes"})
    portal.post(url("image-feedback", done_image.pk), {"kind": "histopathology", "diagnosis": "benign_naevus"})
    assert Feedback.objects.filter(image=done_image).count() == 3  # append-only
    timeline = text_of(portal.get(url("lesion", lesion.pk)))
    assert "Clinician agreed" in timeline and "Clinician disagreed" not in timeline
    assert "Histopathology: <strong>Benign naevus</strong>" in timeline


def test_outcome_can_be_recorded_for_an_image_without_a_result(portal, lesion, clinician):
    failed = add_image(lesion, clinician, state=ImageState.FAILED, error="Too dark.")
    response = portal.post(url("image-feedback", failed.pk), {"kind": "histopathology", "diagnosis": "dermatofibroma"})
    assert response.status_code == 302
    feedback = Feedback.objects.get(image=failed)
    assert feedback.prediction is None and feedback.ground_truth == "benign"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"kind": "assessment"}, "This field is required."),
        ({"kind": "assessment", "agrees": "maybe"}, "Select a valid choice."),
        ({"kind": "histopathology"}, "This field is required."),
        ({"kind": "histopathology", "diagnosis": "nope"}, "Select a valid choice."),
        ({"kind": "histopathology", "diagnosis": "melanoma", "note": "x" * 1001}, "at most 1000 characters"),
    ],
)
def test_invalid_feedback_is_shown_on_the_form(portal, done_image, data, message):
    response = portal.post(url("image-feedback", done_image.pk), data)
    assert response.status_code == 400
    page = text_of(response)
    assert re.search(rf'<div class="error" id="[a-z_]+_error" role="alert"><p>[^<]*{re.escape(message)}', page), message
    assert "<strong>Above referral threshold</strong>" in page  # still the result page
    assert not Feedback.objects.exists()


def test_feedback_of_an_unknown_kind_is_a_400(portal, done_image):
    response = portal.post(url("image-feedback", done_image.pk), {"kind": "gossip"})
    assert response.status_code == 400 and b"Unknown kind of feedback." in response.content
    assert portal.get(url("image-feedback", done_image.pk)).status_code == 405
    assert not Feedback.objects.exists()


# --- history ---------------------------------------------------------------------------------------


@pytest.fixture
def history_images(lesion, clinician, active_model, other_clinic, other_clinician):
    other_lesion = LesionFactory(patient=PatientFactory(clinic=other_clinic))
    return {
        "high": add_image(lesion, clinician, probability=0.9, model=active_model, days_ago=40),
        "low": add_image(lesion, clinician, probability=0.1, model=active_model, days_ago=20),
        "queued": add_image(lesion, clinician, state=ImageState.QUEUED, days_ago=10),
        "failed": add_image(lesion, clinician, state=ImageState.FAILED, error="Too small.", days_ago=1),
        "other": add_image(other_lesion, other_clinician, probability=0.9, model=active_model, days_ago=1),
    }


def listed(response, images: dict) -> set[str]:
    page = response.content.decode()
    return {name for name, image in images.items() if url("image", image.pk) in page}


def test_history_lists_the_clinics_images_newest_first(portal, history_images, clinician):
    response = portal.get(url("history"))
    assert response.status_code == 200
    assert listed(response, history_images) == {"high", "low", "queued", "failed"}
    page = response.content.decode()
    order = [page.index(url("image", history_images[name].pk)) for name in ("failed", "queued", "low", "high")]
    assert order == sorted(order)
    assert "90%" in text_of(response) and "Above referral threshold" in text_of(response)
    assert portal_events("view_history", actor=clinician).count() == 1


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ({"state": "queued"}, {"queued"}),
        ({"state": "failed"}, {"failed"}),
        ({"state": "done"}, {"high", "low"}),
        ({"band": "above"}, {"high"}),
        ({"band": "below"}, {"low"}),
        ({"state": "queued", "band": "above"}, set()),
    ],
)
def test_history_filters_by_state_and_risk(portal, history_images, filters, expected):
    response = portal.get(url("history"), filters)
    assert response.status_code == 200
    assert listed(response, history_images) == expected
    if not expected:
        assert "No images match." in text_of(response)


def test_history_filters_by_date_range(portal, history_images):
    today = timezone.now().date()
    response = portal.get(
        url("history"),
        {"date_from": (today - timedelta(days=25)).isoformat(), "date_to": (today - timedelta(days=5)).isoformat()},
    )
    assert response.status_code == 200
    assert listed(response, history_images) == {"low", "queued"}
    since = portal.get(url("history"), {"date_from": (today - timedelta(days=15)).isoformat()})
    assert listed(since, history_images) == {"queued", "failed"}


def test_history_with_an_inverted_date_range_is_a_400_with_a_message(portal, history_images):
    today = timezone.now().date()
    response = portal.get(url("history"), {"date_from": today.isoformat(), "date_to": "2020-01-01"})
    assert response.status_code == 400
    page = text_of(response)
    assert "The 'From' date is after the 'To' date." in page
    assert listed(response, history_images) == set() and "No images match." in page
    bad = portal.get(url("history"), {"date_from": "yesterday"})
    assert bad.status_code == 400 and "Enter a valid date." in text_of(bad)


def test_history_is_paginated_and_keeps_the_filters(portal, history_images, settings):
    settings.PORTAL_PAGE_SIZE = 2
    first = portal.get(url("history"))
    assert listed(first, history_images) == {"failed", "queued"}
    page = text_of(first)
    assert "Page 1 of 2" in page and 'href="?page=2"' in page
    second = portal.get(url("history"), {"page": 2})
    assert listed(second, history_images) == {"low", "high"} and "Page 2 of 2" in text_of(second)

    filtered = portal.get(url("history"), {"state": "done", "page": 1})
    assert listed(filtered, history_images) == {"low", "high"}
    assert "Page 1 of" not in text_of(filtered)  # one page only
    settings.PORTAL_PAGE_SIZE = 1
    filtered = text_of(portal.get(url("history"), {"state": "done"}))
    assert 'href="?state=done&page=2"' in filtered


# --- API tokens ------------------------------------------------------------------------------------


def test_token_is_created_shown_once_and_listed(portal, clinician):
    response = portal.post(url("tokens"), {"name": "EHR integration", "expires_in_days": "30", "password": PASSWORD})
    assert response.status_code == 200
    page = text_of(response)
    plain = re.search(r'id="new-token" readonly value="([^"]+)"', page).group(1)
    assert plain.startswith("mlt_") and "it is shown only once" in page
    token = ApiToken.objects.get(user=clinician)
    assert token.name == "EHR integration"
    assert timedelta(days=29) < token.expiry - timezone.now() <= timedelta(days=30)
    assert portal_events("create_token", object_id=token.token_key).count() == 1

    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {plain}")
    assert api.get("/api/v1/patients/").status_code == 200  # the shown token is the real one

    listing = text_of(portal.get(url("tokens")))
    assert plain not in listing and "shown only once" not in listing
    assert "EHR integration" in listing and f"<code>{token.token_key}…</code>" in listing


def test_token_with_no_name_is_refused_on_the_form(portal, clinician):
    response = portal.post(url("tokens"), {"name": "  ", "expires_in_days": "30", "password": PASSWORD})
    assert response.status_code == 400
    assert "This field is required." in text_of(response)
    response = portal.post(url("tokens"), {"name": "x", "expires_in_days": "7", "password": PASSWORD})
    assert response.status_code == 400 and "Select a valid choice." in text_of(response)
    assert not ApiToken.objects.filter(user=clinician).exists()


def test_token_is_revoked(portal, clinician):
    token, plain = create_api_token(user=clinician, name="Old system")
    response = portal.post(url("token-revoke", token.token_key))
    assert response.status_code == 302 and response["Location"] == url("tokens")
    assert not ApiToken.objects.filter(pk=token.pk).exists()
    assert portal_events("revoke_token", object_id=token.token_key, actor=clinician).count() == 1
    page = text_of(portal.get(url("tokens")))
    assert "Token 'Old system' revoked." in page and "You have no API tokens." in page
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {plain}")
    assert api.get("/api/v1/patients/").status_code == 401


def test_another_users_token_cannot_be_revoked_or_seen(portal, other_clinician, clinic):
    others, _ = create_api_token(user=other_clinician, name="Their system")
    colleague = UserFactory()
    ClinicMembership.objects.create(user=colleague, clinic=clinic)
    colleagues, _ = create_api_token(user=colleague, name="Colleague's system")
    for token in (others, colleagues):
        assert portal.post(url("token-revoke", token.token_key)).status_code == 404
        assert ApiToken.objects.filter(pk=token.pk).exists()
    page = text_of(portal.get(url("tokens")))
    assert "Their system" not in page and "Colleague's system" not in page
    assert portal.get(url("token-revoke", others.token_key)).status_code == 405


# --- the audit trail --------------------------------------------------------------------------------


def test_portal_views_are_audited(portal, clinician, clinic, lesion, done_image):
    portal.get(url("patient", lesion.patient.pk))
    portal.get(url("lesion", lesion.pk))
    portal.get(url("image", done_image.pk))
    portal.get(url("lesion-report", lesion.pk))
    portal.post(url("image-feedback", done_image.pk), {"kind": "assessment", "agrees": "yes"})
    feedback = Feedback.objects.get()
    expected = {
        "view_patient": ("patient", str(lesion.patient.pk)),
        "view_lesion": ("lesion", str(lesion.pk)),
        "view_image": ("lesionimage", str(done_image.pk)),
        "view_report": ("lesion", str(lesion.pk)),
        "record_feedback": ("feedback", str(feedback.pk)),
    }
    for action, (object_type, object_id) in expected.items():
        (event,) = AuditEvent.objects.filter(action=action)
        assert (event.object_type, event.object_id) == (object_type, object_id), action
        assert event.via == "portal" and event.actor == clinician and event.actor_username == clinician.username
        assert event.clinic == clinic, action
    assert AuditEvent.objects.get(action="view_image").ip_address == "127.0.0.1"

    # Status polling, thumbnails and a refused form are not visits.
    before = AuditEvent.objects.count()
    portal.get(url("image-status", done_image.pk))
    portal.get(url("image-photo", done_image.pk), {"size": "thumb"})
    portal.post(url("patient", lesion.patient.pk), {"body_site": ""})
    assert AuditEvent.objects.count() == before


# --- signing in and out ------------------------------------------------------------------------------


def test_login_and_logout(client, clinician):
    page = client.get(url("login"))
    assert page.status_code == 200 and "Sign in" in text_of(page)
    response = client.post(url("login"), {"username": clinician.username, "password": PASSWORD})
    assert response.status_code == 302 and response["Location"] == url("patients")
    assert client.get(url("patients")).status_code == 200
    # A signed-in user who opens the login page goes to the patients.
    assert client.get(url("login"))["Location"] == url("patients")

    assert client.get(url("logout")).status_code == 405  # logout is a POST (CSRF-protected)
    assert client.get(url("patients")).status_code == 200
    response = client.post(url("logout"))
    assert response.status_code == 302 and response["Location"] == url("login")
    assert client.get(url("patients")).status_code == 302


def test_login_goes_to_the_page_asked_for(client, clinician):
    response = client.post(
        url("login") + "?next=/history/", {"username": clinician.username, "password": PASSWORD, "next": "/history/"}
    )
    assert response.status_code == 302 and response["Location"] == "/history/"
    assert client.post(url("logout")).status_code == 302
    response = client.post(
        url("login"), {"username": clinician.username, "password": PASSWORD, "next": "https://evil.example/"}
    )
    assert response["Location"] == url("patients")  # never to another site


def test_wrong_password_is_refused_with_a_message(client, clinician):
    response = client.post(url("login"), {"username": clinician.username, "password": "wrong-password"})
    assert response.status_code == 200
    assert "The username and password did not match." in text_of(response)
    assert client.get(url("patients")).status_code == 302


def fail_logins(client, username: str, times: int):
    return [client.post(url("login"), {"username": username, "password": "not-it"}) for _ in range(times)]


def test_login_is_locked_after_the_failure_limit(client, clinician, clinic, settings):
    assert settings.AXES_FAILURE_LIMIT == 5
    responses = fail_logins(client, clinician.username, 4)
    assert [r.status_code for r in responses] == [200] * 4
    assert "Sign-in paused" in text_of(fail_logins(client, clinician.username, 1)[0])  # the 5th failure locks

    response = client.post(url("login"), {"username": clinician.username, "password": PASSWORD})
    assert response.status_code == 429
    assert "Sign-in paused" in text_of(response) and "Too many failed sign-in attempts" in text_of(response)
    assert client.get(url("patients")).status_code == 302  # not signed in

    # The lockout is for that username: a colleague can still sign in from the same address.
    colleague = UserFactory()
    ClinicMembership.objects.create(user=colleague, clinic=clinic)
    response = client.post(url("login"), {"username": colleague.username, "password": PASSWORD})
    assert response.status_code == 302 and client.get(url("patients")).status_code == 200


def test_a_success_before_the_limit_resets_the_count(client, clinician):
    fail_logins(client, clinician.username, 4)
    assert client.post(url("login"), {"username": clinician.username, "password": PASSWORD}).status_code == 302
    client.post(url("logout"))
    assert [r.status_code for r in fail_logins(client, clinician.username, 4)] == [200] * 4
    assert client.post(url("login"), {"username": clinician.username, "password": PASSWORD}).status_code == 302


def test_lockout_page_says_how_long_to_wait_in_words(client, clinician):
    """The wait is shown to people: "15 minutes", not django-axes' ISO 8601 duration "PT15M"."""
    response = fail_logins(client, clinician.username, 5)[-1]
    page = re.sub(r"\s+", " ", text_of(response))
    assert "Sign-in paused" in page
    assert "PT15M" not in page, re.search(r"Wait [^.]*", page).group(0)
    assert re.search(r"15 minutes", page)


def test_login_page_states_the_configured_failure_limit(client, clinician, settings):
    settings.AXES_FAILURE_LIMIT = 3
    page = text_of(client.get(url("login")))
    assert "After 3 failed attempts" in page, re.search(r"After \S+ failed attempts", page).group(0)
    fail_logins(client, clinician.username, 3)
    assert client.post(url("login"), {"username": clinician.username, "password": PASSWORD}).status_code == 429


# --- behind the TLS proxy: the client's address ------------------------------------------------------------

PROXY = "10.0.0.2"  # REMOTE_ADDR of every request that comes through the reverse proxy


def via_proxy(client_address: str, spoofed: str = "") -> dict:
    """What the proxy (nginx: proxy_add_x_forwarded_for) hands gunicorn for a client at client_address."""
    forwarded = f"{spoofed}, {client_address}" if spoofed else client_address
    return {"REMOTE_ADDR": PROXY, "HTTP_X_FORWARDED_FOR": forwarded}


def test_behind_a_trusted_proxy_a_lockout_is_keyed_by_the_real_client(client, clinician, settings):
    settings.TRUSTED_PROXY_COUNT = 1
    attacker = Client()
    for _ in range(5):  # the attacker even writes the victim's address into the header: ignored
        attacker.post(url("login"), {"username": clinician.username, "password": "wrong"},
                      **via_proxy("203.0.113.5", spoofed="198.51.100.7"))  # fmt: skip
    locked = attacker.post(url("login"), {"username": clinician.username, "password": PASSWORD},
                           **via_proxy("203.0.113.5"))  # fmt: skip
    assert locked.status_code == 429
    own = client.post(url("login"), {"username": clinician.username, "password": PASSWORD},
                      **via_proxy("198.51.100.7"))  # fmt: skip
    assert own.status_code == 302  # the clinician, from their own address, is not locked out


def test_without_a_trusted_proxy_the_forwarded_header_is_ignored(client, clinician, settings):
    settings.TRUSTED_PROXY_COUNT = 0
    for address in ("203.0.113.5", "203.0.113.6", "203.0.113.7", "203.0.113.8", "203.0.113.9"):
        Client().post(url("login"), {"username": clinician.username, "password": "wrong"}, **via_proxy(address))
    # One address (the proxy's) for everyone: the header cannot be used to dodge the lockout.
    assert client.post(url("login"), {"username": clinician.username, "password": PASSWORD},
                       **via_proxy("198.51.100.7")).status_code == 429  # fmt: skip


def test_the_audit_log_records_the_client_behind_the_proxy(portal, clinic, settings):
    from diagnosis.models import AuditEvent

    settings.TRUSTED_PROXY_COUNT = 1
    patient = PatientFactory(clinic=clinic)
    assert portal.get(url("patient", patient.pk), **via_proxy("198.51.100.7", spoofed="192.0.2.1")).status_code == 200
    event = AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_PATIENT).latest("at")
    assert event.ip_address == "198.51.100.7"


# --- password change -----------------------------------------------------------------------------------


def test_password_change_requires_a_login(client):
    response = client.get(url("password_change"))
    assert response.status_code == 302 and response["Location"].startswith(url("login") + "?next=")


def test_creating_a_token_asks_for_the_password_again(portal, clinician):
    from diagnosis.models import ApiToken

    for data in (
        {"name": "EHR", "expires_in_days": "30"},
        {"name": "EHR", "expires_in_days": "30", "password": "guess"},
    ):
        response = portal.post(url("tokens"), data)
        assert response.status_code == 400
    assert "That is not your password." in text_of(response)
    assert not ApiToken.objects.filter(user=clinician).exists()
    created = portal.post(url("tokens"), {"name": "EHR", "expires_in_days": "30", "password": PASSWORD})
    assert created.status_code == 200 and ApiToken.objects.filter(user=clinician).count() == 1


def test_guessing_the_password_on_the_token_page_locks_the_account_out(portal, clinician, settings):
    """A stolen session must not be able to try passwords there at will: wrong ones count like failed
    sign-ins (django-axes), and after the limit even the right one is refused."""
    from diagnosis.models import ApiToken

    settings.AXES_FAILURE_LIMIT = 3
    for guess in ("one", "two", "three"):
        portal.post(url("tokens"), {"name": "EHR", "expires_in_days": "30", "password": guess})
    right = portal.post(url("tokens"), {"name": "EHR", "expires_in_days": "30", "password": PASSWORD})
    assert right.status_code in (400, 429)
    assert not ApiToken.objects.filter(user=clinician).exists()


def test_a_password_change_revokes_every_token_of_the_user(client, clinician, settings):
    from rest_framework.test import APIClient

    from diagnosis.models import ApiToken, AuditEvent
    from diagnosis.services.tokens import create_api_token

    _, plain = create_api_token(user=clinician, name="minted by a stolen session")
    _, second = create_api_token(user=clinician, name="EHR")
    api = APIClient()
    api.credentials(HTTP_AUTHORIZATION=f"Token {plain}")
    assert api.get("/api/v1/patients/").status_code == 200
    client.force_login(clinician)
    new = "Lesion-Triage-2024-new"
    client.post(url("password_change"), {"old_password": PASSWORD, "new_password1": new, "new_password2": new})
    assert "Your API tokens have been revoked" in text_of(client.get("/accounts/password/done/"))
    assert api.get("/api/v1/patients/").status_code == 401
    assert not ApiToken.objects.filter(user=clinician).exists()
    revoked = AuditEvent.objects.filter(action=AuditEvent.Action.REVOKE_TOKEN, via="password_change")
    assert revoked.count() == 2
    # Any way the password changes (the admin, a reset, changepassword all end in set_password and save).
    create_api_token(user=clinician, name="after")
    clinician.set_password("Another-long-Passw0rd")
    clinician.save()
    assert not ApiToken.objects.filter(user=clinician).exists()
    # A hash upgrade on sign-in is no password change: the tokens stay.
    settings.PASSWORD_HASHERS = ["django.contrib.auth.hashers.PBKDF2PasswordHasher",
                                 "django.contrib.auth.hashers.MD5PasswordHasher"]  # fmt: skip
    create_api_token(user=clinician, name="kept")
    clinician.password = make_password("Another-long-Passw0rd", hasher="md5")
    clinician.save()
    assert clinician.check_password("Another-long-Passw0rd")  # Django re-hashes it with the default hasher
    clinician.refresh_from_db()
    assert clinician.password.startswith("pbkdf2_")
    assert ApiToken.objects.filter(user=clinician, name="kept").exists()


def test_password_change_changes_the_password(client, clinician):
    client.force_login(clinician)
    page = client.get(url("password_change"))
    assert page.status_code == 200 and "Change password" in text_of(page)
    new = "Lesion-Triage-2024-new"
    response = client.post(
        url("password_change"), {"old_password": PASSWORD, "new_password1": new, "new_password2": new}
    )
    assert response.status_code == 302 and response["Location"] == "/accounts/password/done/"
    assert "Your new password is in use." in text_of(client.get(response["Location"]))
    clinician.refresh_from_db()
    assert clinician.check_password(new) and not clinician.check_password(PASSWORD)
    assert client.get(url("patients")).status_code == 200  # still signed in

    client.post(url("logout"))
    assert client.post(url("login"), {"username": clinician.username, "password": PASSWORD}).status_code == 200
    assert client.post(url("login"), {"username": clinician.username, "password": new}).status_code == 302


def test_password_change_refuses_a_wrong_old_password_or_a_weak_new_one(client, clinician):
    client.force_login(clinician)
    response = client.post(
        url("password_change"),
        {"old_password": "nope", "new_password1": "Abc-12345-xyz", "new_password2": "Abc-12345-xyz"},
    )
    assert response.status_code == 200 and "Your old password was entered incorrectly." in text_of(response)
    response = client.post(
        url("password_change"), {"old_password": PASSWORD, "new_password1": "short", "new_password2": "short"}
    )
    assert response.status_code == 200 and "This password is too short." in text_of(response)
    clinician.refresh_from_db()
    assert clinician.check_password(PASSWORD)


# --- the demo patient ------------------------------------------------------------------------------


def test_demo_patient_is_seeded_once(portal, clinic, clinician, django_capture_on_commit_callbacks):
    from diagnosis.services.demo import DEMO_PATIENT, ensure_demo_patient

    logged = []
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert ensure_demo_patient(clinic=clinic, clinician=clinician, log=logged.append) is True
    assert len(callbacks) == 4  # one prediction task per photo, published once the rows commit
    patient = Patient.objects.get(clinic=clinic, reference=DEMO_PATIENT)
    assert DEMO_PATIENT == "DEMO-0001"
    lesions = {lesion.body_site: lesion for lesion in patient.lesions.all()}
    assert set(lesions) == {"back", "forearm"}
    images = LesionImage.objects.filter(lesion__patient=patient)
    assert images.count() == 4 and set(images.values_list("state", flat=True)) == {"queued"}
    assert lesions["back"].images.count() == 3 and lesions["forearm"].images.count() == 1
    ages = sorted((timezone.now() - image.created_at).days for image in lesions["back"].images.all())
    assert ages == [3, 90, 180]
    assert len(stored_image_files()) == 4
    assert logged and "DEMO-0001" in logged[0]

    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        assert ensure_demo_patient(clinic=clinic, clinician=clinician, log=logged.append) is False
    assert callbacks == [] and LesionImage.objects.count() == 4 and Patient.objects.count() == 1

    page = text_of(portal.get(url("patients")))
    assert re.search(r"DEMO-0001</a></td>\s*<td>2</td>\s*<td>4</td>", page)
    back = text_of(portal.get(url("lesion", lesions["back"].pk)))
    assert len(timeline_rows(back)) == 3 and back.count('data-state="queued"') == 3


def test_photo_is_shown_upright_and_transparency_white_as_the_model_saw_it(portal, lesion, clinician):
    # Stored as the client's own pixels (prepare_upload) with an orientation tag: the portal turns it.
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.new("RGB", (400, 200), (200, 150, 120)).save(buffer, format="JPEG", exif=exif)
    rotated = add_image(lesion, clinician, state=ImageState.QUEUED, data=buffer.getvalue())
    assert (rotated.width, rotated.height) == (200, 400)
    assert photo_of(portal.get(url("image-photo", rotated.pk), {"size": "thumb"})).size == (120, 240)

    rgba = Image.new("RGBA", (100, 100), (120, 120, 120, 0))  # fully transparent grey
    buffer = io.BytesIO()
    rgba.save(buffer, format="PNG")
    transparent = add_image(lesion, clinician, state=ImageState.QUEUED, data=buffer.getvalue())
    shown = photo_of(portal.get(url("image-photo", transparent.pk), {"size": "thumb"})).convert("RGB")
    assert min(shown.getpixel((50, 50))) >= 250  # white, not the hidden grey


# --- the photo-quality gate (issue 20): uncertain and not assessable, in words -----------------------

BLUR_REASON = "out of focus: hold the camera 10–15 cm away, keep it still and tap the lesion to focus"
SMALL_REASON = "the lesion is too small in the frame: move closer so it fills about a third of it"
NOT_ASSESSABLE = "Not assessable: take another photo"
UNCERTAIN = "Uncertain: specialist review recommended"


def add_gated_image(lesion, user, model, *, decision: str, probability: float, days_ago: float = 0,
                    reasons=(BLUR_REASON,)) -> LesionImage:  # fmt: skip
    """An image scored through the quality gate: its prediction carries the gate's decision and report."""
    image = add_image(lesion, user, probability=probability, model=model, days_ago=days_ago)
    refused = decision == "not_assessable"
    quality = {"gate": "strict", "checks": [], "reasons": list(reasons) if refused else [], "warnings": [],
               "ood": {"score": 1.0, "threshold": 3.0, "passed": True}, "band": [0.4, 0.55], "augmented": [],
               "note": ""}  # fmt: skip
    if decision == "uncertain":
        quality["advice"] = "uncertain: specialist review recommended"
    Prediction.objects.filter(image=image).update(decision=decision, assessable=not refused, quality=quality,
                                                  ood_score=1.0)  # fmt: skip
    return LesionImage.objects.get(pk=image.pk)


def rows_of(page: str) -> list[str]:
    """The timeline's items, newest first (an item holds lists of its own, so split rather than match)."""
    return page.split('<li class="timeline-item')[1:]


@pytest.fixture
def refused_image(lesion, clinician, active_model):
    return add_gated_image(lesion, clinician, active_model, decision="not_assessable", probability=0.93,
                           reasons=(BLUR_REASON, SMALL_REASON))  # fmt: skip


@pytest.fixture
def uncertain_image(lesion, clinician, active_model):
    return add_gated_image(lesion, clinician, active_model, decision="uncertain", probability=0.48)


def test_status_json_of_a_refused_photo_gives_its_reasons_and_no_risk(portal, refused_image, active_model):
    add_explanation(refused_image, active_model)  # a heatmap of a risk that is not shown is not offered either
    body = portal.get(url("image-status", refused_image.pk)).json()
    assert body["state"] == "done" and body["final"] is True
    assert body["decision"] == NOT_ASSESSABLE and body["decision_code"] == "not_assessable"
    assert body["summary"] == NOT_ASSESSABLE and body["assessable"] is False
    assert body["reasons"] == [BLUR_REASON, SMALL_REASON]
    assert "take another photo" in body["advice"].lower()
    assert body["probability"] is None and body["percent"] is None and body["above_threshold"] is None
    assert body["photo_fine_url"] == url("image-photo-fine", refused_image.pk)
    assert body["explanations"] == []
    assert "93%" not in repr(body) and 0.93 not in body.values()


def test_status_json_of_an_uncertain_photo_says_so_with_its_probability(portal, uncertain_image, done_image):
    body = portal.get(url("image-status", uncertain_image.pk)).json()
    assert body["decision"] == UNCERTAIN and body["decision_code"] == "uncertain" and body["assessable"] is True
    assert body["summary"] == "Uncertain (48%): specialist review recommended"
    assert body["percent"] == "48%" and body["probability"] == pytest.approx(0.48)
    assert body["reasons"] == [] and body["photo_fine_url"] is None
    assert "specialist" in body["advice"]
    # a result of a model without a gate: as before, with its code
    body = portal.get(url("image-status", done_image.pk)).json()
    assert body["decision_code"] == "above_threshold" and body["summary"] == "80% · Above referral threshold"
    assert body["assessable"] is True and body["photo_fine_url"] is None


def test_timeline_shows_not_assessable_and_uncertain_in_words_and_skips_the_refused_photo_in_the_change(
    portal, lesion, clinician, active_model
):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=30)  # stored before the gate
    add_gated_image(lesion, clinician, active_model, decision="not_assessable", probability=0.93, days_ago=10)
    add_gated_image(lesion, clinician, active_model, decision="uncertain", probability=0.48, days_ago=5)
    add_gated_image(lesion, clinician, active_model, decision="below_threshold", probability=0.35, days_ago=1)
    for address in (url("lesion", lesion.pk), url("lesion", lesion.pk) + "?partial=timeline"):
        page = text_of(portal.get(address))
        below, uncertain, refused, legacy = rows_of(page)
        assert "35%" in below and "Below referral threshold" in below and "-13 pts since previous" in below
        assert "Uncertain (48%)</span>: specialist review recommended" in uncertain
        assert "+28 pts since previous" in uncertain  # from the 20% before the refused photo, not from it
        assert "Not assessable</span>: take another photo" in refused
        assert "Out of focus: hold the camera" in refused
        assert "Take another photo" in refused and "This photo was fine" in refused
        assert "%" not in refused and "since previous" not in refused and "▲" not in refused
        assert "20%" in legacy and "Below referral threshold" in legacy
        assert "93%" not in page


def test_lesion_page_offers_the_camera_for_another_photo(portal, lesion):
    page = portal.get(url("lesion", lesion.pk)).content.decode()
    assert re.search(r'<input type="file" name="images" id="id_camera" accept="image/\*" capture="environment"', page)
    assert '<label for="id_camera" class="button">Take a photo</label>' in page
    assert 'id="add-photos"' in page


def test_result_page_of_a_refused_photo_shows_the_reasons_and_no_risk(portal, refused_image, active_model, lesion):
    add_explanation(refused_image, active_model)
    response = portal.get(url("image", refused_image.pk))
    assert response.status_code == 200
    page = text_of(response)
    assert f"<strong>{NOT_ASSESSABLE}</strong>" in page
    assert "Out of focus: hold the camera" in page and "The lesion is too small in the frame" in page
    assert f'href="{url("lesion", lesion.pk)}?retake={refused_image.pk}#add-photos">Take another photo</a>' in page
    assert f'action="{url("image-photo-fine", refused_image.pk)}"' in page and "This photo was fine" in page
    assert "93%" not in page and "Malignancy probability" not in page and "referral threshold</strong>" not in page
    assert "Your assessment" not in page and "heatmap-layer" not in page
    assert "Histopathology outcome" in page and DISCLAIMER in page


def test_result_page_of_an_uncertain_photo_says_uncertain_beside_its_probability(portal, uncertain_image):
    page = text_of(portal.get(url("image", uncertain_image.pk)))
    assert "<strong>Uncertain (48%)</strong>" in page and f"<strong>{UNCERTAIN}</strong>" in page
    assert "a specialist should review this lesion" in page
    assert "This photo was fine" not in page and "Your assessment" in page


def test_result_page_of_a_prediction_stored_before_the_gate_is_as_before(portal, done_image):
    page = text_of(portal.get(url("image", done_image.pk)))
    assert "<strong>80%</strong>" in page and "<strong>Above referral threshold</strong>" in page
    assert "Uncertain" not in page and "Not assessable" not in page and "Stored before" not in page
    assert "This photo was fine" not in page


def test_report_shows_not_assessable_and_uncertain_in_words(portal, lesion, clinician, active_model):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=30)
    add_gated_image(lesion, clinician, active_model, decision="not_assessable", probability=0.93, days_ago=10)
    add_gated_image(lesion, clinician, active_model, decision="uncertain", probability=0.48, days_ago=5)
    page = text_of(portal.get(url("lesion-report", lesion.pk)))
    rows = re.findall(r"<tr>\s*<td>.*?</tr>", page.split('<table class="report-table">')[1], flags=re.S)
    uncertain, refused, legacy = rows
    assert "<td>Uncertain (48%)</td>" in uncertain and UNCERTAIN in uncertain and "+28 pts" in uncertain
    assert "<td>Not assessable</td>" in refused and NOT_ASSESSABLE in refused and BLUR_REASON in refused
    assert "%" not in refused and "pts" not in refused
    assert "<td>20%</td>" in legacy
    assert page.count('class="report-figure"') == 2  # the refused photo is not pictured with a risk
    assert "93%" not in page


def test_history_shows_and_filters_the_gates_decisions(portal, lesion, clinician, active_model):
    images = {
        "high": add_image(lesion, clinician, probability=0.9, model=active_model, days_ago=3),
        "refused": add_gated_image(lesion, clinician, active_model, decision="not_assessable", probability=0.93),
        "uncertain": add_gated_image(lesion, clinician, active_model, decision="uncertain", probability=0.52),
        "low": add_gated_image(lesion, clinician, active_model, decision="below_threshold", probability=0.1),
    }
    page = text_of(portal.get(url("history")))
    assert "Not assessable</span>: take another photo" in page and "93%" not in page
    assert "Uncertain (52%)</span>: specialist review recommended" in page
    for band, expected in (("above", {"high"}), ("below", {"low"}), ("uncertain", {"uncertain"}),
                           ("not_assessable", {"refused"})):  # fmt: skip
        assert listed(portal.get(url("history"), {"band": band}), images) == expected, band


def test_patient_page_shows_the_latest_assessable_risk(portal, lesion, clinician, active_model):
    add_image(lesion, clinician, probability=0.2, model=active_model, days_ago=30)
    add_gated_image(lesion, clinician, active_model, decision="not_assessable", probability=0.93, days_ago=1)
    page = text_of(portal.get(url("patient", lesion.patient.pk)))
    assert "20%" in page and "93%" not in page


def test_this_photo_was_fine_is_recorded_with_a_confirmation(portal, refused_image, clinician, clinic):
    response = portal.post(url("image-photo-fine", refused_image.pk), {"note": "Sharp on my screen"}, follow=True)
    assert response.redirect_chain == [(url("image", refused_image.pk) + "#result", 302)]
    page = text_of(response)
    assert "your word that this photo was fine was recorded" in page
    assert f"Marked as fine by {clinician.username}" in page and "This photo was fine</button>" not in page
    feedback = Feedback.objects.get(image=refused_image)
    assert feedback.kind == Feedback.Kind.PHOTO and feedback.agrees is False  # the gate was wrong
    assert feedback.note == "Sharp on my screen" and feedback.recorded_by == clinician
    assert feedback.prediction == refused_image.predictions.get()
    assert portal_events("record_feedback", object_id=str(feedback.pk), clinic=clinic).count() == 1
    timeline = text_of(portal.get(url("lesion", refused_image.lesion_id)))
    assert f"Marked as fine by {clinician.username}." in timeline and "This photo was fine</button>" not in timeline


def test_this_photo_was_fine_answers_the_script_in_json_and_goes_back_to_a_page_of_this_site(portal, refused_image):
    response = portal.post(url("image-photo-fine", refused_image.pk), headers={"accept": "application/json"})
    assert response.status_code == 201 and response.json()["ok"] is True
    assert "recorded" in response.json()["message"]
    lesion_page = url("lesion", refused_image.lesion_id)
    assert portal.post(url("image-photo-fine", refused_image.pk), {"next": lesion_page})["Location"] == lesion_page
    elsewhere = portal.post(url("image-photo-fine", refused_image.pk), {"next": "https://evil.example/"})
    assert elsewhere["Location"] == url("image", refused_image.pk) + "#result"
    assert Feedback.objects.filter(image=refused_image, kind=Feedback.Kind.PHOTO).count() == 3


def test_this_photo_was_fine_is_only_for_a_refused_photo_of_ones_own_clinic_and_by_post(
    client, portal, other_portal, refused_image, done_image
):
    address = url("image-photo-fine", refused_image.pk)
    assert other_portal.post(address).status_code == 404  # another clinic's photo
    portal.force_login(refused_image.uploaded_by)
    assert portal.get(address).status_code == 405
    response = portal.post(url("image-photo-fine", done_image.pk), headers={"accept": "application/json"})
    assert response.status_code == 400 and "refused" in response.json()["error"]
    queued = add_image(refused_image.lesion, refused_image.uploaded_by, state=ImageState.QUEUED)
    assert portal.post(url("image-photo-fine", queued.pk), headers={"accept": "application/json"}).status_code == 400
    assert not Feedback.objects.exists()
    client.logout()
    assert client.post(address).status_code == 302  # to the login page
    assert not Feedback.objects.exists()
