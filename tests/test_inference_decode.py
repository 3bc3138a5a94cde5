"""The inference worker's decode paths: Pillow (CPU workers) and torchvision's decode_jpeg (GPU workers,
nvJPEG), which INFERENCE_DECODE=torchvision also runs on the CPU, so the GPU path is covered here;
and the warm-up an inference worker process does when it starts."""

from __future__ import annotations

import io
import uuid

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction
from PIL import Image

from diagnosis.models import ImageState, LesionImage, Prediction, UploadFeatures
from diagnosis.services.decoding import tensor_decoding
from diagnosis.services.images import submit_image
from diagnosis.services.predictions import predictor_for, process_images, warm_up_worker
from tests.conftest import lesion_jpeg, start_worker, stop_worker, token_client, upload_file, wait_for


def _rotated_jpeg(seed: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg(seed=seed, size=120))).save(buffer, format="JPEG", quality=92, exif=exif)
    return buffer.getvalue()


def _png(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.open(io.BytesIO(lesion_jpeg(seed=seed))).save(buffer, format="PNG")
    return buffer.getvalue()


def queue(clinic, clinician, payloads: list[bytes]) -> list[str]:
    with transaction.atomic():  # no commit hook: nothing is published, the images just wait
        return [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(data)).pk) for data in payloads]


def _probabilities(ids: list[str]) -> list[float]:
    by_image = dict(Prediction.objects.values_list("image_id", "probability_malignant"))
    return [by_image[uuid.UUID(image_id)] for image_id in ids]


def test_torchvision_decoding_gives_the_pillow_predictions_and_isolates_a_damaged_file(
    clinic, clinician, active_model, settings
):
    settings.AUTO_EXPLAIN_METHODS = []
    payloads = [lesion_jpeg(seed=1), _rotated_jpeg(2), _png(3), lesion_jpeg(seed=4)]

    settings.INFERENCE_DECODE = "pillow"
    pillow_ids = queue(clinic, clinician, payloads)
    assert set(process_images(image_ids=pillow_ids, worker_id="pillow:1").values()) == {"done"}

    settings.INFERENCE_DECODE = "torchvision"
    assert tensor_decoding(predictor_for(active_model))
    ids = queue(clinic, clinician, [*payloads, lesion_jpeg(seed=5)])
    damaged = LesionImage.objects.get(pk=ids[4])
    default_storage.delete(damaged.file.name)
    default_storage.save(damaged.file.name, ContentFile(lesion_jpeg(seed=5)[:300]))

    outcomes = process_images(image_ids=ids, worker_id="tv:1")
    assert outcomes == {ids[0]: "done", ids[1]: "done", ids[2]: "done", ids[3]: "done", ids[4]: "failed"}
    damaged.refresh_from_db()
    assert "could not be decoded" in damaged.error  # Pillow's words, not torchvision's
    # The same photos, decoded two ways (nvJPEG's path ran on the CPU here), give the same risks to
    # within the resize's rounding; the rotated one is turned the same way by both.
    for by_pillow, by_torchvision in zip(_probabilities(pillow_ids), _probabilities(ids[:4]), strict=True):
        assert by_torchvision == pytest.approx(by_pillow, abs=0.02)
    features = UploadFeatures.objects.get(image_id=ids[1]).values
    assert (features["width"], features["height"]) == (120, 120) and features["brightness"] > 0


def test_auto_decoding_uses_pillow_on_the_cpu(active_model, settings):
    settings.INFERENCE_DECODE = "auto"
    assert predictor_for(active_model).device.type == "cpu" and not tensor_decoding(predictor_for(active_model))
    settings.INFERENCE_DECODE = "pillow"
    assert not tensor_decoding(predictor_for(active_model))


def test_warm_up_runs_only_on_inference_workers_with_an_active_model(db, settings, tiny_checkpoint):
    settings.INFERENCE_WARMUP = True
    assert warm_up_worker({"inference": None}) is None  # no model is active yet: nothing to warm
    from diagnosis.services.registry import register_model

    register_model(checkpoint=tiny_checkpoint, version="warm-1", activate=True)
    assert warm_up_worker({"explain": None, "default": None}) is None
    assert warm_up_worker({"inference": None, "default": None}) > 0
    settings.INFERENCE_WARMUP = False
    assert warm_up_worker({"inference": None}) is None


@pytest.mark.django_db(transaction=True)
def test_a_worker_warms_up_at_start_and_decodes_with_torchvision(worker_env, tmp_path, clinic, clinician,
                                                                  tiny_checkpoint, monkeypatch):  # fmt: skip
    from diagnosis.services.registry import register_model
    from diagnosis.tasks import predict_image_task

    register_model(checkpoint=tiny_checkpoint, version="warm-2", activate=True)
    queue_name = f"inference-tv-{uuid.uuid4().hex[:6]}"  # its own queue: the session's worker cannot take it
    worker = start_worker(env={**worker_env, "INFERENCE_DECODE": "torchvision", "AUTO_EXPLAIN_METHODS": "none"},
                          log_path=tmp_path / "worker.log", queues=f"inference,{queue_name}",
                          name=f"tv-{uuid.uuid4().hex[:6]}@%h")  # fmt: skip
    try:
        wait_for(lambda: "warmed up model warm-2" in worker.log(), 60, message="the warm-up in the worker's log")
        monkeypatch.setattr(
            "diagnosis.services.images.announce_upload",
            lambda image_id, **_: predict_image_task.apply_async(args=[image_id], queue=queue_name),
        )
        client = token_client(clinician)
        response = client.post("/api/v1/images/", {"image": upload_file(_rotated_jpeg(7))}, format="multipart")
        assert response.status_code == 202, response.content
        image_id = response.json()["id"]
        wait_for(lambda: LesionImage.objects.get(pk=image_id).state in (ImageState.DONE, ImageState.FAILED), 60,
                 message="the upload to be processed")  # fmt: skip
        image = LesionImage.objects.get(pk=image_id)
        assert image.state == ImageState.DONE, image.error
        assert image.claimed_by.startswith(worker.node)
        assert Prediction.objects.filter(image=image).count() == 1
        assert "JPEG decoding for the model on cpu: torchvision" in worker.log()
    finally:
        stop_worker(worker)


@pytest.mark.django_db(transaction=True)
def test_an_idle_worker_decodes_an_upload_named_in_its_message_before_the_claim(
    worker_env, tmp_path, clinic, clinician, tiny_checkpoint, monkeypatch
):
    # A real worker process and the real broker: the message header reaches the task, and the photo
    # decoded ahead is the one predicted.
    from diagnosis.services.registry import register_model
    from diagnosis.tasks import UPLOAD_FILE_HEADER, predict_image_task

    register_model(checkpoint=tiny_checkpoint, version="ahead-1", activate=True)
    queue_name = f"inference-ahead-{uuid.uuid4().hex[:6]}"  # its own queue: the session's worker cannot take it
    # Idle as soon as no batch is in progress: this test sends the next upload the moment one is done.
    env = {**worker_env, "AUTO_EXPLAIN_METHODS": "none", "INFERENCE_DECODE_AHEAD_IDLE_MS": "0"}
    worker = start_worker(env=env, log_path=tmp_path / "worker.log", queues=f"inference,{queue_name}",
                          name=f"ahead-{uuid.uuid4().hex[:6]}@%h")  # fmt: skip
    try:
        wait_for(lambda: "warmed up model ahead-1" in worker.log(), 60, message="the warm-up in the worker's log")

        def publish(image_id, *, file=""):  # enqueue_prediction's message, to this worker's own queue
            predict_image_task.apply_async(args=[image_id], queue=queue_name, headers={UPLOAD_FILE_HEADER: file})

        monkeypatch.setattr("diagnosis.services.images.enqueue_prediction", publish)
        client = token_client(clinician)
        ids = []
        for seed in (21, 22):
            response = client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=seed))},
                                   format="multipart")  # fmt: skip
            assert response.status_code == 202, response.content
            ids.append(response.json()["id"])
            wait_for(lambda i=ids[-1]: LesionImage.objects.get(pk=i).state in (ImageState.DONE, ImageState.FAILED),
                     60, message="the upload to be processed")  # fmt: skip
        for image_id in ids:
            image = LesionImage.objects.get(pk=image_id)
            assert image.state == ImageState.DONE and image.claimed_by.startswith(worker.node), image.error
            assert Prediction.objects.filter(image=image).count() == 1
            assert f"image {image_id}: its photo was being decoded before the claim" in worker.log()
    finally:
        stop_worker(worker)
