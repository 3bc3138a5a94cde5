from __future__ import annotations

import logging
from datetime import timedelta

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from ..models import ApiToken, AuditEvent
from .audit import record_event
from .clinics import clinic_of

logger = logging.getLogger(__name__)


def create_api_token(
    *, user, name: str, expires_in_days: int | None = -1, actor=None, via: str = "cli"
) -> tuple[ApiToken, str]:
    """Create a named token; the plain token is returned once and only its digest is stored.

    expires_in_days: -1 for the configured default (API_TOKEN_TTL_DAYS), None for no expiry.
    """
    name = name.strip()
    if not name:
        raise ValueError("A token needs a name, e.g. the system that will use it.")
    if expires_in_days == -1:
        expires_in_days = settings.API_TOKEN_TTL_DAYS or None
    if expires_in_days is not None and expires_in_days <= 0:
        raise ValueError("A token's lifetime must be a positive number of days.")
    expiry = timedelta(days=expires_in_days) if expires_in_days else None
    with transaction.atomic():
        token, plain = ApiToken.objects.create(user=user, expiry=expiry, name=name)
        record_event(
            actor=actor or user,
            action=AuditEvent.Action.CREATE_TOKEN,
            obj=token,
            object_id=token.token_key,
            clinic=clinic_of(user),
            via=via,
        )
    return token, plain


def revoke_api_token(*, token: ApiToken, actor=None, via: str = "cli") -> None:
    with transaction.atomic():
        record_event(
            actor=actor or token.user,
            action=AuditEvent.Action.REVOKE_TOKEN,
            obj=token,
            object_id=token.token_key,
            clinic=clinic_of(token.user),
            via=via,
        )
        token.delete()


def revoke_all_tokens(*, user, via: str) -> int:
    """Revoke every API token of `user` (each with its audit event). Returns how many there were."""
    tokens = list(ApiToken.objects.filter(user=user))
    for token in tokens:
        revoke_api_token(token=token, actor=user, via=via)
    if tokens:
        logger.info("revoked %d API token(s) of user %s: %s", len(tokens), user.pk, via)
    return len(tokens)


class RevokeTokensOnPasswordChange:
    """Listed last in AUTH_PASSWORD_VALIDATORS for Django's password_changed() hook, which runs on every
    real password change and never on a hash upgrade: the portal's form, the admin's, a reset and the
    changepassword command alike. A stolen session may have minted tokens; a new password ends them too.
    It never refuses a password."""

    def validate(self, password, user=None) -> None:
        return None

    def password_changed(self, password, user=None) -> None:
        if user is not None and user.pk is not None:
            revoke_all_tokens(user=user, via="password_change")

    def get_help_text(self) -> str:
        return "Changing your password revokes your API tokens."


def delete_expired_tokens(*, now=None) -> int:
    """Delete every expired API token (daily, from the beat schedule). An expired token is refused
    anyway, and deleted when it is presented; this removes those nobody presents any more."""

    deleted, _ = ApiToken.objects.filter(expiry__lt=now or timezone.now()).delete()
    return deleted
