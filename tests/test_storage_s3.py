"""STORAGE_BACKEND=s3 end to end, against an S3-protocol server (moto's ThreadedMotoServer) started here.

Production's path exactly: a web process and a worker process, each configured from the environment
with the bucket's endpoint and credentials, talk to the server through boto3. The upload, the worker's
prediction, the Grad-CAM overlay, the download through the API, the weights cache and purge_patient
are checked against what the bucket itself lists. The processes use a private Redis, so no other
worker of the session (with local storage) can take their tasks.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import subprocess
import sys
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import httpx
import pytest

from diagnosis.models import AuditEvent, Explanation, ImageState, LesionImage, Patient
from tests.conftest import ROOT, WorkerProcess, lesion_jpeg, start_worker, stop_worker, upload_file
from tests.test_faults import Processes, WebServer, free_port, tail, wait_showing_log

BUCKET = "lesion-media-test"
REGION = "us-east-1"


@dataclass
class S3Bucket:
    endpoint: str
    name: str
    env: dict[str, str]  # what a process needs to use the bucket (STORAGE_BACKEND=s3 and the rest)

    def client(self):
        import boto3

        return boto3.client(
            "s3", endpoint_url=self.endpoint, region_name=REGION, aws_access_key_id=self.env["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=self.env["AWS_SECRET_ACCESS_KEY"],
        )  # fmt: skip

    def keys(self) -> set[str]:
        keys: set[str] = set()
        for page in self.client().get_paginator("list_objects").paginate(Bucket=self.name):
            keys.update(entry["Key"] for entry in page.get("Contents", ()))
        return keys

    def read(self, key: str) -> bytes:
        return self.client().get_object(Bucket=self.name, Key=key)["Body"].read()

    def storages(self, **changes: str) -> dict:
        """settings.STORAGES for this process with the bucket as default storage, built by the same
        code as production's settings from the same environment variables (changes override them)."""
        from django.conf import settings

        from webapp.settings.base import default_storage_from_env

        with pytest.MonkeyPatch.context() as patch:
            for name, value in {**self.env, **changes}.items():
                patch.setenv(name, value)
            return {**settings.STORAGES, "default": default_storage_from_env("s3", settings.MEDIA_ROOT)}


def moto_bucket():
    """Start an S3-protocol server on a free port with one private bucket; yields S3Bucket. A plain
    generator, so that another module can make it a fixture of its own (tests/test_two_machines.py)."""
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one line per request otherwise
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        bucket = S3Bucket(
            endpoint=f"http://127.0.0.1:{port}",
            name=BUCKET,
            env={
                "STORAGE_BACKEND": "s3",
                "S3_BUCKET": BUCKET,
                "S3_ENDPOINT_URL": f"http://127.0.0.1:{port}",
                "S3_REGION": REGION,
                "AWS_ACCESS_KEY_ID": "lesion-test-key",
                "AWS_SECRET_ACCESS_KEY": "lesion-test-secret",
            },
        )
        client = bucket.client()
        client.create_bucket(Bucket=BUCKET, ACL="private")
        # moto keeps its buckets process-wide, across servers: an earlier module's objects would still be
        # in a bucket of the same name. Every module starts from an empty one.
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET):
            for item in page.get("Contents", []):
                client.delete_object(Bucket=BUCKET, Key=item["Key"])
        yield bucket
    finally:
        server.stop()


s3_bucket = pytest.fixture(scope="module")(moto_bucket)


@dataclass
class S3Stack:
    bucket: S3Bucket
    env: dict[str, str]
    web: WebServer
    worker: WorkerProcess
    cache_dir: Path


@pytest.fixture(scope="module")
def s3_stack(worker_env, s3_bucket, tmp_path_factory):
    """A private Redis, a web process and a worker process (inference and default queues), both with
    STORAGE_BACKEND=s3; the worker has its own model cache and temporary folder."""
    folder = tmp_path_factory.mktemp("s3-stack")
    cache_dir, temp_dir = folder / "model-cache", folder / "tmp"
    temp_dir.mkdir()
    with Processes(folder) as processes:
        redis = processes.redis()
        env = {
            **worker_env,
            **s3_bucket.env,
            "CELERY_BROKER_URL": redis.url,
            "MODEL_CACHE_DIR": str(cache_dir),
            "TMPDIR": str(temp_dir),
            "AUTO_EXPLAIN_METHODS": "none",  # Grad-CAM only: nothing consumes the explain queue here
        }
        web = processes.web(env)
        worker = start_worker(env=env, log_path=folder / "worker.log", queues="inference,default",
                              name=f"s3-{uuid.uuid4().hex[:6]}@%h")  # fmt: skip
        try:
            yield S3Stack(bucket=s3_bucket, env=env, web=web.wait_ready(), worker=worker, cache_dir=cache_dir)
        finally:
            stop_worker(worker)


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_an_upload_lives_in_the_private_bucket_from_web_to_worker_to_download_until_purged(
    s3_stack, tiny_checkpoint, settings
):
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token
    from tests.factories import ClinicFactory, ClinicianFactory

    bucket, web = s3_stack.bucket, s3_stack.web
    settings.STORAGES = bucket.storages()  # this process registers the model: its weights go to the bucket
    sha256 = hashlib.sha256(tiny_checkpoint).hexdigest()
    model_version = register_model(checkpoint=tiny_checkpoint, version=f"s3-{uuid.uuid4().hex[:8]}", activate=True)
    assert model_version.weights.name.startswith(f"models/{sha256}")  # a suffix if another test stored it first
    assert bucket.read(model_version.weights.name) == tiny_checkpoint

    clinic = ClinicFactory(name=f"S3 clinic {uuid.uuid4().hex[:6]}")
    _, token = create_api_token(user=ClinicianFactory(membership__clinic=clinic), name="s3 test")
    before_upload = bucket.keys()
    with web.client(token) as client:
        ready = client.get("/readyz")
        assert ready.status_code == 200, ready.text
        assert ready.json()["checks"]["storage"]["ok"] is True

        patient = client.post("/api/v1/patients/", json={"reference": "PT-S3-0001"})
        assert patient.status_code == 201, patient.text
        lesion = client.post("/api/v1/lesions/", json={"patient": patient.json()["id"], "body_site": "back"})
        assert lesion.status_code == 201, lesion.text
        photo = ("lesion.jpg", lesion_jpeg(seed=5, size=96), "image/jpeg")
        response = client.post("/api/v1/images/", files={"image": photo}, data={"lesion": lesion.json()["id"]})
        assert response.status_code == 202, (response.text, tail(web.log_path))
        image_id = response.json()["id"]

        image = LesionImage.objects.filter(pk=image_id)
        wait_showing_log(lambda: image.filter(state__in=[ImageState.DONE, ImageState.FAILED]).exists(), 60,
                         "the worker to predict the upload", s3_stack.worker)  # fmt: skip
        image = image.get()
        assert image.state == ImageState.DONE, image.error
        gradcam = Explanation.objects.filter(image=image, method="gradcam")
        wait_showing_log(lambda: gradcam.filter(state=Explanation.State.DONE).exists(), 60,
                         "the Grad-CAM pictures", s3_stack.worker)  # fmt: skip
        gradcam = gradcam.get()
        assert client.get(f"/api/v1/images/{image_id}/").json()["state"] == "done"
        # The pictures are drawn at their first view (GRADCAM_PICTURES=on_view), by the web server, into the bucket.
        overlay = client.get(f"/api/v1/explanations/{gradcam.pk}/overlay/")
        assert overlay.status_code == 200, overlay.text
        gradcam.refresh_from_db()

        # Everything of the upload is in the bucket, nowhere else.
        stored = {image.file.name, gradcam.overlay.name, gradcam.heatmap.name, gradcam.attribution.name}
        added = bucket.keys() - before_upload
        assert stored <= added, (stored, added)
        assert not (Path(settings.MEDIA_ROOT) / image.file.name).exists()

        download = client.get(f"/api/v1/images/{image_id}/file/")
        assert download.status_code == 200, download.text
        assert download.content == bucket.read(image.file.name) and download.content[:2] == b"\xff\xd8"
        assert overlay.content == bucket.read(gradcam.overlay.name) and overlay.content[:2] == b"\xff\xd8"

    # The bucket is private: the objects' plain URLs refuse an unsigned request. (moto does not apply
    # ACLs to listing the bucket, so that is not asserted here; MinIO and S3 refuse it too.)
    for key in (image.file.name, gradcam.overlay.name, model_version.weights.name):
        assert httpx.get(f"{bucket.endpoint}/{bucket.name}/{key}").status_code == 403

    # The worker read the weights from the bucket into its own cache, under their SHA-256.
    cached = s3_stack.cache_dir / f"{sha256}.pt"
    assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == sha256
    assert [path.name for path in s3_stack.cache_dir.iterdir()] == [cached.name]  # no partial download left

    # Erasing the patient, as an operator would, leaves none of the upload's objects in the bucket.
    purge = subprocess.run(
        [sys.executable, "manage.py", "purge_patient", "PT-S3-0001", "--clinic", clinic.name, "--yes"],
        cwd=ROOT, env={**s3_stack.env, "DJANGO_SETTINGS_MODULE": "webapp.settings.test"}, capture_output=True,
        text=True, timeout=120,
    )  # fmt: skip
    assert purge.returncode == 0, purge.stdout + purge.stderr
    assert "4 stored files" in purge.stdout, purge.stdout
    remaining = bucket.keys()
    assert not added & remaining, added & remaining
    assert model_version.weights.name in remaining  # the model is no patient's
    assert not Patient.objects.filter(reference="PT-S3-0001").exists()
    assert not LesionImage.objects.filter(pk=image_id).exists()


@pytest.fixture
def bucket_image(s3_bucket, settings, clinic, clinician, active_model):
    """An image and a finished explanation of it, both stored in the bucket by this process."""
    from django.core.files.base import ContentFile
    from django.core.files.storage import default_storage

    from diagnosis.services.images import submit_image

    settings.STORAGES = s3_bucket.storages()
    image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=8)))
    assert s3_bucket.read(image.file.name)[:2] == b"\xff\xd8"  # stored in the bucket
    overlay_name = default_storage.save(f"explanations/{uuid.uuid4().hex}/overlay.png", ContentFile(PNG))
    explanation = Explanation.objects.create(
        image=image, model_version=active_model, method="gradcam", params_key="k" * 64, target_index=1,
        target_class="malignant", state=Explanation.State.DONE, overlay=overlay_name,
    )  # fmt: skip
    return image, explanation


def png_bytes() -> bytes:
    import io

    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGBA", (8, 8), (255, 0, 0, 128)).save(buffer, format="PNG")
    return buffer.getvalue()


PNG = png_bytes()


def test_presigned_redirect_comes_after_the_clinic_check_and_the_audit_record(
    s3_bucket, bucket_image, settings, clinician, api_client, other_api_client
):
    image, explanation = bucket_image
    settings.MEDIA_PRESIGNED_REDIRECT = True
    settings.S3_PRESIGNED_URL_SECONDS = 45
    downloads = AuditEvent.objects.filter(action=AuditEvent.Action.DOWNLOAD_IMAGE, object_id=str(image.pk))

    # Another clinic: 404, no URL, nothing audited.
    refused = other_api_client.get(f"/api/v1/images/{image.pk}/file/")
    assert refused.status_code == 404 and "Location" not in refused
    assert other_api_client.get(f"/api/v1/explanations/{explanation.pk}/overlay/").status_code == 404
    assert not downloads.exists()

    response = api_client.get(f"/api/v1/images/{image.pk}/file/")
    assert response.status_code == 302
    assert response["Cache-Control"] == "private, no-store"
    assert downloads.filter(actor=clinician).count() == 1  # audited before the URL was handed out
    location = urlparse(response["Location"])
    query = parse_qs(location.query)
    assert f"{location.scheme}://{location.netloc}" == s3_bucket.endpoint
    assert query["X-Amz-Expires"] == ["45"] and query["X-Amz-Signature"]  # signed, short-lived
    assert query["response-content-disposition"] == [f'attachment; filename="lesion-image-{image.pk}.jpg"']
    fetched = httpx.get(response["Location"])
    assert fetched.status_code == 200 and fetched.content == s3_bucket.read(image.file.name)
    assert fetched.headers["content-disposition"].startswith("attachment")
    assert httpx.get(f"{s3_bucket.endpoint}/{s3_bucket.name}/{image.file.name}").status_code == 403

    overlay = api_client.get(f"/api/v1/explanations/{explanation.pk}/overlay/")
    assert overlay.status_code == 302
    assert httpx.get(overlay["Location"]).content == PNG

    # Off (the default): the same request streams the bytes through the app.
    settings.MEDIA_PRESIGNED_REDIRECT = False
    streamed = api_client.get(f"/api/v1/images/{image.pk}/file/")
    assert streamed.status_code == 200 and b"".join(streamed.streaming_content) == fetched.content


def test_the_portal_streams_photos_and_heatmaps_from_the_bucket(bucket_image, client, clinician, other_clinician):
    from django.urls import reverse

    image, explanation = bucket_image
    photo_url = reverse("portal:image-photo", args=[image.pk])
    overlay_url = reverse("portal:explanation-file", args=[explanation.pk, "overlay"])
    client.force_login(other_clinician)
    assert client.get(photo_url).status_code == 404 and client.get(overlay_url).status_code == 404

    client.force_login(clinician)
    for size in ("thumb", "display"):
        picture = client.get(photo_url, {"size": size})
        assert picture.status_code == 200 and picture.content[:2] == b"\xff\xd8", size
    original = client.get(photo_url, {"size": "original"})
    assert original.status_code == 200 and b"".join(original.streaming_content)[:2] == b"\xff\xd8"
    overlay = client.get(overlay_url)
    assert overlay.status_code == 200 and b"".join(overlay.streaming_content) == PNG


def closed_port() -> int:
    with socket.socket() as probe:  # bound, never listening: a connection is refused at once
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_readyz_checks_the_bucket(s3_bucket, settings, client, active_model, redis_service):
    settings.STORAGES = s3_bucket.storages()
    ok = client.get("/readyz")
    assert ok.status_code == 200, ok.json()
    assert ok.json()["checks"]["storage"]["ok"] is True

    settings.STORAGES = s3_bucket.storages(S3_BUCKET="no-such-bucket")
    missing = client.get("/readyz")
    assert missing.status_code == 503
    assert missing.json()["checks"]["storage"]["ok"] is False

    port = closed_port()
    settings.STORAGES = s3_bucket.storages(S3_ENDPOINT_URL=f"http://127.0.0.1:{port}", S3_MAX_ATTEMPTS="1")
    down = client.get("/readyz")
    assert down.status_code == 503
    storage = down.json()["checks"]["storage"]
    assert storage["ok"] is False and "storage unreachable" in storage["error"]
    assert str(port) not in down.content.decode()  # the details stay in the log


def test_cached_weights_are_fetched_from_the_bucket_once_and_verified(s3_bucket, settings, tmp_path, tiny_checkpoint,
                                                                      db):  # fmt: skip
    """Several workers of one machine may fill the cache at once: each writes a temporary file and renames
    it, so the cached file is always whole; a corrupted object in the bucket is refused."""
    from django.core.exceptions import ValidationError

    from diagnosis.services.registry import cached_weights_path, register_model

    settings.STORAGES = s3_bucket.storages()
    settings.MODEL_CACHE_DIR = str(tmp_path)
    model_version = register_model(checkpoint=tiny_checkpoint, version=f"cache-{uuid.uuid4().hex[:8]}")
    with ThreadPoolExecutor(4) as pool:
        paths = set(pool.map(lambda _: cached_weights_path(model_version), range(4)))
    assert paths == {tmp_path / f"{model_version.weights_sha256}.pt"}
    assert Path(next(iter(paths))).read_bytes() == tiny_checkpoint
    assert sorted(path.name for path in tmp_path.iterdir()) == [f"{model_version.weights_sha256}.pt"]

    s3_bucket.client().put_object(Bucket=s3_bucket.name, Key=model_version.weights.name, Body=b"tampered")
    settings.MODEL_CACHE_DIR = str(tmp_path / "other-machine")
    with pytest.raises(ValidationError, match="do not match their SHA-256"):
        cached_weights_path(model_version)
    assert list((tmp_path / "other-machine").iterdir()) == []


def test_an_unreachable_bucket_gives_the_claim_back_for_a_retry(s3_bucket, settings, clinic, clinician, active_model):
    """The bucket briefly down is never the photo's fault: the claim is given back (not counted as an
    attempt) and the task retries; once the bucket answers again, the photo is predicted."""
    from diagnosis.services.images import submit_image
    from diagnosis.services.predictions import TransientError, predictor_for, process_images

    predictor_for(active_model)  # loaded (from local storage) first: only the photo's read meets the outage
    settings.STORAGES = s3_bucket.storages()
    settings.AUTO_EXPLAIN_METHODS = []
    image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=9)))
    settings.STORAGES = s3_bucket.storages(S3_ENDPOINT_URL=f"http://127.0.0.1:{closed_port()}", S3_MAX_ATTEMPTS="1")
    with pytest.raises(TransientError):
        process_images(image_ids=[str(image.pk)], worker_id="outage:1")
    image.refresh_from_db()
    assert (image.state, image.claimed_by, image.attempts, image.error) == (ImageState.QUEUED, "", 0, "")

    settings.STORAGES = s3_bucket.storages()
    assert process_images(image_ids=[str(image.pk)], worker_id="back:2") == {str(image.pk): "done"}
