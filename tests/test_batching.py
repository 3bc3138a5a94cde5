"""Batching across uploads: a task takes its image plus other queued ones as one batch, with the
per-image state machine intact (one prediction per image, one claim each, faults isolated)."""

from __future__ import annotations

import uuid

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from diagnosis.models import ImageState, LesionImage, Prediction
from diagnosis.services.images import submit_image
from diagnosis.services.predictions import claim_oldest_queued, claim_queued, process_images
from tests.conftest import lesion_jpeg, start_worker, stop_worker, token_client, upload_file, wait_for


def queued_images(clinic, clinician, count: int, seed: int = 0) -> list[str]:
    with transaction.atomic():  # no commit hook: nothing is published, the images just wait
        return [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=seed + i))).pk)
                for i in range(count)]  # fmt: skip


def test_gather_claims_the_oldest_queued_images_but_not_its_own(clinic, clinician):
    ids = queued_images(clinic, clinician, 7)
    LesionImage.objects.filter(pk=ids[6]).update(state=ImageState.DONE)
    LesionImage.objects.filter(pk=ids[5]).update(attempts=1)  # tried before: it goes alone
    assert claim_oldest_queued(limit=0, worker_id="w:0", exclude=[ids[0]]) == []

    first = claim_oldest_queued(limit=2, worker_id="w:1", exclude=[ids[0]])  # one statement
    assert [str(image.pk) for image in first] == ids[1:3]
    assert all(image.state == ImageState.PROCESSING and image.claimed_by == "w:1" and image.attempts == 1
               for image in first)  # fmt: skip
    assert first[0].clinic == clinic
    # A second worker gets only those still queued: nothing is claimed twice.
    assert [str(image.pk) for image in claim_oldest_queued(limit=10, worker_id="w:2", exclude=[ids[0]])] == ids[3:5]
    assert claim_oldest_queued(limit=10, worker_id="w:3", exclude=[ids[0]]) == []
    # Claiming given ids (one statement too) takes only those still queued and never attempted.
    assert claim_queued(image_ids=ids[1:6], worker_id="w:4") == []
    assert claim_queued(image_ids=[], worker_id="w:4") == []
    assert [str(image.pk) for image in claim_queued(image_ids=ids, worker_id="w:5")] == [ids[0]]
    states = dict(LesionImage.objects.filter(pk__in=ids).values_list("pk", "claimed_by"))
    assert [states[uuid.UUID(i)] for i in ids] == ["w:5", "w:1", "w:1", "w:2", "w:2", "", ""]


def test_a_database_error_after_gathering_gives_every_claim_back(clinic, clinician, active_model, monkeypatch):
    from django.db import OperationalError

    from diagnosis.services import predictions

    ids = queued_images(clinic, clinician, 4, seed=30)
    original = predictions.claim_oldest_queued

    def claims_then_fails(**kwargs):
        original(**kwargs)  # the UPDATE went through
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(predictions, "claim_oldest_queued", claims_then_fails)
    with pytest.raises(predictions.TransientError):
        process_images(image_ids=[ids[0]], worker_id="w:9", gather=3)
    rows = LesionImage.objects.filter(pk__in=ids)
    assert {row.state for row in rows} == {ImageState.QUEUED}  # nobody waits for the sweeper
    assert {row.claimed_by for row in rows} == {""} and {row.attempts for row in rows} == {0}


def test_one_batch_records_every_image_and_a_damaged_one_fails_alone(clinic, clinician, active_model, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    ids = queued_images(clinic, clinician, 5, seed=10)
    damaged = LesionImage.objects.get(pk=ids[2])
    default_storage.delete(damaged.file.name)
    default_storage.save(damaged.file.name, ContentFile(lesion_jpeg(seed=12)[:300]))

    outcomes = process_images(image_ids=ids, worker_id="batcher:1")
    assert outcomes == {ids[0]: "done", ids[1]: "done", ids[2]: "failed", ids[3]: "done", ids[4]: "done"}
    damaged.refresh_from_db()
    assert damaged.state == ImageState.FAILED and "could not be decoded" in damaged.error
    assert Prediction.objects.filter(model_version=active_model).count() == 4
    done = LesionImage.objects.filter(state=ImageState.DONE)
    assert done.count() == 4 and set(done.values_list("claimed_by", flat=True)) == {"batcher:1"}
    # One forward pass for the batch: every prediction of it records the same time per image.
    assert len(set(Prediction.objects.values_list("inference_ms", flat=True))) == 1
    # Each image's own message, arriving later, finds it finished.
    assert process_images(image_ids=[ids[1]], worker_id="late:2") == {ids[1]: "skipped"}


def test_images_claimed_by_another_worker_are_left_alone(clinic, clinician, active_model, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    ids = queued_images(clinic, clinician, 3, seed=20)
    from diagnosis.services.images import claim_image

    assert claim_image(image_id=ids[1], worker_id="other:9") is not None
    outcomes = process_images(image_ids=ids, worker_id="me:1")
    assert outcomes[ids[1]] == "skipped" and outcomes[ids[0]] == outcomes[ids[2]] == "done"
    assert LesionImage.objects.get(pk=ids[1]).state == ImageState.PROCESSING  # still the other worker's


@pytest.mark.django_db(transaction=True)
@pytest.mark.parametrize("coalesce", [0, 4], ids=["a-message-per-upload", "coalesced-wake-ups"])
def test_two_hundred_uploads_across_two_workers_get_exactly_one_prediction_each(
    celery_worker, worker_env, tiny_checkpoint, tmp_path_factory, settings, coalesce
):
    """With a message per upload, and with coalesced wake-ups (at most 4 messages waiting). The uploads
    are committed together, so that both workers are busy from the start rather than one keeping up
    alone with uploads that arrive one by one (and gathering them before the other sees any)."""
    from diagnosis.services.registry import register_model
    from tests.factories import ClinicFactory, ClinicianFactory

    settings.INFERENCE_COALESCE_MESSAGES = coalesce
    clinic = ClinicFactory(name="Batching clinic")
    client = token_client(ClinicianFactory(membership__clinic=clinic))
    model_version = register_model(checkpoint=tiny_checkpoint, version="batching-tiny", activate=True)
    second = start_worker(env={**worker_env, "AUTO_EXPLAIN_METHODS": "none"},
                          log_path=tmp_path_factory.mktemp("second-worker") / "worker.log", queues="inference",
                          name=f"second-{uuid.uuid4().hex[:6]}@%h")  # fmt: skip
    try:
        # Both warmed up before the uploads: a worker still loading its model would find them all taken by
        # the other one, whose task keeps claiming batches while photos are queued (services.engine).
        wait_for(lambda: "warmed up model" in second.log(), 60, message="the second worker's warm-up")
        photos = [lesion_jpeg(seed=seed, size=64) for seed in range(10)]
        ids = []
        with transaction.atomic():
            for index in range(200):
                response = client.post("/api/v1/images/", {"image": upload_file(photos[index % 10])},
                                       format="multipart")  # fmt: skip
                assert response.status_code == 202
                ids.append(response.json()["id"])
        images = LesionImage.objects.filter(pk__in=ids)
        wait_for(lambda: images.filter(state=ImageState.DONE).count() == 200, 180, interval=0.5,
                 message="all 200 uploads to be done")  # fmt: skip
    finally:
        stop_worker(second)
        from diagnosis.services import wakeups
        from webapp.celery import app

        # Messages still waiting (each a no-op claim by now): drop them, so the session's worker is not
        # busy with them during later tests.
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge("inference")
        wakeups.reset()
    predictions = Prediction.objects.filter(image_id__in=ids, model_version=model_version)
    assert predictions.count() == 200
    assert predictions.values("image_id").distinct().count() == 200
    assert set(images.values_list("attempts", flat=True)) == {1}  # each claimed once
    claims = set(images.values_list("claimed_by", flat=True))
    workers = {claim.split("@")[0] for claim in claims}
    assert len(workers) == 2, workers  # both workers took a share
    assert len(claims) < 200  # and at least some images went through in a batch with others
    if coalesce:  # a task kept taking batches while photos were queued (pipelined): more claims than a batch
        claimed = list(images.values_list("claimed_by", flat=True))
        assert max(claimed.count(claim) for claim in claims) > settings.INFERENCE_BATCH_SIZE


def test_a_task_gathers_only_when_its_own_image_is_fresh(clinic, clinician, active_model, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    first = queued_images(clinic, clinician, 3, seed=30)
    outcomes = process_images(image_ids=[first[0]], worker_id="t:1", gather=5)
    assert outcomes == dict.fromkeys(first, "done")  # its own image and the two waiting ones, as one batch

    waiting = queued_images(clinic, clinician, 2, seed=40)
    # A late message for an image that is already done does no other work: the waiting ones stay queued.
    assert process_images(image_ids=[first[1]], worker_id="t:2", gather=5) == {first[1]: "skipped"}
    assert set(LesionImage.objects.filter(pk__in=waiting).values_list("state", flat=True)) == {ImageState.QUEUED}
    # An image on its second attempt (its worker died) goes alone, and never-attempted ones are not
    # put at risk with it.
    LesionImage.objects.filter(pk=waiting[0]).update(attempts=1)
    assert process_images(image_ids=[waiting[0]], worker_id="t:3", gather=5) == {waiting[0]: "done"}
    assert LesionImage.objects.get(pk=waiting[1]).state == ImageState.QUEUED


def test_a_batch_is_recorded_with_one_insert_per_table(clinic, clinician, active_model, settings):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    from diagnosis.models import Explanation, UploadFeatures

    settings.AUTO_EXPLAIN_METHODS = []
    ids = queued_images(clinic, clinician, 6, seed=50)
    with CaptureQueriesContext(connection) as queries:
        assert process_images(image_ids=ids, worker_id="bulk:1") == dict.fromkeys(ids, "done")
    inserts = [q["sql"].split('"')[1] for q in queries.captured_queries if q["sql"].startswith("INSERT INTO")]
    assert sorted(inserts) == ["diagnosis_explanation", "diagnosis_prediction", "diagnosis_uploadfeatures"]
    assert Prediction.objects.filter(image_id__in=ids).count() == 6
    gradcams = Explanation.objects.filter(image_id__in=ids, method="gradcam")
    assert gradcams.count() == 6 and all(default_storage.exists(row.attribution.name) for row in gradcams)
    assert UploadFeatures.objects.filter(image_id__in=ids).count() == 6
    assert len({tuple(row.values.items()) for row in UploadFeatures.objects.filter(image_id__in=ids)}) == 6


def test_a_claim_taken_over_during_the_forward_pass_is_left_to_its_new_owner(clinic, clinician, active_model):
    from diagnosis.services.predictions import record_predictions
    from mlcore.inference import PredictionResult

    ids = queued_images(clinic, clinician, 3, seed=60)
    images = claim_queued(image_ids=ids, worker_id="slow:1")
    # Another worker took the middle one over (its claim looked stale) while this one was predicting.
    LesionImage.objects.filter(pk=ids[1]).update(claimed_by="new:2")
    results = [PredictionResult(probability_malignant=p, label="malignant" if p >= 0.5 else "benign", threshold=0.5,
                                probabilities={"benign": 1 - p, "malignant": p}) for p in (0.9, 0.8, 0.1)]  # fmt: skip
    stored = record_predictions(images=images, model_version=active_model, results=results, inference_ms=3.0,
                                worker_id="slow:1")  # fmt: skip
    assert [row is not None for row in stored] == [True, False, True]
    assert [row.probability_malignant for row in stored if row is not None] == [0.9, 0.1]
    rows = {str(row.pk): row for row in LesionImage.objects.filter(pk__in=ids)}
    assert rows[ids[0]].state == rows[ids[2]].state == ImageState.DONE
    assert rows[ids[1]].state == ImageState.PROCESSING and rows[ids[1]].claimed_by == "new:2"
    assert not Prediction.objects.filter(image_id=ids[1]).exists()
    # Recording the same batch again (a redelivered message) replaces, never duplicates.
    again = record_predictions(images=[images[0]], model_version=active_model, results=[results[2]], inference_ms=1.0)
    assert again[0].probability_malignant == 0.1
    assert Prediction.objects.filter(image_id=ids[0]).count() == 1


def test_a_batch_of_grad_cams_with_one_already_stored_keeps_one_row_each_and_no_stray_file(
    clinic, clinician, active_model, settings
):
    import numpy as np

    from diagnosis.models import Explanation
    from diagnosis.services.explanation_files import record_gradcams
    from mlcore.inference import PredictionResult

    settings.AUTO_EXPLAIN_METHODS = []
    ids = queued_images(clinic, clinician, 3, seed=70)
    assert process_images(image_ids=[ids[0]], worker_id="first:1") == {ids[0]: "done"}
    existing = Explanation.objects.get(image_id=ids[0], method="gradcam")
    Explanation.objects.filter(pk=existing.pk).update(state=Explanation.State.DONE)
    images = list(LesionImage.objects.filter(pk__in=ids).order_by("created_at"))
    label = existing.target_class
    result = PredictionResult(probability_malignant=0.7, label=label, threshold=0.5,
                              probabilities={"benign": 0.3, "malignant": 0.7})  # fmt: skip
    cam = np.linspace(0, 1, 49, dtype=np.float32).reshape(7, 7)
    before = stored_files("explanations")
    record_gradcams([(image, result, cam) for image in images], model_version=active_model, seconds=0.01)
    rows = Explanation.objects.filter(image_id__in=ids, method="gradcam")
    assert rows.count() == 3 and rows.values("image_id").distinct().count() == 3
    assert Explanation.objects.get(pk=existing.pk).attribution.name == existing.attribution.name  # untouched
    # The batch's INSERT failed on the stored one and each image went alone; the maps are kept in the rows
    # (drawn into files later, on the default queue): recording writes no file at all.
    assert stored_files("explanations") == before
    assert all(row.raw_map is not None for row in rows.exclude(pk=existing.pk))


def stored_files(folder: str) -> set[str]:
    if not default_storage.exists(folder):
        return set()
    folders, files = default_storage.listdir(folder)
    return {f"{folder}/{name}" for name in files} | {
        path for sub in folders for path in stored_files(f"{folder}/{sub}")
    }


def test_the_wake_up_counter_allows_a_bounded_number_of_waiting_messages(db, settings):
    from diagnosis.services import wakeups

    settings.INFERENCE_COALESCE_MESSAGES = 3
    client = wakeups._scripts()[1]
    wakeups.reset()
    try:
        assert [wakeups.ring() for _ in range(5)] == [True, True, True, False, False]
        assert 0 < client.ttl(wakeups.KEY) <= settings.INFERENCE_COALESCE_SECONDS  # a lost message is forgotten
        wakeups.answer()
        assert [wakeups.ring(), wakeups.ring()] == [True, False]
        for _ in range(6):
            wakeups.answer()
        assert not client.exists(wakeups.KEY)  # never below zero: extra answers (sweeper messages) are harmless
        settings.INFERENCE_COALESCE_MESSAGES = 0
        assert not wakeups.enabled() and all(wakeups.ring() for _ in range(5))  # off: every upload publishes
        assert not client.exists(wakeups.KEY)
    finally:
        wakeups.reset()


@pytest.mark.django_db(transaction=True)
def test_a_burst_of_uploads_wakes_few_workers_and_every_photo_is_predicted(
    celery_worker, tiny_checkpoint, settings, monkeypatch
):
    from diagnosis.services import images as image_services
    from diagnosis.services import wakeups
    from diagnosis.services.registry import register_model
    from tests.factories import ClinicFactory, ClinicianFactory

    settings.INFERENCE_COALESCE_MESSAGES = 1
    wakeups.reset()
    clinic = ClinicFactory(name="Burst clinic")
    clinician = ClinicianFactory(membership__clinic=clinic)
    model_version = register_model(checkpoint=tiny_checkpoint, version="burst-tiny", activate=True)
    published = []
    publish = image_services.enqueue_prediction

    def counted(image_id: str, **hints) -> None:  # the real publish, counted
        published.append(image_id)
        publish(image_id, **hints)

    monkeypatch.setattr(image_services, "enqueue_prediction", counted)
    photos = [lesion_jpeg(seed=seed, size=64) for seed in range(6)]
    with transaction.atomic():  # 40 commits' worth of wake-ups in a few milliseconds
        ids = [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(photos[i % 6])).pk)
               for i in range(40)]  # fmt: skip
    images = LesionImage.objects.filter(pk__in=ids)
    # 40 photos, batches of at most 16: the tasks ring again for the photos they leave queued.
    wait_for(lambda: images.filter(state=ImageState.DONE).count() == 40, 120, interval=0.25,
             message="all 40 uploads to be done")  # fmt: skip
    assert Prediction.objects.filter(image_id__in=ids, model_version=model_version).count() == 40
    assert set(images.values_list("attempts", flat=True)) == {1}
    assert len(set(published)) < 10, published  # the uploads published only a few messages, not 40


def test_a_photo_decoded_early_for_the_last_model_is_decoded_again_for_a_new_one(clinic, clinician, active_model):
    import torch

    from diagnosis.services import decoding
    from mlcore.inference import Predictor
    from mlcore.model import CheckpointMeta, build_model

    ids = queued_images(clinic, clinician, 2, seed=80)
    assert process_images(image_ids=[ids[0]], worker_id="early:1") == {ids[0]: "done"}
    last = decoding._last_predictor()
    assert last is not None and last.meta.input_size == 64
    from diagnosis.services.images import claim_image

    image = claim_image(image_id=ids[1], worker_id="early:2")
    early = decoding._start_early(image)
    assert early is not None and early[0] is last
    image.attempts = 2  # a photo on a later attempt is never decoded ahead: its worker may have died on it
    assert decoding._start_early(image) is None
    image.attempts = 1
    # The same model: the early decode is the one used.
    assert decoding._prepare_all([image], last, early=early)[0] is early[2]
    # Another model (96 px) became active meanwhile: the photo is decoded again for it.
    torch.manual_seed(0)
    bigger = Predictor(build_model("resnet_tiny").eval(), CheckpointMeta(arch="resnet_tiny", input_size=96),
                       device="cpu")  # fmt: skip
    jobs = decoding._prepare_all([image], bigger, early=early)
    assert jobs[0] is not early[2]
    assert tuple(jobs[0].result().tensor.shape[-2:]) == (96, 96)
    assert tuple(early[2].result().tensor.shape[-2:]) == (64, 64)


def test_an_upload_message_names_its_file_and_an_idle_worker_decodes_it_before_the_claim(
    clinic, clinician, active_model, monkeypatch, django_capture_on_commit_callbacks
):
    import time

    from diagnosis.services import decoding
    from diagnosis.services.images import claim_image

    published = []
    monkeypatch.setattr(
        "diagnosis.services.images.enqueue_prediction", lambda image_id, **hints: published.append((image_id, hints))
    )  # the broker is outside
    with django_capture_on_commit_callbacks(execute=True):
        image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=120)))
    assert published == [(str(image.pk), {"file": image.file.name})]
    assert decoding.UPLOAD_NAME.fullmatch(image.file.name)

    warm = queued_images(clinic, clinician, 1, seed=121)
    assert process_images(image_ids=warm, worker_id="ahead:0") == {warm[0]: "done"}
    last = decoding._last_predictor()
    monkeypatch.setattr(decoding, "_finished_at", time.monotonic())  # busy: a batch finished just now
    assert decoding.decode_ahead(image.file.name) is None
    idle = time.monotonic() - 10
    monkeypatch.setattr(decoding, "_finished_at", idle)
    monkeypatch.setattr(decoding, "_in_flight", 1)  # busy: a batch in progress in this process
    assert decoding.decode_ahead(image.file.name) is None
    monkeypatch.setattr(decoding, "_in_flight", 0)
    for name in ("explanations/x/overlay.jpg", "images/../models/weights.pt", f"images/{'a' * 32}.jpg/../x"):
        assert decoding.decode_ahead(name) is None  # only the name of an uploaded photo is read
    ahead = decoding.decode_ahead(image.file.name)
    assert ahead is not None and ahead[0] is last and ahead[1] == image.file.name
    assert tuple(ahead[2].result().tensor.shape) == (3, 64, 64)

    claimed = claim_image(image_id=str(image.pk), worker_id="ahead:1")
    assert decoding._start_early(claimed, ahead)[2] is ahead[2]  # the claimed image has that file: used
    other = claim_image(image_id=queued_images(clinic, clinician, 1, seed=122)[0], worker_id="ahead:2")
    own = decoding._start_early(other, ahead)  # another file: its own early decode instead
    assert own is not None and own[2] is not ahead[2] and own[1] == other.pk
    claimed.attempts = 2  # a later attempt: never a decode started before the claim
    assert decoding._start_early(claimed, ahead) is None


def test_the_photo_decoded_ahead_is_the_one_predicted_and_an_unused_one_is_waited_for(
    clinic, clinician, active_model, monkeypatch
):
    import threading
    import time

    from diagnosis.services import decoding

    warm = queued_images(clinic, clinician, 1, seed=140)
    assert process_images(image_ids=warm, worker_id="read:0") == {warm[0]: "done"}
    reads = []

    def counted(function):  # the real function, counted
        real = getattr(decoding, function)

        def call(*args):
            reads.append(function)
            return real(*args)

        return call

    for function in ("_read_and_prepare", "_read_name_and_prepare"):
        monkeypatch.setattr(decoding, function, counted(function))
    fresh = queued_images(clinic, clinician, 1, seed=123)[0]
    monkeypatch.setattr(decoding, "_finished_at", time.monotonic() - 10)
    ahead = decoding.decode_ahead(LesionImage.objects.get(pk=fresh).file.name)
    assert process_images(image_ids=[fresh], worker_id="read:1", ahead=ahead) == {fresh: "done"}
    assert reads == ["_read_name_and_prepare"]  # read once, by the name from the message
    twin = queued_images(clinic, clinician, 1, seed=123)[0]  # the same photo, read the usual way
    assert process_images(image_ids=[twin], worker_id="read:2") == {twin: "done"}
    assert reads == ["_read_name_and_prepare", "_read_and_prepare"]
    first, second = (Prediction.objects.get(image_id=i).probability_malignant for i in (fresh, twin))
    assert first == pytest.approx(second, abs=1e-6)

    # Decoded ahead for a message whose image is already done: process_images does not return before
    # that decode has ended (a photo that kills the process must do it under its own message).
    release = threading.Event()
    real = decoding._decode_and_prepare

    def slow(*args):
        release.wait(5)
        return real(*args)

    monkeypatch.setattr(decoding, "_decode_and_prepare", slow)
    monkeypatch.setattr(decoding, "_finished_at", time.monotonic() - 10)
    ahead = decoding.decode_ahead(LesionImage.objects.get(pk=fresh).file.name)
    assert ahead is not None and not ahead[2].done()
    threading.Timer(0.3, release.set).start()
    assert process_images(image_ids=[fresh], worker_id="read:3", ahead=ahead) == {fresh: "skipped"}
    assert ahead[2].done() and release.is_set()


def test_only_a_first_delivery_on_a_broker_that_marks_redeliveries_decodes_ahead(
    clinic, clinician, active_model, monkeypatch, settings
):
    import time

    from celery.app.task import Context

    from diagnosis import tasks
    from diagnosis.services import decoding
    from diagnosis.tasks import UPLOAD_FILE_HEADER, first_delivery, predict_image_task, upload_file_hint

    # A worker sees a message's headers as request attributes; an eager call under request.headers.
    assert upload_file_hint(Context({UPLOAD_FILE_HEADER: "images/a.jpg"})) == "images/a.jpg"
    assert upload_file_hint(Context({"headers": {UPLOAD_FILE_HEADER: "images/b.jpg"}})) == "images/b.jpg"
    assert upload_file_hint(Context({})) == "" and upload_file_hint(Context({UPLOAD_FILE_HEADER: 5})) == ""
    assert first_delivery(Context({"retries": 0, "delivery_info": {"redelivered": False}}))
    assert not first_delivery(Context({"retries": 1, "delivery_info": {}}))
    assert not first_delivery(Context({"retries": 0, "delivery_info": {"redelivered": True}}))
    for url, supported in (("redis://127.0.0.1:6379/0", True), ("amqp://guest@rabbit//", True),
                           ("filesystem://", False), ("memory://", False)):  # fmt: skip
        settings.CELERY_BROKER_URL = url
        assert decoding.decode_ahead_supported() is supported, url

    calls = []
    real = decoding.decode_ahead
    monkeypatch.setattr(decoding, "decode_ahead", lambda name: calls.append(name) or real(name))  # counted
    settings.CELERY_BROKER_URL = "redis://127.0.0.1:6379/0"
    for seed, retries, broker, decoded_ahead in ((130, 1, "redis://x", False), (131, 0, "filesystem://", False),
                                                 (132, 0, "redis://x", True)):  # fmt: skip
        settings.CELERY_BROKER_URL = broker
        monkeypatch.setattr(decoding, "_finished_at", time.monotonic() - 10)  # an idle worker
        image = LesionImage.objects.get(pk=queued_images(clinic, clinician, 1, seed=seed)[0])
        calls.clear()
        result = predict_image_task.apply(args=[str(image.pk)], headers={UPLOAD_FILE_HEADER: image.file.name},
                                          retries=retries)  # fmt: skip
        assert result.get() == "done"
        assert calls == ([image.file.name] if decoded_ahead else []), (seed, broker)

    # A failure to start the decode is only a lost head start.
    def broken(name):
        raise RuntimeError("the pool is shutting down")

    monkeypatch.setattr(decoding, "decode_ahead", broken)
    image = LesionImage.objects.get(pk=queued_images(clinic, clinician, 1, seed=133)[0])
    request = Context({UPLOAD_FILE_HEADER: image.file.name, "retries": 0, "delivery_info": {}})
    assert tasks._decode_ahead(request) is None


def test_a_task_wakes_a_worker_only_for_photos_queued_before_it_started(clinic, clinician, settings, monkeypatch):
    from django.utils import timezone

    from diagnosis.services import wakeups
    from diagnosis.services.images import claim_image, release_image

    settings.INFERENCE_COALESCE_MESSAGES = 4
    wakeups.reset()
    published = []
    monkeypatch.setattr(
        "diagnosis.services.wakeups.enqueue_prediction", lambda image_id, **_: published.append(image_id)
    )  # the broker is outside
    waiting = queued_images(clinic, clinician, 1, seed=95)
    task_started = timezone.now()
    given_back = queued_images(clinic, clinician, 1, seed=96)
    # A photo the task claimed and gave back (say the model could not be loaded) is queued again now...
    assert claim_image(image_id=given_back[0], worker_id="t:1") is not None
    release_image(image_id=given_back[0], worker_id="t:1")
    LesionImage.objects.filter(pk=waiting[0]).update(enqueued_at=task_started - timezone.timedelta(seconds=1))
    try:
        wakeups.ring_for_waiting(queued_before=task_started)
        assert published == waiting  # the one that waited before the task, not the one it gave back
        LesionImage.objects.filter(pk=waiting[0]).update(state=ImageState.DONE)
        wakeups.ring_for_waiting(queued_before=task_started)
        assert published == waiting  # nothing else: the given-back photo waits for a retry or the sweeper
    finally:
        wakeups.reset()
