from __future__ import annotations

from rest_framework.permissions import BasePermission

from ..services.clinics import clinic_of


class IsClinician(BasePermission):
    """Authenticated and attached to a clinic: every object the API serves belongs to that clinic."""

    message = "Your account is not attached to a clinic, so it cannot see patient data."

    def has_permission(self, request, view) -> bool:
        user = request.user
        return bool(user and user.is_authenticated and clinic_of(user) is not None)
