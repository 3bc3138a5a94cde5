"""Stored files are served by one implementation (diagnosis.services.files) for the API and the portal:
the same bytes, types, names and caching rules; 404s for another clinic, an unfinished explanation or a
missing file, with nothing audited; and the audit record where fetching is a visit of its own."""

from __future__ import annotations

import pytest
from django.core.files.storage import default_storage
from django.urls import reverse

from diagnosis.models import AuditEvent, Explanation
from tests.factories import LesionFactory, PatientFactory
from tests.test_portal_views import add_explanation, add_image


@pytest.fixture
def explanation(clinic, clinician, active_model):
    lesion = LesionFactory(patient=PatientFactory(clinic=clinic, reference="PT-0301"))
    image = add_image(lesion, clinician, probability=0.8, model=active_model)
    return add_explanation(image, active_model)


@pytest.fixture
def portal(client, clinician):
    client.force_login(clinician)
    return client


def api_url(explanation, kind: str) -> str:
    return f"/api/v1/explanations/{explanation.pk}/{kind}/"


def portal_url(explanation, kind: str) -> str:
    return reverse("portal:explanation-file", args=[explanation.pk, kind])


def body(response) -> bytes:
    return b"".join(response.streaming_content)


@pytest.mark.parametrize("kind", ["overlay", "heatmap"])
def test_the_api_and_the_portal_serve_the_same_picture_the_same_way(api_client, portal, explanation, kind):
    from_api, from_portal = api_client.get(api_url(explanation, kind)), portal.get(portal_url(explanation, kind))
    assert from_api.status_code == from_portal.status_code == 200
    assert body(from_api) == body(from_portal) == default_storage.open(getattr(explanation, kind).name).read()
    for header in ("Content-Type", "Content-Disposition", "X-Content-Type-Options"):
        assert from_api[header] == from_portal[header], header
    assert from_api["Content-Type"] == "image/png" and from_api["X-Content-Type-Options"] == "nosniff"
    assert from_api["Content-Disposition"] == f'inline; filename="gradcam-{explanation.pk}-{kind}.png"'
    for response in (from_api, from_portal):
        assert {"private", "no-store"} <= {part.strip() for part in response["Cache-Control"].split(",")}


def test_an_api_fetch_is_audited_and_a_portal_picture_is_part_of_its_audited_page(
    api_client, portal, explanation, clinic, clinician
):
    views = AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_EXPLANATION, object_id=str(explanation.pk))
    assert portal.get(portal_url(explanation, "overlay")).status_code == 200
    assert not views.exists()
    assert api_client.get(api_url(explanation, "overlay")).status_code == 200
    (event,) = views
    assert (event.actor, event.clinic, event.via) == (clinician, clinic, "api")


def test_an_unfinished_explanation_has_no_files_in_either(api_client, portal, explanation):
    Explanation.objects.filter(pk=explanation.pk).update(state=Explanation.State.PROCESSING)
    refused = api_client.get(api_url(explanation, "overlay"))
    assert refused.status_code == 404 and "no files yet" in refused.json()["detail"]
    assert portal.get(portal_url(explanation, "overlay")).status_code == 404
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_EXPLANATION).exists()


def test_a_missing_file_is_a_404_in_either_and_nothing_is_audited(api_client, portal, explanation):
    default_storage.delete(explanation.heatmap.name)
    refused = api_client.get(api_url(explanation, "heatmap"))
    assert refused.status_code == 404 and "missing" in refused.json()["detail"]
    assert portal.get(portal_url(explanation, "heatmap")).status_code == 404
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_EXPLANATION).exists()


def test_another_clinic_gets_404_from_either(other_api_client, client, other_clinician, explanation):
    client.force_login(other_clinician)
    assert other_api_client.get(api_url(explanation, "overlay")).status_code == 404
    assert client.get(portal_url(explanation, "overlay")).status_code == 404
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_EXPLANATION).exists()
