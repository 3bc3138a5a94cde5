from __future__ import annotations

from django.contrib.auth import get_user_model
from django.db import transaction

from ..models import Clinic, ClinicMembership


def clinic_of(user) -> Clinic | None:
    """The clinic whose data this user may see, or None (anonymous, or staff without a clinic)."""
    if user is None or not getattr(user, "is_authenticated", False):
        return None
    cached = getattr(user, "_clinic_cache", None)
    if cached is not None:
        return cached
    membership = ClinicMembership.objects.select_related("clinic").filter(user=user).first()
    clinic = membership.clinic if membership else None
    user._clinic_cache = clinic
    return clinic


@transaction.atomic
def create_clinician(
    *, clinic: Clinic, username: str, password: str | None, email: str = "", role: str = ClinicMembership.Role.CLINICIAN
):
    user_model = get_user_model()
    user = user_model.objects.create_user(username=username, email=email, password=password)
    ClinicMembership.objects.create(user=user, clinic=clinic, role=role)
    return user
