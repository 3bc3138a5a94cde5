"""The batch engine (diagnosis.services.engine): a task keeps taking batches while work is queued, the
next batch is claimed while one is on the device, every claim stays exactly-once (also across two
pipelining workers, one of them killed mid-pipeline), and a batch finishes on the model it started with."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest
from django.db import connection, transaction
from django.test.utils import CaptureQueriesContext

from diagnosis.models import ImageState, LesionImage, Prediction
from diagnosis.services import predictions
from diagnosis.services.engine import Engine
from diagnosis.services.images import submit_image
from diagnosis.services.predictions import PredictionWork, process_images
from tests.conftest import lesion_jpeg, upload_file
from tests.test_faults import (
    SWEEPER_ENV,
    Processes,
    accepted,
    assert_each_upload_done_once,
    wait_ready,
    wait_showing_log,
)


def queued_images(clinic, clinician, count: int, seed: int = 0) -> list[str]:
    with transaction.atomic():  # no commit hook: nothing is published, the images just wait
        return [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=seed + i))).pk)
                for i in range(count)]  # fmt: skip


@pytest.fixture
def small_batches(settings):
    settings.AUTO_EXPLAIN_METHODS = []
    settings.INFERENCE_BATCH_SIZE = 2
    settings.PIPELINE_BATCHES = 3
    return settings


def test_a_task_keeps_taking_batches_while_photos_are_queued(clinic, clinician, active_model, small_batches):
    ids = queued_images(clinic, clinician, 7, seed=300)
    with CaptureQueriesContext(connection) as queries:
        outcomes = process_images(image_ids=[ids[0]], worker_id="pipe:1", gather=1)
    # Three batches of two (PIPELINE_BATCHES), oldest first; the seventh photo waits for the next message.
    assert outcomes == dict.fromkeys(ids[:6], "done")
    assert LesionImage.objects.get(pk=ids[6]).state == ImageState.QUEUED
    inserts = [q["sql"] for q in queries.captured_queries if q["sql"].startswith('INSERT INTO "diagnosis_prediction"')]
    assert len(inserts) == 3  # one per batch
    done = LesionImage.objects.filter(pk__in=ids[:6])
    assert set(done.values_list("claimed_by", flat=True)) == {"pipe:1"} and set(
        done.values_list("attempts", flat=True)
    ) == {1}
    per_batch = {}
    for prediction in Prediction.objects.filter(image_id__in=ids[:6]):
        per_batch.setdefault(prediction.inference_ms, set()).add(str(prediction.image_id))
    assert sorted(map(sorted, per_batch.values())) == sorted(sorted(ids[i : i + 2]) for i in (0, 2, 4))


def test_a_message_whose_photo_is_on_a_later_attempt_takes_no_more_batches(
    clinic, clinician, active_model, small_batches
):
    ids = queued_images(clinic, clinician, 4, seed=310)
    LesionImage.objects.filter(pk=ids[0]).update(attempts=1)  # its worker died on it once: it goes alone
    assert process_images(image_ids=[ids[0]], worker_id="pipe:2", gather=1) == {ids[0]: "done"}
    assert set(LesionImage.objects.filter(pk__in=ids[1:]).values_list("state", flat=True)) == {ImageState.QUEUED}


def test_the_next_batch_is_claimed_while_one_is_on_the_device(clinic, clinician, active_model, small_batches,
                                                              monkeypatch):  # fmt: skip
    """The device thread holds the first batch until the next one has been claimed: without pipelining
    the claim would come only after the first batch returned, and the wait below would run out."""
    ids = queued_images(clinic, clinician, 4, seed=320)
    claims = []
    second_claimed = threading.Event()
    real_claim = predictions.claim_oldest_queued

    def claim_and_note(**kwargs):  # the real claim, noted
        claimed = real_claim(**kwargs)
        claims.append(([str(image.pk) for image in claimed], threading.current_thread().name))
        if len(claims) == 2:
            second_claimed.set()
        return claimed

    monkeypatch.setattr(predictions, "claim_oldest_queued", claim_and_note)
    seen_on_device = []

    class Observed(PredictionWork):
        def run(self, predictor, group):
            seen_on_device.append(([str(image.pk) for image, _ in group], threading.current_thread().name,
                                   second_claimed.wait(30) if not seen_on_device else None))  # fmt: skip
            return super().run(predictor, group)

    outcomes = Engine(Observed(), ids=[ids[0]], worker_id="pipe:3", gather=1, pipeline=True).run()
    assert outcomes == dict.fromkeys(ids, "done")
    first_batch, device_thread, claimed_meanwhile = seen_on_device[0]
    assert first_batch == ids[:2] and claimed_meanwhile is True
    assert device_thread.startswith("device") and all(thread == "MainThread" for _, thread in claims)
    assert claims[1][0] == ids[2:4]
    assert seen_on_device[1][0] == ids[2:4]


def test_a_batch_in_flight_when_the_model_is_promoted_finishes_on_the_model_it_started_with(
    clinic, clinician, active_model, small_batches, tiny_checkpoint, monkeypatch
):
    from diagnosis.services.registry import activate_model, register_model

    newer = register_model(checkpoint=tiny_checkpoint, version="tiny-promoted", activate=False)
    ids = queued_images(clinic, clinician, 4, seed=330)
    real_claim = predictions.claim_oldest_queued
    calls = []

    def promote_then_claim(**kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first batch is on the device now: promote before the next is claimed
            activate_model(model_version=newer, force=True, note="promoted mid-pipeline")
        return real_claim(**kwargs)

    monkeypatch.setattr(predictions, "claim_oldest_queued", promote_then_claim)
    assert process_images(image_ids=[ids[0]], worker_id="pipe:4", gather=1) == dict.fromkeys(ids, "done")
    versions = dict(Prediction.objects.filter(image_id__in=ids).values_list("image_id", "model_version_id"))
    assert [versions[LesionImage.objects.get(pk=i).pk] for i in ids] == [active_model.pk] * 2 + [newer.pk] * 2
    assert Prediction.objects.filter(image_id__in=ids).count() == 4  # one each


def test_a_later_batch_whose_model_cannot_be_loaded_is_given_back_and_the_task_ends_with_its_own_done(
    clinic, clinician, active_model, small_batches, tiny_checkpoint, monkeypatch
):
    from django.core.files.storage import default_storage

    from diagnosis.models import ModelVersion
    from diagnosis.services.registry import activate_model, register_model

    broken = register_model(checkpoint=tiny_checkpoint, version="tiny-broken", activate=False)
    default_storage.delete(broken.weights.name)
    ModelVersion.objects.filter(pk=broken.pk).update(weights_sha256="e" * 64)  # in no local cache either
    ids = queued_images(clinic, clinician, 4, seed=360)
    real_claim = predictions.claim_oldest_queued
    calls = []

    def promote_then_claim(**kwargs):
        calls.append(1)
        if len(calls) == 2:
            activate_model(model_version=ModelVersion.objects.get(pk=broken.pk), force=True, note="broken")
        return real_claim(**kwargs)

    monkeypatch.setattr(predictions, "claim_oldest_queued", promote_then_claim)
    outcomes = process_images(image_ids=[ids[0]], worker_id="pipe:7", gather=1)  # does not raise
    assert outcomes == {ids[0]: "done", ids[1]: "done", ids[2]: "released", ids[3]: "released"}
    waiting = LesionImage.objects.filter(pk__in=ids[2:])
    assert set(waiting.values_list("state", flat=True)) == {ImageState.QUEUED}
    assert set(waiting.values_list("attempts", flat=True)) == {0}  # not counted against them


def test_a_database_error_mid_pipeline_gives_back_every_claim_without_an_outcome(
    clinic, clinician, active_model, small_batches, monkeypatch
):
    from django.db import OperationalError

    ids = queued_images(clinic, clinician, 6, seed=340)
    real_record = predictions.record_predictions
    recorded = []

    def record_once_then_fail(**kwargs):
        if recorded:
            raise OperationalError("server closed the connection unexpectedly")
        recorded.append(1)
        return real_record(**kwargs)

    monkeypatch.setattr(predictions, "record_predictions", record_once_then_fail)
    with pytest.raises(predictions.TransientError):
        process_images(image_ids=[ids[0]], worker_id="pipe:5", gather=1)
    states = dict(LesionImage.objects.filter(pk__in=ids).values_list("pk", "state"))
    done = [i for i in ids if states[LesionImage.objects.get(pk=i).pk] == ImageState.DONE]
    assert done == ids[:2]  # the first batch was recorded before the error
    waiting = LesionImage.objects.filter(pk__in=ids[2:])
    assert set(waiting.values_list("state", flat=True)) == {ImageState.QUEUED}  # nobody waits for the sweeper
    assert set(waiting.values_list("claimed_by", flat=True)) == {""} and set(
        waiting.values_list("attempts", flat=True)
    ) == {0}


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_worker_killed_mid_pipeline_loses_nothing_and_processes_nothing_twice(worker_env, faults_setup, tmp_path):
    """A worker takes batches of 4, pipelined, from 60 waiting uploads and is killed (-9, with its child)
    while it holds two batches' claims: one on the device, the next claimed. A second worker, whose
    embedded beat runs the sweeper, returns the dead claims; every upload ends done exactly once.
    (Two pipelining workers sharing uploads: tests/test_batching.py's 200 uploads.)"""

    token, model_version = faults_setup
    batch = 4
    with Processes(tmp_path) as processes:
        redis = processes.redis()
        env = {**worker_env, **SWEEPER_ENV, "CELERY_BROKER_URL": redis.url, "INFERENCE_BATCH_SIZE": str(batch),
               "PIPELINE_BATCHES": "100"}  # fmt: skip
        web = processes.web(env).wait_ready()
        with web.client(token) as client:  # all wait in the broker before the worker starts
            ids = [accepted(web, client, seed)["id"] for seed in range(60)]
        victim = wait_ready(processes.worker(env))
        images = LesionImage.objects.filter(pk__in=ids)
        mine = images.filter(claimed_by__startswith=f"{victim.node}@")

        def victim_mid_pipeline():
            if mine.filter(state=ImageState.DONE).count() < batch:
                return False  # it has finished a batch before
            # More claims than one batch: one on the device while the next is claimed.
            return mine.filter(state=ImageState.PROCESSING).count() > batch

        wait_showing_log(victim_mid_pipeline, 90, "the worker to hold two batches", victim, interval=0.002)
        os.killpg(victim.process.pid, signal.SIGKILL)  # the worker and its prefork child, no warm shutdown
        victim.process.wait(timeout=10)
        in_flight = set(map(str, mine.filter(state=ImageState.PROCESSING).values_list("pk", flat=True)))
        assert len(in_flight) > batch
        assert images.exclude(state=ImageState.DONE).count() > len(in_flight), "nothing was left to pipeline"

        survivor = wait_ready(processes.worker(env, beat=True))
        wait_showing_log(lambda: images.filter(state__in=[ImageState.DONE, ImageState.FAILED]).count() == len(ids),
                         90, "every upload to finish after the kill", survivor)  # fmt: skip
        time.sleep(2.5)  # let the sweeper's spare messages arrive: each must be a no-op
        assert_each_upload_done_once(ids, model_version, retried=frozenset(in_flight))
        for image in images.filter(pk__in=in_flight):
            assert image.claimed_by.startswith(f"{survivor.node}@")


def test_a_batch_measures_its_drift_features_in_the_decode_threads_with_the_same_values(
    clinic, clinician, active_model, small_batches
):
    from diagnosis.models import UploadFeatures
    from diagnosis.services import decoding
    from diagnosis.services.runtime import predictor_for
    from diagnosis.services.subgroup_monitoring import skin_tone_values
    from mlcore.drift import feature_thumbnail, image_features
    from mlcore.inference import decode_side

    predictor = predictor_for(active_model)
    side = decode_side(predictor.meta.input_size)
    data = lesion_jpeg(seed=350, size=300)
    batched = decoding._decode_and_prepare(data, predictor.spec, side, True)
    alone = decoding._decode_and_prepare(data, predictor.spec, side)
    assert alone.features is None and alone.drift_source() is alone.image  # measured after the prediction
    thumbnail = feature_thumbnail(alone.image)  # the drift features and the skin tone, from one thumbnail
    assert batched.features == {**image_features(alone.image), **skin_tone_values(thumbnail)}
    assert "skin_ita" in batched.features and batched.drift_source() is batched.features

    ids = queued_images(clinic, clinician, 2, seed=351)
    assert process_images(image_ids=[ids[0]], worker_id="pipe:6", gather=1) == dict.fromkeys(ids, "done")
    for image_id in ids:  # the same values whether measured in a decode thread or after the prediction
        image = LesionImage.objects.get(pk=image_id)
        with image.file.open("rb") as handle:
            expected = image_features(decoding._decode_and_prepare(handle.read(), predictor.spec, side).image)
        stored = UploadFeatures.objects.get(image=image).values
        assert {name: stored[name] for name in expected} == pytest.approx(expected, rel=1e-9)
