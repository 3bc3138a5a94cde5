from __future__ import annotations

from ..models import DISCLAIMER
from ..services.clinics import clinic_of
from ..services.demo_training import training_notice


def portal(request) -> dict:
    user = getattr(request, "user", None)
    return {
        "disclaimer": DISCLAIMER,
        "portal_clinic": clinic_of(user) if user is not None else None,
        # While `make run` trains the demo model in the background (one stat of a file under var/ otherwise).
        "demo_training_notice": training_notice(),
    }
