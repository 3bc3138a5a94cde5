"""Batching Integrated Gradients across explanations: an explain task takes its own explanation plus
other queued ones of the same model version and parameters into one Captum call, with the
per-explanation state machine intact (one stored result each, one claim each, faults isolated)."""

from __future__ import annotations

import io
import uuid

import numpy as np
import pytest
from captum.attr import IntegratedGradients
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.db import transaction

from diagnosis.models import Explanation, ImageState, LesionImage
from diagnosis.services.explanation_work import compute_explanation, gather_queued_explanations
from diagnosis.services.explanations import canonical_key
from diagnosis.services.images import submit_image
from diagnosis.services.predictions import process_images
from diagnosis.services.runtime import explainer_for
from tests.conftest import lesion_jpeg, token_client, upload_file, wait_for

IG = "integrated_gradients"


def queued_igs(clinic, clinician, count: int, seed: int) -> list[Explanation]:
    """`count` predicted images, each with its automatic IG explanation queued (nothing published:
    the test calls the worker's service itself), oldest first."""
    with transaction.atomic():
        ids = [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=seed + i))).pk)
               for i in range(count)]  # fmt: skip
    assert set(process_images(image_ids=ids, worker_id="predict:1").values()) == {"done"}
    return [Explanation.objects.get(image_id=image_id, method=IG) for image_id in ids]


def retarget(explanation: Explanation) -> None:
    """Ask about the other class: a different explanation of the same photo, still batchable."""
    index = 1 - explanation.target_index
    Explanation.objects.filter(pk=explanation.pk).update(
        target_index=index, target_class=explanation.model_version.class_names[index],
        params_key=canonical_key(IG, explanation.params, index),
    )  # fmt: skip


def with_params(explanation: Explanation, **changes) -> None:
    params = {**explanation.params, **changes}
    Explanation.objects.filter(pk=explanation.pk).update(
        params=params, params_key=canonical_key(IG, params, explanation.target_index)
    )


def stored_attribution(explanation: Explanation) -> np.ndarray:
    with explanation.attribution.open("rb") as handle:
        return np.load(io.BytesIO(handle.read()), allow_pickle=False).astype(np.float32)


def alone(explanation: Explanation):
    """What the single-image path gives for this explanation, from its stored photo."""
    from mlcore.preprocessing import decode_image

    with explanation.image.file.open("rb") as handle:
        decoded = decode_image(handle.read(), max_side=1024)
    return explainer_for(explanation.model_version).explain(
        decoded.image, IG, explanation.params, explanation.target_index
    )


@pytest.fixture
def captum_calls(monkeypatch):
    """A spy on Captum's IG: the calls still run, their batch sizes are recorded."""
    calls: list[int] = []
    original = IntegratedGradients.attribute

    def counting(self, inputs, *args, **kwargs):
        calls.append(int(inputs.shape[0]))
        return original(self, inputs, *args, **kwargs)

    monkeypatch.setattr(IntegratedGradients, "attribute", counting)
    return calls


def test_one_captum_call_explains_several_queued_explanations(clinic, clinician, active_model, settings,
                                                               captum_calls):  # fmt: skip
    settings.EXPLAIN_BATCH_SIZE = 4
    settings.PIPELINE_BATCHES = 1  # one batch per task here (tests/test_engine.py: the pipelined batches)
    igs = queued_igs(clinic, clinician, 5, seed=10)
    retarget(igs[2])  # targets may differ within a batch

    assert compute_explanation(explanation_id=str(igs[0].pk), worker_id="explainer:1") == "done"
    assert captum_calls == [4]  # its own and the three oldest waiting ones, in one call
    batch = Explanation.objects.filter(pk__in=[e.pk for e in igs[:4]])
    assert set(batch.values_list("state", "claimed_by", "attempts")) == {(Explanation.State.DONE, "explainer:1", 1)}
    assert len(set(batch.values_list("duration_ms", flat=True))) == 1  # each its share of the one call
    assert Explanation.objects.get(pk=igs[4].pk).state == Explanation.State.QUEUED  # beyond the batch size
    names = set()
    for explanation in batch:
        # Its own map, not a batch-mate's: equal to the single-image result (stored as float16).
        reference = alone(explanation)
        raw = stored_attribution(explanation)
        assert raw.shape == reference.raw.shape == (3, 64, 64)
        assert np.abs(raw - reference.raw).max() <= 2e-3 * np.abs(reference.raw).max()
        assert explanation.convergence_delta == pytest.approx(reference.convergence_delta, abs=1e-3)
        names |= {explanation.overlay.name, explanation.heatmap.name, explanation.attribution.name}
        assert all(default_storage.exists(name) for name in (explanation.overlay.name, explanation.heatmap.name))
    assert len(names) == 12  # one stored result each
    assert Explanation.objects.get(pk=igs[2].pk).target_index != igs[2].target_index

    # The gathered ones' own messages find them finished, and change nothing.
    captum_calls.clear()
    assert compute_explanation(explanation_id=str(igs[1].pk), worker_id="late:2") == "skipped"
    assert captum_calls == [] and Explanation.objects.get(pk=igs[1].pk).claimed_by == "explainer:1"
    # The one left over goes through alone.
    assert compute_explanation(explanation_id=str(igs[4].pk), worker_id="explainer:3") == "done"
    assert captum_calls == [1]


def test_a_damaged_or_missing_photo_fails_only_its_own_explanation(clinic, clinician, active_model, settings):
    settings.EXPLAIN_BATCH_SIZE = 8
    settings.EXPLAIN_BATCH_MAX_STEPS = 1000
    igs = queued_igs(clinic, clinician, 5, seed=30)
    damaged, missing = igs[1].image, igs[3].image
    default_storage.delete(damaged.file.name)
    default_storage.save(damaged.file.name, ContentFile(lesion_jpeg(seed=31)[:300]))
    default_storage.delete(missing.file.name)

    assert compute_explanation(explanation_id=str(igs[0].pk), worker_id="explainer:1") == "done"
    states = {e.pk: e for e in Explanation.objects.filter(pk__in=[e.pk for e in igs])}
    assert states[igs[1].pk].state == Explanation.State.FAILED
    assert "could not be read" in states[igs[1].pk].error
    assert states[igs[3].pk].state == Explanation.State.FAILED and "missing" in states[igs[3].pk].error
    for good in (igs[0], igs[2], igs[4]):
        assert states[good.pk].state == Explanation.State.DONE and states[good.pk].attribution
    assert {e.claimed_by for e in states.values()} == {"explainer:1"}


def test_when_the_batched_call_fails_each_runs_alone_and_only_the_broken_one_fails(
    clinic, clinician, active_model, settings, captum_calls
):
    settings.EXPLAIN_BATCH_SIZE = 4
    igs = queued_igs(clinic, clinician, 4, seed=50)
    # A row whose target the model does not have (a corrupt request): Captum raises on the whole batch.
    Explanation.objects.filter(pk=igs[2].pk).update(target_index=7)

    assert compute_explanation(explanation_id=str(igs[0].pk), worker_id="explainer:1") == "done"
    assert captum_calls == [4, 1, 1, 1, 1]  # the batch, then one by one
    broken = Explanation.objects.get(pk=igs[2].pk)
    assert broken.state == Explanation.State.FAILED and "internal error" in broken.error
    others = Explanation.objects.filter(pk__in=[igs[0].pk, igs[1].pk, igs[3].pk])
    assert set(others.values_list("state", "attempts")) == {(Explanation.State.DONE, 1)}
    for explanation in others:
        reference = alone(explanation)
        assert np.abs(stored_attribution(explanation) - reference.raw).max() <= 2e-3 * np.abs(reference.raw).max()


def test_different_parameters_or_methods_are_not_batched_together(clinic, clinician, active_model, settings,
                                                                   captum_calls):  # fmt: skip
    settings.EXPLAIN_BATCH_SIZE = 8
    igs = queued_igs(clinic, clinician, 6, seed=70)
    with_params(igs[1], n_steps=8)
    with_params(igs[3], n_steps=8)
    with_params(igs[4], baseline="black")
    Explanation.objects.filter(pk=igs[5].pk).update(attempts=1)  # was in a batch whose worker died: goes alone
    occlusion = Explanation.objects.create(
        image=igs[2].image, model_version=active_model, method="occlusion", params={"window": 16},
        params_key="occlusion-test", target_index=1, target_class="malignant",
    )  # fmt: skip
    for explanation in igs:
        explanation.refresh_from_db()

    assert gather_queued_explanations(explanation=igs[0], limit=8) == [str(igs[2].pk)]
    assert gather_queued_explanations(explanation=igs[1], limit=8) == [str(igs[3].pk)]
    assert gather_queued_explanations(explanation=igs[4], limit=8) == []
    assert gather_queued_explanations(explanation=igs[0], limit=0) == []
    assert gather_queued_explanations(explanation=occlusion, limit=8) == []  # only IG is batched

    assert compute_explanation(explanation_id=str(igs[0].pk), worker_id="explainer:1") == "done"
    assert captum_calls == [2]
    done = set(Explanation.objects.filter(state=Explanation.State.DONE, method=IG).values_list("pk", flat=True))
    assert done == {igs[0].pk, igs[2].pk}
    assert compute_explanation(explanation_id=str(igs[3].pk), worker_id="explainer:2") == "done"
    assert captum_calls == [2, 2]
    steps = Explanation.objects.filter(pk__in=[igs[1].pk, igs[3].pk])
    assert set(steps.values_list("state", "claimed_by")) == {(Explanation.State.DONE, "explainer:2")}
    assert Explanation.objects.get(pk=igs[4].pk).state == Explanation.State.QUEUED
    assert Explanation.objects.get(pk=occlusion.pk).state == Explanation.State.QUEUED
    # A task whose own explanation is on its second attempt takes no others.
    assert compute_explanation(explanation_id=str(igs[5].pk), worker_id="explainer:3") == "done"
    assert Explanation.objects.get(pk=igs[4].pk).state == Explanation.State.QUEUED


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_real_explain_worker_finishes_every_ig_explanation_exactly_once(celery_worker, explain_worker,
                                                                         tiny_checkpoint):  # fmt: skip
    from diagnosis.services.explanations import request_explanation
    from diagnosis.services.registry import register_model
    from tests.factories import ClinicFactory, ClinicianFactory

    clinic = ClinicFactory(name="IG batching clinic")
    client = token_client(ClinicianFactory(membership__clinic=clinic))
    register_model(checkpoint=tiny_checkpoint, version=f"ig-batch-{uuid.uuid4().hex[:6]}", activate=True)
    ids = []
    for seed in range(6):
        response = client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=90 + seed, size=80))},
                               format="multipart")  # fmt: skip
        assert response.status_code == 202
        ids.append(response.json()["id"])
    images = LesionImage.objects.filter(pk__in=ids)
    wait_for(lambda: images.filter(state=ImageState.DONE).count() == 6, 90, message="all predictions")
    # A second IG request for every image, committed at once: all six are waiting when the first
    # task starts, so it takes a batch (the worker's EXPLAIN_BATCH_SIZE is the default, 4).
    with transaction.atomic():
        for image in images:
            request_explanation(image=image, method=IG, params={"n_steps": 8})
    igs = Explanation.objects.filter(image_id__in=ids, method=IG)
    try:
        wait_for(lambda: igs.filter(state=Explanation.State.DONE).count() == 12, 120, message="all 12 IG explanations")
    finally:
        from webapp.celery import app

        # Batched explanations left their own messages behind (each a no-op claim): drop them.
        with app.connection_for_write() as connection:
            connection.default_channel.queue_purge("explain")
    assert igs.count() == 12 and igs.values("image_id", "params_key").distinct().count() == 12
    assert set(igs.values_list("attempts", flat=True)) == {1}  # each claimed once
    assert {claim.split("@")[0] for claim in igs.values_list("claimed_by", flat=True)} == {explain_worker.node}
    second = igs.filter(params__n_steps=8)
    assert second.count() == 6
    assert second.values("claimed_by").distinct().count() < 6  # some went through together
    for explanation in igs:
        assert explanation.overlay and explanation.heatmap and explanation.attribution
        assert default_storage.exists(explanation.attribution.name)
        assert stored_attribution(explanation).shape == (3, 64, 64)


def test_a_batch_stays_within_its_budget_of_steps(clinic, clinician, active_model, settings, captum_calls):
    settings.EXPLAIN_BATCH_SIZE = 8
    settings.EXPLAIN_BATCH_MAX_STEPS = 100  # two explanations of 50 steps share one task's time limit
    settings.PIPELINE_BATCHES = 1
    igs = queued_igs(clinic, clinician, 4, seed=70)
    assert compute_explanation(explanation_id=str(igs[0].pk), worker_id="explainer:1") == "done"
    assert captum_calls == [2]
    states = dict(Explanation.objects.filter(pk__in=[e.pk for e in igs]).values_list("pk", "state"))
    assert sorted(states.values()) == ["done", "done", "queued", "queued"]
