"""transactions.update_returning: a worker's claim is one UPDATE ... RETURNING, with the same rows and
values as an UPDATE followed by a SELECT (the fallback for databases without RETURNING)."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.models import F
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from diagnosis.models import ImageState, LesionImage
from diagnosis.services import transactions
from diagnosis.services.images import claim_image, submit_image
from diagnosis.services.predictions import claim_queued
from diagnosis.services.transactions import update_returning
from tests.conftest import lesion_jpeg, upload_file


@pytest.fixture
def images(clinic, clinician):
    return [submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=seed)))
            for seed in range(4)]  # fmt: skip


@pytest.fixture(params=["returning", "fallback"])
def flavour(request, monkeypatch):
    if request.param == "fallback":
        monkeypatch.setattr(transactions, "_has_update_returning", lambda connection: False)
    return request.param


def test_updates_only_the_matching_rows_and_returns_them_with_their_new_values(images, flavour):
    now = timezone.now()
    wanted = [images[0].pk, images[2].pk]
    LesionImage.objects.filter(pk=images[2].pk).update(attempts=2)
    returned = update_returning(LesionImage.objects.filter(pk__in=wanted, state=ImageState.QUEUED),
                                state=ImageState.PROCESSING, claimed_at=now, claimed_by="w:1",
                                attempts=F("attempts") + 1)  # fmt: skip
    by_id = {image.pk: image for image in returned}
    assert set(by_id) == set(wanted)
    assert by_id[images[0].pk].attempts == 1 and by_id[images[2].pk].attempts == 3  # the expression, evaluated
    for image in returned:
        assert image.state == ImageState.PROCESSING and image.claimed_by == "w:1" and image.claimed_at == now
        assert image.file.name.startswith("images/") and image.clinic_id == images[0].clinic_id  # every column
        stored = LesionImage.objects.get(pk=image.pk)
        assert (stored.state, stored.attempts, stored.claimed_by) == (image.state, image.attempts, image.claimed_by)
    untouched = LesionImage.objects.filter(pk__in=[images[1].pk, images[3].pk])
    assert {(image.state, image.attempts) for image in untouched} == {(ImageState.QUEUED, 0)}


def test_nothing_matching_returns_nothing_and_changes_nothing(images, flavour):
    assert update_returning(LesionImage.objects.filter(state=ImageState.DONE), state=ImageState.FAILED) == []
    assert update_returning(LesionImage.objects.none(), state=ImageState.FAILED) == []
    assert set(LesionImage.objects.values_list("state", flat=True)) == {ImageState.QUEUED}


def test_a_claim_is_one_statement_and_a_second_claim_gets_nothing(images, flavour):
    with CaptureQueriesContext(connection) as queries:
        claimed = claim_image(image_id=str(images[0].pk), worker_id="w:1")
    assert claimed is not None and claimed.pk == images[0].pk and claimed.attempts == 1
    if flavour == "returning":
        assert len(queries) == 1 and "RETURNING" in queries[0]["sql"]
    assert claim_image(image_id=str(images[0].pk), worker_id="w:2") is None
    LesionImage.objects.filter(pk=images[0].pk).update(claimed_at=timezone.now() - timedelta(days=1))
    taken_over = claim_image(image_id=str(images[0].pk), worker_id="w:2")  # a stale claim
    assert taken_over is not None and taken_over.claimed_by == "w:2" and taken_over.attempts == 2


def test_gathered_images_come_back_oldest_first(images, flavour):
    now = timezone.now()
    for age, image in zip((1, 3, 2), images[1:], strict=True):
        LesionImage.objects.filter(pk=image.pk).update(enqueued_at=now - timedelta(seconds=age))
    gathered = claim_queued(image_ids=[str(image.pk) for image in images[1:]], worker_id="w:1")
    assert [image.pk for image in gathered] == [images[2].pk, images[3].pk, images[1].pk]
    assert claim_queued(image_ids=[str(image.pk) for image in images[1:]], worker_id="w:2") == []
