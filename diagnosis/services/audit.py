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
    event = _event(actor=actor, action=action, obj=obj, clinic=clinic, via=via, ip_address=ip_address,
                   object_id=object_id)  # fmt: skip
    event.save(force_insert=True)
    return event


def record_events(*, actor, action: str, objects: list[models.Model], via: str = "") -> None:
    """One event per object, written with one INSERT (a batch upload)."""
    AuditEvent.objects.bulk_create([_event(actor=actor, action=action, obj=obj, via=via) for obj in objects])


def _event(*, actor, action, obj=None, clinic=None, via="", ip_address=None, object_id=None) -> AuditEvent:
    if clinic is None and obj is not None:
        clinic = getattr(obj, "clinic", None)
    authenticated = actor is not None and getattr(actor, "is_authenticated", False)
    return AuditEvent(
        actor=actor if authenticated else None,
        actor_username=actor.get_username() if authenticated else "",
        clinic=clinic,
        action=action,
        object_type=obj._meta.model_name if obj is not None else "",
        object_id=object_id if object_id is not None else (str(obj.pk) if obj is not None else ""),
        via=via,
        ip_address=ip_address,
    )
