from __future__ import annotations

from ..models import DISCLAIMER
from ..services.clinics import clinic_of


def portal(request) -> dict:
    user = getattr(request, "user", None)
    return {"disclaimer": DISCLAIMER, "portal_clinic": clinic_of(user) if user is not None else None}
