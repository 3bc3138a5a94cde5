"""/healthz and /readyz: what a load balancer and an orchestrator ask."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest


def test_healthz_answers_without_a_login(client, db):
    response = client.get("/healthz")
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def test_readyz_is_ready_with_database_broker_storage_and_a_model(client, active_model, redis_service):
    response = client.get("/readyz")
    assert response.status_code == 200, response.json()
    body = response.json()
    assert body["status"] == "ready"
    assert {name for name, check in body["checks"].items() if check["ok"]} == {"database", "broker", "storage", "model"}


def test_readyz_without_an_active_model_is_503_with_the_reason(client, db, redis_service):
    response = client.get("/readyz")
    assert response.status_code == 503
    assert response.json()["checks"]["model"] == {"ok": False, "ms": response.json()["checks"]["model"]["ms"],
                                                  "error": "no model version is active"}  # fmt: skip


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_readyz_is_503_while_the_broker_is_down_and_200_when_it_is_back(client, active_model, settings):
    """A private redis-server, stopped and started again on the same port."""
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        settings.CELERY_BROKER_URL = f"redis://127.0.0.1:{port}/0"
        deadline = time.monotonic() + 10
        while client.get("/readyz").status_code != 200:
            assert time.monotonic() < deadline, "readyz never became ready with the private broker"
            time.sleep(0.2)
        server.terminate()
        server.wait(timeout=10)
        down = client.get("/readyz")
        assert down.status_code == 503
        assert down.json()["checks"]["broker"]["ok"] is False and down.json()["checks"]["broker"]["error"]
        assert down.json()["checks"]["database"]["ok"] is True
        server = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while (answer := client.get("/readyz")).status_code != 200:
            assert time.monotonic() < deadline, answer.json()
            time.sleep(0.2)
        assert answer.json()["status"] == "ready"
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
def test_health_endpoints_reveal_no_patient_data(client, db, path):
    body = client.get(path).content.decode()
    assert "patient" not in body.lower() and "token" not in body.lower()


def test_first_schema_requests_in_a_fresh_threaded_gunicorn_all_succeed(tmp_path):
    """drf-spectacular loads its extensions lazily and not thread-safely: concurrent first requests
    to /api/schema/ in a new threaded process used to answer 500 (21 of 24 here)."""
    import os
    import secrets
    import signal
    import sys
    import urllib.error
    import urllib.request
    from concurrent.futures import ThreadPoolExecutor

    from django.conf import settings

    from tests.conftest import ROOT

    database = settings.DATABASES["default"]
    port = free_port()
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1", "SECURE_SSL_REDIRECT": "false", "CELERY_BROKER_URL": "redis://127.0.0.1:6379/15",
        "DATABASE_URL": f"postgres://{database['USER']}@{database['HOST']}:{database['PORT']}/{database['NAME']}",
        "STATIC_ROOT": str(tmp_path),
    }  # fmt: skip
    server = subprocess.Popen(
        [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
         "-w", "1", "--threads", "8"],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1)
                break
            except OSError:
                assert time.monotonic() < deadline and server.poll() is None, "gunicorn did not start"
                time.sleep(0.2)

        def fetch(_):
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/schema/", timeout=60) as response:
                    return response.status
            except urllib.error.HTTPError as exc:
                return exc.code

        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(fetch, range(8))) == [200] * 8
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
