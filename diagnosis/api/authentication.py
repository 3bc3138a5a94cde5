from __future__ import annotations

import binascii
from hmac import compare_digest

from django.core.exceptions import ObjectDoesNotExist
from django.utils import timezone
from django.utils.translation import gettext_lazy as _
from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication
from knox.crypto import hash_token
from knox.settings import CONSTANTS, knox_settings
from knox.signals import token_expired
from rest_framework import exceptions

from ..models import ApiToken


class ApiTokenAuthentication(TokenAuthentication):
    """knox tokens: stored as SHA-512 digests, expiring, revocable, and named (diagnosis.ApiToken).

    knox's check, in one statement per request: the token is read with its user and the user's clinic
    (the scope every API view needs), where knox reads the token and user, then every other token of
    the user (to delete expired ones), and the view then reads the clinic. An expired token is still
    deleted and refused when it is used; the user's other expired tokens are deleted by the daily
    sweep (`delete_expired_tokens`) instead of on every request.
    """

    def authenticate_credentials(self, token: bytes):
        message = _("Invalid token.")
        token = token.decode("utf-8")
        candidates = ApiToken.objects.filter(token_key=token[: CONSTANTS.TOKEN_KEY_LENGTH]).select_related(
            "user", "user__clinic_membership__clinic"
        )
        for auth_token in candidates:
            if self._cleanup_token(auth_token):
                continue
            try:
                digest = hash_token(token)
            except (TypeError, binascii.Error):
                raise exceptions.AuthenticationFailed(message) from None
            if compare_digest(digest, auth_token.digest):
                if knox_settings.AUTO_REFRESH and auth_token.expiry:
                    self.renew_token(auth_token)
                user, auth_token = self.validate_user(auth_token)
                try:
                    user._clinic_cache = user.clinic_membership.clinic  # read by services.clinics.clinic_of
                except ObjectDoesNotExist:  # staff without a clinic (known from the same statement)
                    pass
                return user, auth_token
        raise exceptions.AuthenticationFailed(message)

    def _cleanup_token(self, auth_token) -> bool:
        """Only this token: refused and deleted when it has expired (knox also sweeps the user's others)."""
        if auth_token.expiry is not None and auth_token.expiry < timezone.now():
            username = auth_token.user.get_username()
            auth_token.delete()
            token_expired.send(sender=self.__class__, username=username, source="auth_token")
            return True
        return False


class ApiTokenScheme(OpenApiAuthenticationExtension):
    target_class = ApiTokenAuthentication
    name = "apiToken"

    def get_security_definition(self, auto_schema):
        return {
            "type": "apiKey",
            "in": "header",
            "name": "Authorization",
            "description": "`Token <your token>`. Create one with `python manage.py create_api_token USER`.",
        }
