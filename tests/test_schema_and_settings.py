"""The OpenAPI schema and docs, the error pages, the commands, and the settings guards."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import yaml
from django.core.management import call_command
from django.core.management.base import CommandError
from rest_framework.test import APIClient

from diagnosis.models import AuditEvent, ModelVersion
from tests.conftest import ROOT


@pytest.fixture
def schema(db):
    response = APIClient().get("/api/schema/")
    assert response.status_code == 200
    return yaml.safe_load(response.content)


def test_schema_describes_every_endpoint_with_its_errors(schema):
    paths = schema["paths"]
    # 302 on the file downloads: only with MEDIA_PRESIGNED_REDIRECT (a presigned URL of the bucket).
    expected = {
        ("/api/v1/images/", "get"): {"200", "400", "401", "403"},
        ("/api/v1/images/", "post"): {"201", "202", "400", "401", "403", "409", "429", "503"},
        ("/api/v1/images/{id}/", "get"): {"200", "202", "400", "401", "403", "404"},
        ("/api/v1/images/{id}/file/", "get"): {"200", "302", "401", "403", "404"},
        ("/api/v1/images/{id}/status/", "get"): {"200", "202", "400", "401", "403", "404"},
        ("/api/v1/images/{id}/events/", "get"): {"200", "204", "400", "401", "403", "404", "429"},
        ("/api/v1/patients/", "get"): {"200", "400", "401", "403"},
        ("/api/v1/patients/", "post"): {"201", "400", "401", "403"},
        ("/api/v1/patients/{id}/", "get"): {"200", "401", "403", "404"},
        ("/api/v1/lesions/", "get"): {"200", "400", "401", "403"},
        ("/api/v1/lesions/", "post"): {"201", "400", "401", "403"},
        ("/api/v1/lesions/{id}/", "get"): {"200", "401", "403", "404"},
        ("/api/v1/images/{id}/explanations/", "get"): {"200", "401", "403", "404"},
        ("/api/v1/images/{id}/explanations/", "post"): {"200", "202", "400", "401", "403", "404", "409", "429"},
        ("/api/v1/images/batch/", "post"): {"201", "202", "400", "401", "403", "429", "503"},
        ("/api/v1/batches/{id}/", "get"): {"200", "202", "400", "401", "403", "404"},
        ("/api/v1/images/{id}/feedback/", "get"): {"200", "401", "403", "404"},
        ("/api/v1/images/{id}/feedback/", "post"): {"201", "400", "401", "403", "404", "409"},
        ("/api/v1/explanations/{id}/", "get"): {"200", "401", "403", "404"},
        ("/api/v1/explanations/{id}/overlay/", "get"): {"200", "302", "401", "403", "404"},
        ("/api/v1/explanations/{id}/heatmap/", "get"): {"200", "302", "401", "403", "404"},
        ("/api/v1/explanations/{id}/attribution/", "get"): {"200", "302", "401", "403", "404"},
    }
    documented = {(path, method) for path, operations in paths.items() for method in operations}
    assert documented == set(expected)
    for (path, method), codes in expected.items():
        operation = paths[path][method]
        assert set(operation["responses"]) == codes, (path, method)
        assert operation.get("summary"), (path, method)
        assert operation["security"] == [{"apiToken": []}]
    upload = paths["/api/v1/images/"]["post"]["requestBody"]["content"]
    assert "multipart/form-data" in upload
    assert schema["components"]["securitySchemes"]["apiToken"]["name"] == "Authorization"
    assert set(schema["components"]["schemas"]["Error"]["properties"]) == {"detail", "code", "errors"}


def test_schema_is_valid_openapi(db, tmp_path):
    call_command("spectacular", "--validate", "--fail-on-warn", "--file", str(tmp_path / "schema.yml"))
    assert (tmp_path / "schema.yml").stat().st_size > 1000


def test_api_docs_page_is_served_without_a_cdn(db):
    response = APIClient().get("/api/docs/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "swagger" in html.lower()
    assert "cdn." not in html and "unpkg" not in html and "jsdelivr" not in html


def test_unknown_api_url_answers_json_404(db):
    response = APIClient().get("/api/v1/nothing-here/")
    assert response.status_code == 404
    assert response.json()["code"] == "not_found"


def test_home_page_sends_visitors_to_sign_in_and_carries_the_disclaimer(db):
    response = APIClient().get("/", follow=True)
    assert response.redirect_chain[-1][0].startswith("/accounts/login/")
    assert response.status_code == 200
    assert b"Decision support, not a diagnosis." in response.content


def test_register_and_activate_model_commands(db, tmp_path, tiny_checkpoint, capsys):
    path = tmp_path / "model.pt"
    path.write_bytes(tiny_checkpoint)
    call_command("register_model", str(path), "--name", "cli-1")
    assert "registered (not active)" in capsys.readouterr().out
    call_command("activate_model", "cli-1")
    assert ModelVersion.objects.get(is_active=True).version == "cli-1"
    assert AuditEvent.objects.filter(action="activate_model", object_id=str(ModelVersion.objects.get().pk)).exists()
    with pytest.raises(CommandError, match="No model version 'nope'"):
        call_command("activate_model", "nope")
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"nope")
    with pytest.raises(CommandError, match="cannot be used"):
        call_command("register_model", str(garbage))
    assert ModelVersion.objects.count() == 1


def test_requeue_stale_command_reports_counts(db, capsys):
    call_command("requeue_stale")
    assert "0 dead claims returned, 0 images enqueued again, 0 explanations enqueued again." in capsys.readouterr().out


def run_check(settings_module: str, **env: str) -> subprocess.CompletedProcess:
    required = ("SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL")
    clean = {k: v for k, v in os.environ.items() if k not in required}
    clean.update({"DJANGO_SETTINGS_MODULE": settings_module, **env})
    return subprocess.run(
        [sys.executable, "manage.py", "check"], cwd=ROOT, env=clean, capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("missing", ["SECRET_KEY", "ALLOWED_HOSTS", "DATABASE_URL", "CELERY_BROKER_URL"])
def test_production_refuses_to_start_without_required_settings(missing):
    env = {
        "SECRET_KEY": "x" * 60,
        "ALLOWED_HOSTS": "triage.example.org",
        "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }
    env.pop(missing)
    result = run_check("webapp.settings.prod", **env)
    assert result.returncode != 0
    assert f"The environment variable {missing} must be set." in result.stderr


def test_production_settings_start_when_configured():
    result = run_check(
        "webapp.settings.prod",
        SECRET_KEY="x" * 60,
        ALLOWED_HOSTS="triage.example.org",
        DATABASE_URL="postgres://postgres@127.0.0.1:5432/postgres",
        CELERY_BROKER_URL="redis://127.0.0.1:6379/0",
    )
    assert result.returncode == 0, result.stderr
