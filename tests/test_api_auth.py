"""Tokens: hashed, named, expiring, revocable; no token means 401; no clinic means 403."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.management import call_command
from django.utils import timezone
from rest_framework.test import APIClient

from diagnosis.models import ApiToken, AuditEvent
from diagnosis.services.tokens import create_api_token, revoke_api_token
from tests.conftest import token_client
from tests.factories import UserFactory

ENDPOINTS = ["/api/v1/images/", "/api/v1/patients/", "/api/v1/lesions/"]


@pytest.mark.parametrize("path", ENDPOINTS)
def test_unauthenticated_request_gets_401_json(db, path):
    response = APIClient().get(path)
    assert response.status_code == 401
    assert response.json()["code"] == "not_authenticated"
    assert response["WWW-Authenticate"] == "Token"


def test_wrong_token_gets_401(db):
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token mlt_" + "0" * 64)
    response = client.get("/api/v1/images/")
    assert response.status_code == 401
    assert response.json()["code"] == "authentication_failed"


def test_token_is_stored_only_as_a_digest(clinician):
    token, plain = create_api_token(user=clinician, name="pacs")
    assert plain.startswith("mlt_")
    stored = ApiToken.objects.get(pk=token.pk)
    assert plain not in (stored.digest, stored.token_key)
    assert len(stored.digest) == 128  # SHA-512 hex
    assert stored.name == "pacs"
    assert AuditEvent.objects.filter(action="create_token", object_id=stored.token_key).exists()


def test_revoked_token_gets_401(clinician):
    client = token_client(clinician)
    assert client.get("/api/v1/images/").status_code == 200
    revoke_api_token(token=ApiToken.objects.get(user=clinician))
    assert client.get("/api/v1/images/").status_code == 401
    assert AuditEvent.objects.filter(action="revoke_token").count() == 1


def test_expired_token_gets_401(clinician):
    client = token_client(clinician)
    ApiToken.objects.filter(user=clinician).update(expiry=timezone.now() - timedelta(seconds=1))
    assert client.get("/api/v1/images/").status_code == 401
    assert not ApiToken.objects.filter(user=clinician).exists()  # deleted when presented, as knox does


def test_a_request_reads_token_user_and_clinic_in_one_statement(clinician, clinic):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from diagnosis.services.tokens import delete_expired_tokens

    client = token_client(clinician)
    _, stale = create_api_token(user=clinician, name="old pacs")
    create_api_token(user=clinician, name="current pacs")
    ApiToken.objects.filter(name="old pacs").update(expiry=timezone.now() - timedelta(days=1))
    with CaptureQueriesContext(connection) as queries:
        response = client.get("/api/v1/patients/")
    assert response.status_code == 200
    assert '"diagnosis_apitoken"' in queries.captured_queries[0]["sql"]
    assert '"diagnosis_clinic"' in queries.captured_queries[0]["sql"]  # the clinic came with the token
    assert not any('"diagnosis_clinicmembership"' in q["sql"] for q in queries.captured_queries[1:])
    assert sum('"diagnosis_apitoken"' in q["sql"] for q in queries.captured_queries) == 1
    # The other expired token is left to the daily sweep, which deletes only expired ones.
    assert ApiToken.objects.filter(user=clinician).count() == 3
    expired = APIClient()
    expired.credentials(HTTP_AUTHORIZATION=f"Token {stale}")
    assert delete_expired_tokens() == 1
    assert set(ApiToken.objects.filter(user=clinician).values_list("name", flat=True)) == {"current pacs", "tests"}
    assert expired.get("/api/v1/patients/").status_code == 401


def test_default_token_lifetime_comes_from_settings(clinician, settings):
    settings.API_TOKEN_TTL_DAYS = 30
    token, _ = create_api_token(user=clinician, name="x")
    assert timedelta(days=29, hours=23) < token.expiry - timezone.now() <= timedelta(days=30)
    forever, _ = create_api_token(user=clinician, name="y", expires_in_days=None)
    assert forever.expiry is None


def test_user_without_clinic_gets_403(db):
    staff = UserFactory(is_staff=True)
    response = token_client(staff).get("/api/v1/images/")
    assert response.status_code == 403
    assert "not attached to a clinic" in response.json()["detail"]


def test_create_api_token_command_prints_a_working_token(clinician, capsys):
    call_command("create_api_token", clinician.username, "--name", "hospital-pacs", "--expires-days", "7")
    plain = capsys.readouterr().out.strip()
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {plain}")
    assert client.get("/api/v1/patients/").status_code == 200
    token = ApiToken.objects.get(user=clinician, name="hospital-pacs")
    assert timedelta(days=6) < token.expiry - timezone.now() <= timedelta(days=7)


def test_create_api_token_command_rejects_unknown_user(db):
    from django.core.management.base import CommandError

    with pytest.raises(CommandError, match="No user named"):
        call_command("create_api_token", "nobody")
