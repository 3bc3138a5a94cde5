from __future__ import annotations

from django.core.exceptions import ValidationError
from django.db import IntegrityError, transaction

from ..models import AuditEvent, Clinic, Lesion, Patient
from .audit import record_event


def create_patient(*, clinic: Clinic, reference: str, created_by, via: str = "") -> Patient:
    reference = reference.strip()
    patient = Patient(clinic=clinic, reference=reference, created_by=created_by)
    patient.full_clean(exclude=["clinic", "created_by"], validate_unique=False)
    try:
        with transaction.atomic():
            patient.save()
            record_event(actor=created_by, action=AuditEvent.Action.CREATE_PATIENT, obj=patient, via=via)
    except IntegrityError:
        raise ValidationError({"reference": ["A patient with this reference already exists in your clinic."]}) from None
    return patient


def create_lesion(*, patient: Patient, body_site: str, note: str = "", created_by, via: str = "") -> Lesion:
    lesion = Lesion(patient=patient, body_site=body_site, note=note.strip(), created_by=created_by)
    lesion.full_clean(exclude=["patient", "created_by"])
    with transaction.atomic():
        lesion.save()
        record_event(
            actor=created_by, action=AuditEvent.Action.CREATE_LESION, obj=lesion, clinic=patient.clinic, via=via
        )
    return lesion
