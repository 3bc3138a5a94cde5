"""Patients and lesions: pseudonymous references, clinic scoping, 404 for other clinics' objects."""

from __future__ import annotations

from diagnosis.models import AuditEvent, Lesion, Patient
from tests.factories import LesionFactory, PatientFactory


def test_create_and_list_patients(api_client, clinic):
    response = api_client.post("/api/v1/patients/", {"reference": "PT-0042"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["reference"] == "PT-0042" and body["lesion_count"] == 0
    assert Patient.objects.get(pk=body["id"]).clinic == clinic
    listed = api_client.get("/api/v1/patients/").json()["results"]
    assert [p["id"] for p in listed] == [body["id"]]


def test_patient_reference_must_be_pseudonymous_code(api_client):
    response = api_client.post("/api/v1/patients/", {"reference": "Jane Doe"}, format="json")
    assert response.status_code == 400
    assert "real name" in response.json()["errors"]["reference"][0]
    assert api_client.post("/api/v1/patients/", {}, format="json").status_code == 400
    assert Patient.objects.count() == 0


def test_duplicate_reference_in_same_clinic_gets_400(api_client):
    assert api_client.post("/api/v1/patients/", {"reference": "PT-1"}, format="json").status_code == 201
    response = api_client.post("/api/v1/patients/", {"reference": "PT-1"}, format="json")
    assert response.status_code == 400
    assert "already exists" in response.json()["errors"]["reference"][0]


def test_same_reference_allowed_in_another_clinic(api_client, other_api_client):
    assert api_client.post("/api/v1/patients/", {"reference": "PT-1"}, format="json").status_code == 201
    assert other_api_client.post("/api/v1/patients/", {"reference": "PT-1"}, format="json").status_code == 201


def test_patient_search_by_reference_prefix(api_client, clinic):
    PatientFactory(clinic=clinic, reference="ABC-1")
    PatientFactory(clinic=clinic, reference="XYZ-2")
    found = api_client.get("/api/v1/patients/", {"reference": "abc"}).json()["results"]
    assert [p["reference"] for p in found] == ["ABC-1"]


def test_other_clinics_patient_and_lesion_are_404(api_client, other_clinic):
    patient = PatientFactory(clinic=other_clinic)
    lesion = LesionFactory(patient=patient)
    assert api_client.get(f"/api/v1/patients/{patient.pk}/").status_code == 404
    assert api_client.get(f"/api/v1/lesions/{lesion.pk}/").status_code == 404
    assert api_client.get("/api/v1/patients/").json()["results"] == []
    assert api_client.get("/api/v1/lesions/").json()["results"] == []


def test_viewing_a_patient_is_audited(api_client, clinic, clinician):
    patient = PatientFactory(clinic=clinic)
    assert api_client.get(f"/api/v1/patients/{patient.pk}/").status_code == 200
    event = AuditEvent.objects.get(action="view_patient")
    assert event.actor == clinician and event.object_id == str(patient.pk) and event.clinic == clinic


def test_create_lesion_and_list_by_patient(api_client, clinic):
    patient = PatientFactory(clinic=clinic)
    other_patient = PatientFactory(clinic=clinic)
    LesionFactory(patient=other_patient)
    response = api_client.post(
        "/api/v1/lesions/", {"patient": str(patient.pk), "body_site": "back", "note": "left scapula"}, format="json"
    )
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["body_site"] == "back" and body["image_count"] == 0 and body["note"] == "left scapula"
    listed = api_client.get("/api/v1/lesions/", {"patient": str(patient.pk)}).json()["results"]
    assert [lesion["id"] for lesion in listed] == [body["id"]]
    assert api_client.get("/api/v1/lesions/", {"patient": "nope"}).status_code == 400


def test_lesion_for_other_clinics_patient_gets_400(api_client, other_clinic):
    foreign = PatientFactory(clinic=other_clinic)
    response = api_client.post("/api/v1/lesions/", {"patient": str(foreign.pk), "body_site": "back"}, format="json")
    assert response.status_code == 400
    assert "Unknown patient" in response.json()["errors"]["patient"][0]
    assert Lesion.objects.count() == 0


def test_lesion_with_unknown_body_site_gets_400(api_client, clinic):
    patient = PatientFactory(clinic=clinic)
    response = api_client.post("/api/v1/lesions/", {"patient": str(patient.pk), "body_site": "elbow?"}, format="json")
    assert response.status_code == 400
    assert "body_site" in response.json()["errors"]


def test_search_with_control_characters_gets_400(api_client):
    response = api_client.get("/api/v1/patients/", {"reference": "PT\x00"})
    assert response.status_code == 400
    assert "reference" in response.json()["errors"]
