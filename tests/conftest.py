"""Shared fixtures. The suite runs against this machine's real PostgreSQL and Redis.

A missing PostgreSQL stops the run (it holds the test database). A missing Redis skips only the
tests that need it, with the reason shown, except under CI=true, where it is a failure.
"""

from __future__ import annotations

import io
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
IN_CI = os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def reachable(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def require_service(name: str, host: str, port: int, how_to_start: str) -> None:
    if reachable(host, port):
        return
    message = f"{name} is not reachable at {host}:{port}. Start it with: {how_to_start}"
    if IN_CI:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


def pytest_sessionstart(session):
    from django.conf import settings

    database = settings.DATABASES["default"]
    host, port = database.get("HOST") or "127.0.0.1", int(database.get("PORT") or 5432)
    if not reachable(host, port):
        pytest.exit(
            f"PostgreSQL is not reachable at {host}:{port} and the test database lives there. Start it with: "
            "pg_ctlcluster --skip-systemctl-redirect $(ls /etc/postgresql) main start",
            returncode=1,
        )


@pytest.fixture(scope="session")
def redis_service():
    from urllib.parse import urlparse

    from django.conf import settings

    url = urlparse(settings.CELERY_BROKER_URL)
    require_service(
        "Redis",
        url.hostname or "127.0.0.1",
        url.port or 6379,
        'redis-server --daemonize yes --bind 127.0.0.1 --port 6379 --save "" --appendonly no',
    )
    return settings.CELERY_BROKER_URL


# --- accounts and clinics ------------------------------------------------------------------------


@pytest.fixture
def clinic(db):
    from tests.factories import ClinicFactory

    return ClinicFactory(name="Clinic A")


@pytest.fixture
def other_clinic(db):
    from tests.factories import ClinicFactory

    return ClinicFactory(name="Clinic B")


@pytest.fixture
def clinician(clinic):
    from tests.factories import ClinicianFactory

    return ClinicianFactory(membership__clinic=clinic)


@pytest.fixture
def other_clinician(other_clinic):
    from tests.factories import ClinicianFactory

    return ClinicianFactory(membership__clinic=other_clinic)


def token_client(user):
    from rest_framework.test import APIClient

    from diagnosis.services.tokens import create_api_token

    _, token = create_api_token(user=user, name="tests")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Token {token}")
    client.token = token
    return client


@pytest.fixture
def api_client(clinician):
    return token_client(clinician)


@pytest.fixture
def other_api_client(other_clinician):
    return token_client(other_clinician)


# --- models --------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def tiny_checkpoint() -> bytes:
    """A small trained ResNet (resnet_tiny, 64 px) from synthetic lesions, built once per session."""
    from mlcore.data import SyntheticLesions
    from mlcore.model import checkpoint_bytes
    from mlcore.train import TrainConfig, train_classifier

    result = train_classifier(
        list(SyntheticLesions(200, size=64, seed=11)),
        list(SyntheticLesions(60, size=64, seed=12)),
        TrainConfig(arch="resnet_tiny", input_size=64, epochs=2, seed=0),
        progress=False,
    )
    return checkpoint_bytes(result.model, result.meta)


@pytest.fixture
def active_model(db, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    return register_model(checkpoint=tiny_checkpoint, version=f"tiny-{uuid.uuid4().hex[:8]}", activate=True)


@pytest.fixture(scope="session")
def tiny_gate(tiny_checkpoint) -> dict:
    """The photo-quality gate of tiny_checkpoint (mlcore.gate), built as training builds one: quality
    thresholds and the OOD reference from synthetic training photos at 128 px (the size the tests
    upload), the OOD threshold and the refer-when-unsure band from held-out ones. The photos are JPEG
    files decoded, as a data set on disk and the tests' uploads are."""
    from mlcore.data import SyntheticLesions
    from mlcore.gate import build_gate
    from mlcore.inference import Predictor
    from mlcore.preprocessing import decode_image
    from mlcore.quality import measure

    def as_jpeg(pairs):
        encoded = []
        for image, label in pairs:
            buffer = io.BytesIO()
            image.save(buffer, format="JPEG", quality=92)
            encoded.append((decode_image(buffer.getvalue()).image, label))
        return encoded

    predictor = Predictor.from_checkpoint(tiny_checkpoint, device="cpu")
    train = as_jpeg(SyntheticLesions(150, size=128, seed=21))
    held = as_jpeg(SyntheticLesions(150, size=128, seed=22))
    _, _, train_embeddings = predictor.predict_with_gradcam([image for image, _ in train], embeddings=True)
    results, _, held_embeddings = predictor.predict_with_gradcam([image for image, _ in held], embeddings=True)
    return build_gate(
        reference_measures=[measure(image) for image, _ in train], train_embeddings=train_embeddings,
        held_out_embeddings=held_embeddings,
        validation_labels=[label == predictor.meta.positive_index for _, label in held],
        validation_scores=[result.probability_malignant for result in results], threshold=predictor.meta.threshold,
        target_sensitivity=0.9, input_size=predictor.meta.input_size,
    )  # fmt: skip


@pytest.fixture
def gated_model(db, tiny_checkpoint, tiny_gate):
    """tiny_checkpoint registered and active with its photo-quality gate, as a trained model is."""
    from diagnosis.services.registry import register_model

    return register_model(checkpoint=tiny_checkpoint, version=f"gated-{uuid.uuid4().hex[:8]}", activate=True,
                          quality_gate=tiny_gate)  # fmt: skip


@pytest.fixture
def faults_setup(tiny_checkpoint):
    """A clinic, an API token of one of its clinicians, and an active model the workers can load."""
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token
    from tests.factories import ClinicFactory, ClinicianFactory

    clinic = ClinicFactory(name=f"Faults {uuid.uuid4().hex[:6]}")
    clinician = ClinicianFactory(membership__clinic=clinic)
    _, token = create_api_token(user=clinician, name="fault tests")
    model_version = register_model(checkpoint=tiny_checkpoint, version=f"faults-{uuid.uuid4().hex[:8]}", activate=True)
    return token, model_version


# --- images --------------------------------------------------------------------------------------


def lesion_jpeg(*, seed: int = 0, size: int = 96, malignant: bool = True, quality: int = 92, exif=None) -> bytes:
    import numpy as np

    from mlcore.data import generate_lesion

    image = generate_lesion(np.random.default_rng(seed), malignant=malignant, size=size).image
    buffer = io.BytesIO()
    kwargs = {"exif": exif} if exif is not None else {}
    image.save(buffer, format="JPEG", quality=quality, **kwargs)
    return buffer.getvalue()


def upload_file(data: bytes, name: str = "lesion.jpg", content_type: str = "image/jpeg"):
    from django.core.files.uploadedfile import SimpleUploadedFile

    return SimpleUploadedFile(name, data, content_type=content_type)


@pytest.fixture(autouse=True)
def _fresh_upload_folder(settings):
    """Files outlive a test's rolled-back transaction; start each test with no stored uploads."""
    import shutil

    shutil.rmtree(Path(settings.MEDIA_ROOT) / "images", ignore_errors=True)


def stored_image_files() -> list[Path]:
    from django.conf import settings

    folder = Path(settings.MEDIA_ROOT) / "images"
    return sorted(folder.glob("*")) if folder.exists() else []


# --- real worker processes -----------------------------------------------------------------------


def wait_for(predicate, timeout: float, interval: float = 0.2, message: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {message}")


def wait_until_serving(url: str, process: subprocess.Popen, log_path: Path, *, what: str = "gunicorn",
                       timeout: float = 60) -> None:  # fmt: skip
    """Wait until the web server at `url` answers GET /healthz with 200; fail with its log if it exits."""
    import httpx

    def up():
        assert process.poll() is None, f"{what} exited:\n{log_path.read_text(errors='replace')[-3000:]}"
        try:
            return httpx.get(f"{url}/healthz", timeout=2).status_code == 200
        except httpx.TransportError:
            return False

    wait_for(up, timeout, message=what)


class WorkerProcess:
    def __init__(self, process: subprocess.Popen, log_path: Path, name: str = ""):
        self.process = process
        self.log_path = log_path
        self.node = name.split("@")[0]  # claims are recorded as "<node>@<host>:<task id>"

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


def start_worker(*, env: dict[str, str], log_path: Path, queues: str, name: str) -> WorkerProcess:
    log = open(log_path, "wb")  # noqa: SIM115 - the worker writes to it until it stops
    process = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", queues, "--concurrency", "1",
         "--pool", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
         "--hostname", name],
        cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
    )  # fmt: skip
    worker = WorkerProcess(process, log_path, name)
    try:
        wait_for(lambda: " ready." in worker.log() or process.poll() is not None, 90, message="the worker to start")
    except AssertionError:
        process.kill()
        raise
    if process.poll() is not None:
        raise AssertionError(f"the worker exited at start:\n{worker.log()[-3000:]}")
    return worker


def stop_worker(worker: WorkerProcess) -> None:
    if worker.process.poll() is None:
        worker.process.terminate()
        try:
            worker.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            worker.process.kill()
            worker.process.wait()


@pytest.fixture(scope="session")
def worker_env(django_db_setup, redis_service, tmp_path_factory):
    """The environment a worker process needs to see exactly what the tests see."""
    from django.conf import settings

    database = settings.DATABASES["default"]
    database_url = (
        f"postgres://{database['USER']}:{database.get('PASSWORD') or ''}@{database['HOST']}:{database['PORT']}/"
        f"{database['NAME']}"
    )
    env = {
        **os.environ,
        "DJANGO_SETTINGS_MODULE": "webapp.settings.test",
        "DATABASE_URL": database_url,
        "CELERY_BROKER_URL": settings.CELERY_BROKER_URL,
        "MEDIA_ROOT": str(settings.MEDIA_ROOT),
        "MODEL_CACHE_DIR": str(tmp_path_factory.mktemp("worker-model-cache")),
        "CELERY_WORKER_CONCURRENCY": "1",
        "PIPELINE_BATCHES": "8",  # the GPU's default, on the CPU too: the real workers exercise the pipeline
        "PYTHONUNBUFFERED": "1",
    }
    from diagnosis.services import wakeups
    from webapp.celery import app

    with app.connection_for_write() as connection:  # start from empty queues
        for queue in ("inference", "explain", "default"):
            connection.default_channel.queue_purge(queue)
    wakeups.reset()  # and no wake-up counted for a purged message
    return env


@pytest.fixture(scope="session")
def celery_worker(worker_env, tmp_path_factory):
    """One real Celery worker process for predictions (prefork, like production's CPU worker) for the
    whole session. Explanations have their own worker (explain_worker)."""
    log_path = tmp_path_factory.mktemp("worker-logs") / "worker.log"
    worker = start_worker(
        env=worker_env, log_path=log_path, queues="inference,default", name=f"test-{uuid.uuid4().hex[:6]}@%h"
    )
    yield worker
    stop_worker(worker)


@pytest.fixture(scope="session")
def explain_worker(worker_env, tmp_path_factory):
    """A second real worker that consumes only the explain queue, as a CPU explanation worker would."""
    log_path = tmp_path_factory.mktemp("explain-worker-logs") / "worker.log"
    worker = start_worker(
        env=worker_env, log_path=log_path, queues="explain", name=f"explain-{uuid.uuid4().hex[:6]}@%h"
    )
    yield worker
    stop_worker(worker)
