"""purge_patient and the retention period: no row and no stored file of the patient is left."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.storage import default_storage
from django.core.management import CommandError, call_command
from django.utils import timezone

from diagnosis.models import AuditEvent, Explanation, Feedback, Lesion, LesionImage, Patient, Prediction, UploadFeatures
from diagnosis.services.explanation_files import render_explanation
from diagnosis.services.feedback import record_outcome
from diagnosis.services.patients import create_lesion, create_patient
from diagnosis.services.predictions import process_image
from diagnosis.services.retention import purge_expired_images
from tests.conftest import lesion_jpeg, upload_file


def scored_image(api_client, lesion, seed, django_capture_on_commit_callbacks) -> LesionImage:
    with django_capture_on_commit_callbacks():
        response = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=seed)),
                                                       "lesion": str(lesion.pk)}, format="multipart")  # fmt: skip
    image_id = response.json()["id"]
    with django_capture_on_commit_callbacks():
        assert process_image(image_id=image_id, worker_id="w") == "done"
    gradcam = Explanation.objects.get(image_id=image_id, method="gradcam")
    assert render_explanation(explanation_id=str(gradcam.pk)) == "done"
    return LesionImage.objects.get(pk=image_id)


def files_of(image: LesionImage) -> list[str]:
    names = [image.file.name]
    for explanation in image.explanations.all():
        names += [f.name for f in (explanation.overlay, explanation.heatmap, explanation.attribution) if f]
    return names


@pytest.fixture
def two_patients(api_client, clinician, active_model, django_capture_on_commit_callbacks, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    clinic = clinician.clinic_membership.clinic
    doomed = create_patient(clinic=clinic, reference="PT-ERASE", created_by=clinician)
    kept = create_patient(clinic=clinic, reference="PT-KEEP", created_by=clinician)
    images = {}
    for patient, seeds in ((doomed, (1, 2)), (kept, (3,))):
        lesion = create_lesion(patient=patient, body_site="back", created_by=clinician)
        images[patient.reference] = [scored_image(api_client, lesion, s, django_capture_on_commit_callbacks)
                                     for s in seeds]  # fmt: skip
    record_outcome(image=images["PT-ERASE"][0], diagnosis="melanoma", recorded_by=clinician)
    return doomed, kept, images


def test_purge_patient_leaves_no_row_and_no_file(two_patients, capsys):
    doomed, kept, images = two_patients
    doomed_files = [name for image in images["PT-ERASE"] for name in files_of(image)]
    kept_files = files_of(images["PT-KEEP"][0])
    assert len(doomed_files) >= 8 and all(default_storage.exists(name) for name in doomed_files + kept_files)
    doomed_ids = [image.pk for image in images["PT-ERASE"]]

    call_command("purge_patient", "PT-ERASE", "--yes")
    assert "Erased patient PT-ERASE: 1 lesions, 2 images" in capsys.readouterr().out

    assert not Patient.objects.filter(pk=doomed.pk).exists()
    assert not Lesion.objects.filter(patient_id=doomed.pk).exists()
    for model in (Prediction, Explanation, Feedback, UploadFeatures):
        assert not model.objects.filter(image_id__in=doomed_ids).exists(), model
    assert not LesionImage.objects.filter(pk__in=doomed_ids).exists()
    assert not any(default_storage.exists(name) for name in doomed_files)
    # The other patient is untouched.
    assert Patient.objects.filter(pk=kept.pk).exists() and LesionImage.objects.filter(lesion__patient=kept).count() == 1
    assert all(default_storage.exists(name) for name in kept_files)
    # Audited, without the reference.
    event = AuditEvent.objects.get(action=AuditEvent.Action.PURGE_PATIENT)
    assert event.object_id == str(doomed.pk) and event.via == "cli"
    assert "PT-ERASE" not in str(AuditEvent.objects.values_list("object_id", "object_type", "actor_username"))


def test_purge_patient_refuses_unknown_or_ambiguous_references(two_patients, other_clinic, clinician):
    with pytest.raises(CommandError, match="No patient has the reference"):
        call_command("purge_patient", "PT-NOBODY", "--yes")
    create_patient(clinic=other_clinic, reference="PT-KEEP", created_by=None)
    with pytest.raises(CommandError, match="name one with --clinic"):
        call_command("purge_patient", "PT-KEEP", "--yes")
    call_command("purge_patient", "PT-KEEP", "--clinic", other_clinic.name, "--yes")
    assert Patient.objects.filter(reference="PT-KEEP").count() == 1  # the first clinic's is still there


def test_purge_patient_asks_before_erasing(two_patients, monkeypatch):
    monkeypatch.setattr("builtins.input", lambda prompt: "n")
    with pytest.raises(CommandError, match="Nothing was erased"):
        call_command("purge_patient", "PT-ERASE")
    assert Patient.objects.filter(reference="PT-ERASE").exists()


def test_images_past_the_retention_period_are_deleted_with_their_files(two_patients, settings):
    _, _, images = two_patients
    old = images["PT-ERASE"][1]
    old_files = files_of(old)
    LesionImage.objects.filter(pk=old.pk).update(created_at=timezone.now() - timedelta(days=40))
    settings.IMAGE_RETENTION_DAYS = 0
    assert purge_expired_images() == {"images": 0, "files": 0}  # 0 keeps everything
    settings.IMAGE_RETENTION_DAYS = 30
    counts = purge_expired_images()
    assert counts["images"] == 1 and counts["files"] == len(old_files)
    assert not LesionImage.objects.filter(pk=old.pk).exists()
    assert not any(default_storage.exists(name) for name in old_files)
    assert LesionImage.objects.count() == 2
    assert AuditEvent.objects.filter(action=AuditEvent.Action.PURGE_EXPIRED).count() == 1


def _files_under(folder: str) -> set[str]:
    from pathlib import Path

    from django.conf import settings

    root = Path(settings.MEDIA_ROOT)
    return {str(path.relative_to(root)) for path in (root / folder).rglob("*") if path.is_file()}


@pytest.mark.django_db(transaction=True)
def test_pictures_drawn_while_the_patient_is_erased_are_not_left_behind(clinician, active_model, settings, monkeypatch):
    # The race: a worker draws a Grad-CAM's pictures while the patient is being erased. The purge locks
    # the rows before it lists the files, so the drawing waits to record its pictures, finds the row
    # gone, and deletes them itself; without the lock they would be recorded in between and left over.
    import threading

    from django.db import connection

    from diagnosis.services import retention
    from diagnosis.services.images import submit_image

    settings.AUTO_EXPLAIN_METHODS = []
    monkeypatch.setattr("diagnosis.services.images.announce_upload", lambda image_id, **_: None)  # no broker
    monkeypatch.setattr("diagnosis.services.explanation_files.enqueue_render", lambda explanation_ids: None)
    clinic = clinician.clinic_membership.clinic
    patient = create_patient(clinic=clinic, reference="PT-RACE", created_by=clinician)
    lesion = create_lesion(patient=patient, body_site="back", created_by=clinician)
    before = _files_under("explanations") | _files_under("images")
    image = submit_image(uploader=clinician, clinic=clinic, lesion=lesion, upload=upload_file(lesion_jpeg(seed=9)))
    assert process_image(image_id=str(image.pk), worker_id="w") == "done"
    gradcam = Explanation.objects.get(image=image, method="gradcam")
    assert gradcam.raw_map is not None and not gradcam.overlay  # its pictures are still to be drawn

    drawn, drawers = [], []

    def draw() -> None:
        try:
            drawn.append(render_explanation(explanation_id=str(gradcam.pk)))
        finally:
            connection.close()

    real = retention._lock_and_list_files

    def list_then_draw(images):
        names = real(images)
        drawer = threading.Thread(target=draw)
        drawer.start()
        drawer.join(timeout=2)  # unlocked, the pictures would be drawn and recorded in this time
        drawers.append(drawer)
        return names

    monkeypatch.setattr(retention, "_lock_and_list_files", list_then_draw)
    counts = retention.purge_patient(patient=patient)
    for drawer in drawers:
        drawer.join(timeout=30)
    assert drawn == ["done"] and counts["images"] == 1
    assert not Explanation.objects.filter(pk=gradcam.pk).exists()
    assert _files_under("explanations") | _files_under("images") == before  # nothing of the patient is left
