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
