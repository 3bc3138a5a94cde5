from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction

from ..models import Clinic, ClinicMembership, clinic_of

__all__ = ["clinic_of", "create_clinician"]


@transaction.atomic
def create_clinician(
    *, clinic: Clinic, username: str, password: str | None, email: str = "", role: str = ClinicMembership.Role.CLINICIAN
):
    user_model = get_user_model()
    user = user_model.objects.create_user(username=username, email=email, password=password)
    ClinicMembership.objects.create(user=user, clinic=clinic, role=role)
    return user
