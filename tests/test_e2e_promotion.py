"""Promotion and rollback seen from a running worker: the real Celery worker process (Redis broker,
PostgreSQL) switches to the version `activate_model` promotes, and back after `rollback_model`, without
a restart. The model version is read from the API's prediction for uploads made after each step."""

from __future__ import annotations

import io

import pytest
from django.core.management import call_command

from diagnosis.models import ModelActivation, ModelVersion
from tests.conftest import lesion_jpeg, token_client, upload_file, wait_for
from tests.factories import ClinicFactory, ClinicianFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def two_versions(tiny_checkpoint):
    """'promo-v1' (active) and 'promo-v2' (registered): the same weights with a near-zero threshold in v2,
    so its labels tell the two apart as well as its name does."""
    from diagnosis.services.registry import register_model
    from mlcore.model import checkpoint_bytes, load_checkpoint

    first = register_model(checkpoint=tiny_checkpoint, version="promo-v1", activate=True)
    model, meta = load_checkpoint(tiny_checkpoint)
    meta.threshold = 0.001
    second = register_model(checkpoint=checkpoint_bytes(model, meta), version="promo-v2")
    return first, second


@pytest.fixture
def client():
    clinic = ClinicFactory(name="Promotion clinic")
    return token_client(ClinicianFactory(membership__clinic=clinic))


def predicted_by(client, seed: int) -> dict:
    """Upload a lesion photo and wait for the worker's prediction."""
    response = client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=seed))}, format="multipart")
    assert response.status_code == 202, response.content
    status_url = response.json()["status_url"]

    def finished():
        body = client.get(status_url).json()
        return body if body["state"] in ("done", "failed") else None

    body = wait_for(finished, 60, interval=0.1, message=f"{status_url} to finish")
    assert body["state"] == "done", body
    return body["prediction"]


def test_running_worker_follows_activate_and_rollback_commands(celery_worker, two_versions, client):
    first, second = two_versions
    worker_pid = celery_worker.process.pid

    before = predicted_by(client, seed=31)
    assert before["model_version"] == "promo-v1"
    assert before["threshold"] == pytest.approx(first.threshold)

    out = io.StringIO()
    call_command("activate_model", "promo-v2", stdout=out)
    assert "promo-v2 is now active" in out.getvalue()
    promoted = predicted_by(client, seed=32)
    assert promoted["model_version"] == "promo-v2"
    assert promoted["threshold"] == pytest.approx(0.001)
    assert promoted["label"] == "malignant"

    out = io.StringIO()
    call_command("rollback_model", stdout=out)
    assert "promo-v1 is active again" in out.getvalue()
    rolled_back = predicted_by(client, seed=33)
    assert rolled_back["model_version"] == "promo-v1"
    assert rolled_back["threshold"] == pytest.approx(first.threshold)

    assert ModelVersion.objects.get(is_active=True) == first
    assert list(ModelActivation.objects.order_by("id").values_list("model_version__version", "previous__version")) == [
        ("promo-v1", None), ("promo-v2", "promo-v1"), ("promo-v1", "promo-v2")
    ]  # fmt: skip
    assert celery_worker.process.poll() is None and celery_worker.process.pid == worker_pid  # never restarted
    assert "loaded model promo-v2" in celery_worker.log() and "loaded model promo-v1" in celery_worker.log()
