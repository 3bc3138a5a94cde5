"""Idempotent uploads, rate limits, security headers, deployment checks and tokens kept out of logs."""

from __future__ import annotations

import io
import logging
import os
import secrets
import subprocess
import sys
import threading

import pytest
from django.core.cache import cache
from django.test.client import FakePayload
from PIL import Image

from diagnosis.models import LesionImage
from diagnosis.services import images
from diagnosis.services.patients import create_lesion, create_patient
from tests.conftest import ROOT, lesion_jpeg, stored_image_files, upload_file

UPLOAD = "/api/v1/images/"


def post_image(client, data: bytes, key: str | None = None):
    headers = {"HTTP_IDEMPOTENCY_KEY": key} if key is not None else {}
    return client.post(UPLOAD, {"image": upload_file(data)}, format="multipart", **headers)


@pytest.fixture(autouse=True)
def _fresh_throttle_counters():
    cache.clear()
    yield
    cache.clear()


# --- Idempotency-Key -------------------------------------------------------------------------------


def test_retry_with_the_same_idempotency_key_returns_the_first_image(api_client, django_capture_on_commit_callbacks):
    data = lesion_jpeg(seed=21)
    with django_capture_on_commit_callbacks() as first_callbacks:
        first = post_image(api_client, data, key="retry-7f3c")
    with django_capture_on_commit_callbacks() as second_callbacks:
        second = post_image(api_client, data, key="retry-7f3c")
    assert first.status_code == second.status_code == 202
    assert second.json()["id"] == first.json()["id"]
    assert second["Idempotent-Replayed"] == "true" and not first.has_header("Idempotent-Replayed")
    assert LesionImage.objects.count() == 1
    assert len(stored_image_files()) == 1  # the retry stored no second file
    assert len(first_callbacks) == 1 and len(second_callbacks) == 0  # and enqueued nothing again


def test_same_key_with_another_file_is_a_409_and_stores_nothing(api_client, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks():
        assert post_image(api_client, lesion_jpeg(seed=22), key="k-1").status_code == 202
    response = post_image(api_client, lesion_jpeg(seed=23), key="k-1")
    assert response.status_code == 409
    assert response.json()["code"] == "idempotency_key_reused"
    assert "different file" in response.json()["detail"]
    assert LesionImage.objects.count() == 1 and len(stored_image_files()) == 1


def test_without_a_key_or_with_another_key_each_upload_is_new(api_client, django_capture_on_commit_callbacks):
    data = lesion_jpeg(seed=24)
    with django_capture_on_commit_callbacks():
        answers = [post_image(api_client, data), post_image(api_client, data), post_image(api_client, data, key="a"),
                   post_image(api_client, data, key="b")]  # fmt: skip
    ids = {answer.json()["id"] for answer in answers}
    assert len(ids) == 4 == LesionImage.objects.count()


def test_keys_belong_to_their_user(api_client, other_api_client, django_capture_on_commit_callbacks):
    data = lesion_jpeg(seed=25)
    with django_capture_on_commit_callbacks():
        mine = post_image(api_client, data, key="shared-key").json()["id"]
        theirs = post_image(other_api_client, data, key="shared-key").json()["id"]
    assert mine != theirs and LesionImage.objects.count() == 2


@pytest.mark.parametrize("key", ["has space", "x" * 201, "naïve", "a/b"])
def test_a_malformed_key_is_a_400(api_client, key):
    response = post_image(api_client, lesion_jpeg(seed=26), key=key)
    assert response.status_code == 400
    assert "idempotency_key" in response.json()["errors"]
    assert LesionImage.objects.count() == 0 and stored_image_files() == []


def test_portal_double_send_of_one_file_stores_it_once(client, clinician, django_capture_on_commit_callbacks):
    from diagnosis.services.clinics import clinic_of

    patient = create_patient(clinic=clinic_of(clinician), reference="PT-IDEM", created_by=clinician)
    lesion = create_lesion(patient=patient, body_site="back", created_by=clinician)
    client.force_login(clinician)
    data = lesion_jpeg(seed=27)
    answers = []
    with django_capture_on_commit_callbacks():
        for _ in range(2):  # the same request twice, as a double click or a resent request would
            answers.append(client.post(f"/lesions/{lesion.pk}/upload/", {"images": upload_file(data)},
                                       HTTP_ACCEPT="application/json", HTTP_IDEMPOTENCY_KEY="file-1-uuid"))  # fmt: skip
    assert [a.status_code for a in answers] == [202, 202]
    assert answers[0].json()["files"][0]["id"] == answers[1].json()["files"][0]["id"]
    assert LesionImage.objects.filter(lesion=lesion).count() == 1


# --- rate limits -----------------------------------------------------------------------------------------


def test_uploads_over_the_rate_limit_get_429_with_retry_after(api_client, settings, django_capture_on_commit_callbacks):
    settings.API_UPLOAD_RATE_LIMIT = "2/minute"
    with django_capture_on_commit_callbacks():
        codes = [post_image(api_client, lesion_jpeg(seed=30 + i)).status_code for i in range(2)]
    refused = post_image(api_client, lesion_jpeg(seed=40))
    assert codes == [202, 202]
    assert refused.status_code == 429
    assert refused.json()["code"] == "throttled"
    assert 0 < int(refused["Retry-After"]) <= 60
    assert LesionImage.objects.count() == 2
    assert api_client.get(UPLOAD).status_code == 200  # reading is not an upload


def portal_lesion(clinician, reference: str):
    from diagnosis.services.clinics import clinic_of

    patient = create_patient(clinic=clinic_of(clinician), reference=reference, created_by=clinician)
    return create_lesion(patient=patient, body_site="back", created_by=clinician)


def test_portal_uploads_share_the_upload_rate_limit(client, clinician, api_client, settings,
                                                    django_capture_on_commit_callbacks):  # fmt: skip
    settings.API_UPLOAD_RATE_LIMIT = "3/minute"
    lesion = portal_lesion(clinician, "PT-RATE")
    client.force_login(clinician)
    url = f"/lesions/{lesion.pk}/upload/"
    with django_capture_on_commit_callbacks():
        first = client.post(url, {"images": [upload_file(lesion_jpeg(seed=50 + i)) for i in range(2)]},
                            HTTP_ACCEPT="application/json")  # fmt: skip
        assert post_image(api_client, lesion_jpeg(seed=53)).status_code == 202  # the third, through the API
        refused = client.post(url, {"images": upload_file(lesion_jpeg(seed=54))}, HTTP_ACCEPT="application/json")
        page = client.post(url, {"images": upload_file(lesion_jpeg(seed=55))}, follow=True)
    assert first.status_code == 202
    assert refused.status_code == 429 and refused.json()["code"] == "throttled" and int(refused["Retry-After"]) > 0
    assert "Too many uploads" in page.content.decode()
    assert LesionImage.objects.count() == 3


# --- files the web tier must convert (security review: a tiny file, a huge decode) ------------------


def webp(width: int, height: int) -> bytes:
    """A lossless WebP of one colour: a few hundred bytes for millions of pixels."""
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), (180, 120, 100)).save(buffer, format="WEBP", lossless=True)
    return buffer.getvalue()


def test_a_tiny_file_of_too_many_pixels_to_convert_is_refused_before_decoding(api_client, settings):
    settings.WEB_CONVERT_MAX_PIXELS = 4_000_000
    data = webp(3000, 3000)
    assert len(data) < 2000
    response = post_image(api_client, data)
    assert response.status_code == 400, response.content
    assert response.json()["code"] == "too_large_to_convert"
    assert "JPEG or PNG" in response.json()["detail"] and "4 megapixels" in response.json()["detail"]
    assert LesionImage.objects.count() == 0 and stored_image_files() == []
    # A JPEG of as many pixels is stored as it came (its metadata stripped, nothing decoded): accepted.
    buffer = io.BytesIO()
    Image.new("RGB", (3000, 3000), (180, 120, 100)).save(buffer, format="JPEG", quality=50)
    assert post_image(api_client, buffer.getvalue()).status_code == 202


def test_conversions_wait_for_a_slot_then_get_503_with_retry_after(api_client, client, clinician, settings,
                                                                   django_capture_on_commit_callbacks):  # fmt: skip
    settings.WEB_CONVERT_CONCURRENCY = 1
    settings.WEB_CONVERT_WAIT_SECONDS = 0.2
    images._convert_slots = None  # sized from the settings above
    taken, release = threading.Event(), threading.Event()

    def hold():  # another request of this process converting a large file
        with images.convert_slot():
            taken.set()
            release.wait(10)

    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(5)
        busy = post_image(api_client, webp(64, 64))
        jpeg = post_image(api_client, lesion_jpeg(seed=60))  # a JPEG needs no slot
    finally:
        release.set()
        holder.join()
        images._convert_slots = None
    assert busy.status_code == 503 and busy.json()["code"] == "server_busy" and int(busy["Retry-After"]) > 0
    assert jpeg.status_code == 202
    # A batch and the portal while the slot is taken: every file that needs converting is refused as busy
    # (after the first, without waiting again); the portal's script is told to send them again (503).
    taken.clear()
    release.clear()
    holder = threading.Thread(target=hold)
    holder.start()
    try:
        assert taken.wait(5)
        batch = api_client.post("/api/v1/images/batch/", {"images": [upload_file(webp(32 + i, 32)) for i in range(3)]},
                                format="multipart")  # fmt: skip
        lesion = portal_lesion(clinician, "PT-BUSY")
        client.force_login(clinician)
        portal = client.post(f"/lesions/{lesion.pk}/upload/", {"images": upload_file(webp(40, 40))},
                             HTTP_ACCEPT="application/json")  # fmt: skip
    finally:
        release.set()
        holder.join()
        images._convert_slots = None
    assert batch.status_code == 400 and [r["code"] for r in batch.json()["rejected"]] == ["server_busy"] * 3
    assert portal.status_code == 503 and int(portal["Retry-After"]) > 0
    assert portal.json()["files"][0]["code"] == "server_busy"
    with django_capture_on_commit_callbacks():
        assert post_image(api_client, webp(64, 64)).status_code == 202  # the slot is free again
    assert LesionImage.objects.count() == 2


def test_api_calls_over_the_general_limit_get_429(api_client, other_api_client, settings):
    settings.API_RATE_LIMIT = "3/minute"
    assert [api_client.get("/api/v1/patients/").status_code for _ in range(3)] == [200, 200, 200]
    refused = api_client.get("/api/v1/patients/")
    assert refused.status_code == 429 and int(refused["Retry-After"]) > 0
    assert other_api_client.get("/api/v1/patients/").status_code == 200  # counted per user


def test_login_lockout_is_429_with_retry_after(client, clinician, settings):
    settings.AXES_FAILURE_LIMIT = 2
    for _ in range(2):
        client.post("/accounts/login/", {"username": clinician.username, "password": "wrong"}, REMOTE_ADDR="10.0.0.9")
    locked = client.post("/accounts/login/", {"username": clinician.username, "password": "wrong"},
                         REMOTE_ADDR="10.0.0.9")  # fmt: skip
    assert locked.status_code == 429
    assert int(locked["Retry-After"]) == int(settings.AXES_COOLOFF_TIME.total_seconds())
    assert "Too many failed sign-in attempts" in locked.content.decode()


# --- headers and deployment settings ---------------------------------------------------------------------


def test_portal_pages_carry_a_content_security_policy(client, clinician):
    client.force_login(clinician)
    for path in ("/patients/", "/history/", "/accounts/login/"):
        response = client.get(path, follow=True)
        policy = response["Content-Security-Policy"]
        assert "default-src 'self'" in policy and "script-src 'self'" in policy, path
        assert "frame-ancestors 'none'" in policy and "object-src 'none'" in policy
        assert "unsafe-eval" not in policy and "script-src 'self' 'unsafe-inline'" not in policy
        assert response["X-Frame-Options"] == "DENY" and response["X-Content-Type-Options"] == "nosniff"


def test_portal_html_has_no_inline_script_the_policy_would_block(client, clinician):
    import re

    client.force_login(clinician)
    page = client.get("/patients/").content.decode()
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", page, flags=re.S)
    assert scripts, "the portal loads its script"
    assert all("src=" in attributes and not body.strip() for attributes, body in scripts)
    assert " onclick=" not in page and " onload=" not in page


def test_check_deploy_with_production_settings_reports_nothing():
    # (The browser tests set DJANGO_ALLOW_ASYNC_UNSAFE in this process; a deployment never would.)
    env = {
        **{k: v for k, v in os.environ.items() if k != "DJANGO_ALLOW_ASYNC_UNSAFE"},
        "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "triage.example.org", "DATABASE_URL": "postgres://postgres@127.0.0.1:5432/postgres",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/0",
    }  # fmt: skip
    result = subprocess.run([sys.executable, "manage.py", "check", "--deploy", "--fail-level", "WARNING"], cwd=ROOT,
                            env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "System check identified no issues" in result.stdout


def test_production_refuses_to_start_without_its_secrets():
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DATABASE_URL")}
    env["DJANGO_SETTINGS_MODULE"] = "webapp.settings.prod"
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "SECRET_KEY" in result.stderr


@pytest.mark.parametrize(
    ("command", "module"),
    [
        ("import webapp.wsgi", "wsgi"),
        ("import webapp.asgi", "asgi"),
        ("import django; from webapp.celery import app; django.setup()", "celery"),
    ],
    ids=["wsgi", "asgi", "celery"],
)
def test_a_bare_start_uses_the_production_settings(command, module):
    """`gunicorn webapp.wsgi` or `celery -A webapp` with nothing set must not fall back to DEBUG and the
    public development SECRET_KEY: they load the production settings, which refuse to start without
    their secrets."""
    env = {k: v for k, v in os.environ.items() if k not in ("SECRET_KEY", "DJANGO_SETTINGS_MODULE", "DATABASE_URL")}
    result = subprocess.run([sys.executable, "-c", command], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=120)  # fmt: skip
    assert result.returncode != 0, module
    assert "SECRET_KEY" in result.stderr, result.stderr[-2000:]


def test_the_development_settings_refuse_a_public_host_name():
    env = {**os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "ALLOWED_HOSTS": "triage.example.org"}
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0
    assert "refuse to serve ['triage.example.org']" in result.stderr
    # With DEBUG off, the public development SECRET_KEY must not serve a real host either.
    env["DJANGO_DEBUG"] = "false"
    result = subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "refuse to serve" in result.stderr
    env["ALLOWED_HOSTS"] = "localhost,127.0.0.1"
    assert subprocess.run([sys.executable, "manage.py", "check"], cwd=ROOT, env=env, capture_output=True,
                          timeout=120).returncode == 0  # fmt: skip


# --- tokens ------------------------------------------------------------------------------------------------


def test_tokens_never_reach_the_logs(api_client, clinician, caplog, django_capture_on_commit_callbacks):
    from rest_framework.test import APIClient

    caplog.set_level(logging.DEBUG)
    token = api_client.token
    with django_capture_on_commit_callbacks():
        api_client.get("/api/v1/patients/")
        api_client.get("/api/v1/images/00000000-0000-0000-0000-000000000000/")  # 404
        api_client.post(UPLOAD, {"image": upload_file(b"not an image")}, format="multipart")  # 400
        post_image(api_client, lesion_jpeg(seed=50))
    stranger = APIClient()
    stranger.credentials(HTTP_AUTHORIZATION=f"Token {token[:-4]}abcd")  # a wrong token: 401
    assert stranger.get("/api/v1/patients/").status_code == 401
    logged = "\n".join(f"{record.getMessage()} {record.args!r} {getattr(record, 'request', '')!r}"
                       for record in caplog.records)  # fmt: skip
    assert caplog.records, "the requests above are logged"
    assert token not in logged and token[:-4] not in logged


# --- request bodies over their limit (security review: read in full before the size check) ---------


def test_a_body_over_its_limit_is_refused_from_its_content_length_unread(api_client, settings):
    settings.MAX_UPLOAD_BYTES = 1_000_000
    small = lesion_jpeg(seed=70)
    # The header claims 315 MB; the body is a small photo. Nothing of it is read: 413 at once.
    response = api_client.post(UPLOAD, {"image": upload_file(small)}, format="multipart", CONTENT_LENGTH="330301440")
    assert response.status_code == 413
    assert response.json()["code"] == "request_too_large" and "1 MB" in response.json()["detail"]
    assert LesionImage.objects.count() == 0
    # A single-photo upload is held to MAX_UPLOAD_BYTES and a little, however large MAX_REQUEST_BYTES is.
    settings.MAX_REQUEST_BYTES = 500_000_000
    big = api_client.post(UPLOAD, {"image": upload_file(small)}, format="multipart", CONTENT_LENGTH="2000000")
    assert big.status_code == 413


def test_a_chunked_body_is_refused_with_411_unread(api_client):
    payload = FakePayload(b"5\r\nhello\r\n0\r\n\r\n")
    response = api_client.generic(
        "POST", "/api/v1/images/batch/", content_type="multipart/form-data; boundary=BoUnDaRy",
        CONTENT_LENGTH="", HTTP_TRANSFER_ENCODING="chunked", **{"wsgi.input": payload},
    )  # fmt: skip
    assert response.status_code == 411 and response.json()["code"] == "length_required"
    assert LesionImage.objects.count() == 0
