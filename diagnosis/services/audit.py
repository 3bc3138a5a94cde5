from __future__ import annotations

from django.db import models

from ..models import AuditEvent, Clinic


def record_event(
    *,
    actor,
    action: str,
    obj: models.Model | None = None,
    clinic: Clinic | None = None,
    via: str = "",
    ip_address: str | None = None,
    object_id: str | None = None,
) -> AuditEvent:
    if clinic is None and obj is not None:
        clinic = getattr(obj, "clinic", None)
    authenticated = actor is not None and getattr(actor, "is_authenticated", False)
    return AuditEvent.objects.create(
        actor=actor if authenticated else None,
        actor_username=actor.get_username() if authenticated else "",
        clinic=clinic,
        action=action,
        object_type=obj._meta.model_name if obj is not None else "",
        object_id=object_id if object_id is not None else (str(obj.pk) if obj is not None else ""),
        via=via,
        ip_address=ip_address,
    )
