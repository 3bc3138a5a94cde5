"""The worker-side services, called in-process against the real database: claims, the state
machine, idempotent predictions, failures with readable reasons, and the sweeper."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.utils import timezone

from diagnosis.models import ImageState, LesionImage, ModelVersion, Prediction
from diagnosis.services import predictions as prediction_services
from diagnosis.services import runtime
from diagnosis.services.images import claim_image, requeue_stale_images, submit_image
from diagnosis.services.predictions import process_image, record_prediction
from diagnosis.services.registry import activate_model, register_model
from tests.conftest import lesion_jpeg, upload_file


@pytest.fixture
def queued_image(clinic, clinician):
    return submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=3)))


def test_process_image_records_prediction_equal_to_in_process_model(queued_image, active_model, tiny_checkpoint):
    from mlcore.inference import Predictor
    from mlcore.preprocessing import decode_image

    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "done"
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.DONE and queued_image.error == ""
    assert queued_image.processed_at is not None and queued_image.attempts == 1
    prediction = Prediction.objects.get(image=queued_image)
    assert prediction.model_version == active_model

    stored = decode_image(queued_image.file.open("rb").read()).image
    expected = Predictor.from_checkpoint(tiny_checkpoint, device="cpu").predict([stored])[0]
    assert prediction.probability_malignant == pytest.approx(expected.probability_malignant, abs=1e-6)
    assert prediction.label == expected.label
    assert prediction.threshold == pytest.approx(active_model.threshold)
    assert sum(prediction.probabilities.values()) == pytest.approx(1.0, abs=1e-5)


def test_second_claim_of_same_image_is_refused(queued_image):
    assert claim_image(image_id=str(queued_image.pk), worker_id="w1:task-a") is not None
    assert claim_image(image_id=str(queued_image.pk), worker_id="w2:task-b") is None
    assert process_image(image_id=str(queued_image.pk), worker_id="w2:task-b") == "skipped"


def test_redelivered_message_may_retake_its_own_claim(queued_image):
    assert claim_image(image_id=str(queued_image.pk), worker_id="w1:task-a") is not None
    again = claim_image(image_id=str(queued_image.pk), worker_id="w1:task-a")
    assert again is not None and again.attempts == 2


def test_stale_claim_can_be_taken_over(queued_image, settings):
    assert claim_image(image_id=str(queued_image.pk), worker_id="dead:task") is not None
    LesionImage.objects.filter(pk=queued_image.pk).update(
        claimed_at=timezone.now() - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS + 1)
    )
    assert claim_image(image_id=str(queued_image.pk), worker_id="alive:task") is not None


def test_done_image_is_not_processed_again(queued_image, active_model):
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "done"
    assert process_image(image_id=str(queued_image.pk), worker_id="w2") == "skipped"
    assert Prediction.objects.filter(image=queued_image).count() == 1


def test_record_prediction_is_idempotent(queued_image, active_model):
    from mlcore.inference import PredictionResult

    first = PredictionResult(0.2, "benign", 0.5, {"benign": 0.8, "malignant": 0.2})
    second = PredictionResult(0.7, "malignant", 0.5, {"benign": 0.3, "malignant": 0.7})
    record_prediction(image=queued_image, model_version=active_model, result=first, inference_ms=1.0)
    record_prediction(image=queued_image, model_version=active_model, result=second, inference_ms=1.0)
    prediction = Prediction.objects.get(image=queued_image)
    assert prediction.probability_malignant == pytest.approx(0.7)


def test_no_active_model_keeps_the_image_queued_until_one_is_activated(queued_image, tiny_checkpoint):
    """While no model is active (the demo's still training), a worker gives the photo back: it waits,
    queued, with no attempt counted, and is scored once a model is active."""
    assert not ModelVersion.objects.filter(is_active=True).exists()
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "released"
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.QUEUED and queued_image.error == ""
    assert queued_image.attempts == 0 and queued_image.claimed_by == ""
    register_model(checkpoint=tiny_checkpoint, version="arrives-later", activate=True)
    assert process_image(image_id=str(queued_image.pk), worker_id="w2") == "done"


def test_corrupted_stored_file_fails_with_reason_not_a_crash(queued_image, active_model):
    name = queued_image.file.name
    default_storage.delete(name)
    default_storage.save(name, ContentFile(b"\xff\xd8\xff\xe0 garbage"))
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "failed"
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.FAILED
    assert queued_image.error.startswith("The photo could not be decoded in full")


def test_missing_stored_file_fails_with_reason(queued_image, active_model):
    default_storage.delete(queued_image.file.name)
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "failed"
    queued_image.refresh_from_db()
    assert "missing" in queued_image.error


def test_model_crash_fails_the_image_with_reason(queued_image, active_model, monkeypatch):
    real = prediction_services.predictor_for(active_model)

    class ExplodingPredictor:
        meta, spec, device = real.meta, real.spec, real.device

        def predict_with_gradcam_tensors(self, batch, **kwargs):
            raise RuntimeError("CUDA error: device-side assert triggered")

    monkeypatch.setattr(prediction_services, "predictor_for", lambda model_version: ExplodingPredictor())
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "failed"
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.FAILED
    assert "internal error: RuntimeError" in queued_image.error


def test_image_that_keeps_killing_workers_is_failed_after_max_attempts(queued_image, active_model, settings):
    settings.MAX_PROCESSING_ATTEMPTS = 2
    for task in ("a", "b"):
        assert claim_image(image_id=str(queued_image.pk), worker_id=f"w:{task}") is not None
        LesionImage.objects.filter(pk=queued_image.pk).update(state=ImageState.QUEUED)  # as the sweeper would
    assert process_image(image_id=str(queued_image.pk), worker_id="w:c") == "failed"
    queued_image.refresh_from_db()
    assert "never finished" in queued_image.error


def test_worker_switches_to_newly_activated_model(queued_image, clinic, clinician, active_model, tiny_checkpoint):
    from mlcore.model import CheckpointMeta, checkpoint_bytes, load_checkpoint

    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "done"
    model, meta = load_checkpoint(tiny_checkpoint)
    meta.threshold = 0.01
    newer = register_model(checkpoint=checkpoint_bytes(model, CheckpointMeta(**meta.to_dict())), version="v2")
    activate_model(model_version=newer)
    second = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=4)))
    assert process_image(image_id=str(second.pk), worker_id="w1") == "done"
    prediction = Prediction.objects.get(image=second)
    assert prediction.model_version == newer
    assert prediction.threshold == pytest.approx(0.01)
    assert prediction.label == "malignant"
    assert ModelVersion.objects.filter(is_active=True).get() == newer


def test_sweeper_returns_dead_claims_and_reenqueues_lost_messages(queued_image, settings, monkeypatch):
    published = []
    monkeypatch.setattr(
        "diagnosis.services.images.enqueue_prediction", lambda image_id, **_: published.append(image_id)
    )  # the broker is outside
    long_ago = timezone.now() - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS + 60)
    assert claim_image(image_id=str(queued_image.pk), worker_id="dead:task") is not None
    LesionImage.objects.filter(pk=queued_image.pk).update(claimed_at=long_ago)

    counts = requeue_stale_images()
    assert counts == {"reclaimed": 1, "requeued": 1, "explanations": 0}
    assert published == [str(queued_image.pk)]
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.QUEUED and queued_image.enqueued_at is not None
    # A fresh queued image is left alone: its message is presumably still in the queue.
    assert requeue_stale_images() == {"reclaimed": 0, "requeued": 0, "explanations": 0}


def test_register_model_rejects_a_file_that_is_not_a_checkpoint(db):
    from django.core.exceptions import ValidationError

    with pytest.raises(ValidationError, match="cannot be used"):
        register_model(checkpoint=b"definitely not a checkpoint")
    assert ModelVersion.objects.count() == 0


def test_only_one_model_is_active(db, tiny_checkpoint):
    first = register_model(checkpoint=tiny_checkpoint, version="a", activate=True)
    second = register_model(checkpoint=tiny_checkpoint, version="b", activate=True)
    first.refresh_from_db()
    assert not first.is_active and second.is_active


def test_weights_cache_is_verified_by_sha256(active_model, settings, tmp_path):
    from django.core.exceptions import ValidationError

    from diagnosis.services.registry import cached_weights_path

    settings.MODEL_CACHE_DIR = str(tmp_path)
    path = cached_weights_path(active_model)
    assert path.name == f"{active_model.weights_sha256}.pt" and path.stat().st_size > 0
    tampered = ModelVersion.objects.get(pk=active_model.pk)
    tampered.weights_sha256 = "0" * 64
    with pytest.raises(ValidationError, match="do not match"):
        cached_weights_path(tampered)
    assert not (tmp_path / ("0" * 64 + ".pt")).exists()


def test_transient_errors_do_not_count_as_attempts_or_fail_the_image(queued_image, active_model, settings, monkeypatch):
    from django.db import OperationalError

    from diagnosis.services.predictions import TransientError

    settings.MAX_PROCESSING_ATTEMPTS = 2

    def database_blip(model_version):
        raise OperationalError("server closed the connection unexpectedly")

    monkeypatch.setattr(prediction_services, "predictor_for", database_blip)
    for attempt in range(5):
        with pytest.raises(TransientError):
            process_image(image_id=str(queued_image.pk), worker_id=f"w:{attempt}")
        queued_image.refresh_from_db()
        assert queued_image.state == ImageState.QUEUED and queued_image.attempts == 0
    monkeypatch.undo()
    assert process_image(image_id=str(queued_image.pk), worker_id="w:ok") == "done"


def test_unloadable_model_leaves_the_image_queued(queued_image, active_model):
    from diagnosis.services.predictions import ModelUnavailable

    runtime.predictors.clear()  # no cached predictor: the weights must be read
    default_storage.delete(active_model.weights.name)
    ModelVersion.objects.filter(pk=active_model.pk).update(weights_sha256="f" * 64)  # not in any local cache
    with pytest.raises(ModelUnavailable):
        process_image(image_id=str(queued_image.pk), worker_id="w1")
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.QUEUED and queued_image.error == "" and queued_image.attempts == 0


def test_a_stale_worker_cannot_release_fail_or_finish_a_claim_taken_over(queued_image, active_model, settings):
    from diagnosis.services.images import fail_image, release_image
    from mlcore.inference import PredictionResult

    assert claim_image(image_id=str(queued_image.pk), worker_id="A:1") is not None
    LesionImage.objects.filter(pk=queued_image.pk).update(
        claimed_at=timezone.now() - timedelta(seconds=settings.CLAIM_TIMEOUT_SECONDS + 1)
    )
    assert claim_image(image_id=str(queued_image.pk), worker_id="B:2") is not None
    release_image(image_id=str(queued_image.pk), worker_id="A:1")
    fail_image(image_id=str(queued_image.pk), reason="late", worker_id="A:1")
    result = PredictionResult(0.2, "benign", 0.5, {"benign": 0.8, "malignant": 0.2})
    assert record_prediction(image=queued_image, model_version=active_model, result=result, inference_ms=1,
                             worker_id="A:1") is None  # fmt: skip
    assert not Prediction.objects.filter(image=queued_image).exists()  # the stale worker wrote nothing
    queued_image.refresh_from_db()
    assert queued_image.state == ImageState.PROCESSING and queued_image.claimed_by == "B:2"


@pytest.mark.django_db(transaction=True)
def test_concurrent_claims_from_two_connections_give_the_image_to_exactly_one(tiny_checkpoint):
    import threading

    from django.db import connection

    from tests.factories import ClinicFactory, ClinicianFactory

    clinic = ClinicFactory(name="race")
    clinician = ClinicianFactory(membership__clinic=clinic)
    winners = []
    for round_number in range(10):
        with pytest.MonkeyPatch.context() as patch:
            patch.setattr("diagnosis.services.images.announce_upload", lambda image_id, **_: None)
            image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=round_number)))
        barrier = threading.Barrier(2)
        results = []

        def claim(worker, image_id=str(image.pk), barrier=barrier, results=results):
            barrier.wait()
            results.append(claim_image(image_id=image_id, worker_id=worker) is not None)
            connection.close()

        threads = [threading.Thread(target=claim, args=(f"w{n}",)) for n in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        winners.append(sorted(results))
    assert winners == [[False, True]] * 10


def test_test_time_augmentation_stores_the_views_and_decides_with_them(queued_image, gated_model, settings):
    """TEST_TIME_AUGMENTATION=on (a GPU's default, here on the CPU): the three flipped views' probabilities
    from the batch's own forward pass are stored with the decision; off stores none."""
    from mlcore.gate import Gate, decide
    from mlcore.inference import Predictor
    from mlcore.preprocessing import decode_image

    settings.TEST_TIME_AUGMENTATION = "on"
    assert process_image(image_id=str(queued_image.pk), worker_id="w1") == "done"
    prediction = Prediction.objects.get(image=queued_image)
    views = prediction.quality["augmented"]
    predictor = Predictor.from_checkpoint(default_storage.open(gated_model.weights.name).read(), device="cpu")
    photo = decode_image(queued_image.file.open("rb").read()).image
    expected = predictor.augmented_probabilities(predictor.preprocess(photo)[None])[0]
    assert views == pytest.approx(list(expected), abs=1e-5) and len(views) == 3
    again = decide(probability=prediction.probability_malignant, threshold=prediction.threshold,
                   gate=Gate.from_dict(gated_model.quality_gate), measures=None, ood_score=prediction.ood_score,
                   augmented=views)  # fmt: skip
    assert prediction.decision == again.decision or prediction.decision == "not_assessable"

    settings.TEST_TIME_AUGMENTATION = "auto"  # on the CPU: off
    second = submit_image(uploader=queued_image.uploaded_by, clinic=queued_image.clinic,
                          upload=upload_file(lesion_jpeg(seed=5, size=128)))  # fmt: skip
    assert process_image(image_id=str(second.pk), worker_id="w1") == "done"
    assert Prediction.objects.get(image=second).quality["augmented"] == []
