from __future__ import annotations

from drf_spectacular.extensions import OpenApiAuthenticationExtension
from knox.auth import TokenAuthentication


class ApiTokenAuthentication(TokenAuthentication):
    """knox tokens: stored as SHA-512 digests, expiring, revocable, and named (diagnosis.ApiToken)."""


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
