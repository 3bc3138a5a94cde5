"""Both queues for real: one worker process predicts (inference queue) while another computes
Integrated Gradients (explain queue), over Redis and PostgreSQL."""

from __future__ import annotations

import pytest

from diagnosis.models import Explanation, ImageState, LesionImage
from tests.conftest import lesion_jpeg, token_client, upload_file, wait_for
from tests.factories import ClinicFactory, ClinicianFactory

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_ig_runs_on_the_explain_worker_while_predictions_continue(celery_worker, explain_worker, tiny_checkpoint):
    from diagnosis.services.registry import register_model

    clinic = ClinicFactory(name="E2E explanations")
    client = token_client(ClinicianFactory(membership__clinic=clinic))
    register_model(checkpoint=tiny_checkpoint, version="e2e-explain", activate=True)

    ids = []
    for seed in range(6):
        response = client.post(
            "/api/v1/images/", {"image": upload_file(lesion_jpeg(seed=40 + seed))}, format="multipart"
        )
        assert response.status_code == 202
        ids.append(response.json()["id"])

    wait_for(
        lambda: LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE).count() == len(ids),
        90,
        message="all predictions",
    )
    wait_for(
        lambda: (
            Explanation.objects.filter(
                image_id__in=ids, method="integrated_gradients", state=Explanation.State.DONE
            ).count()
            == len(ids)
        ),
        120,
        message="all IG explanations",
    )
    wait_for(  # Grad-CAM's pictures are drawn on the default queue, which may still be busy
        lambda: (
            Explanation.objects.filter(image_id__in=ids, method="gradcam", state=Explanation.State.DONE).count()
            == len(ids)
        ),
        120,
        message="all Grad-CAM pictures",
    )
    for image_id in ids:
        listed = {item["method"]: item for item in client.get(f"/api/v1/images/{image_id}/explanations/").json()}
        assert set(listed) == {"gradcam", "integrated_gradients"}
        assert all(item["state"] == "done" and item["overlay_url"] for item in listed.values())
    gradcams = Explanation.objects.filter(image_id__in=ids, method="gradcam")
    igs = Explanation.objects.filter(image_id__in=ids, method="integrated_gradients")
    # Grad-CAM came with the prediction, on the inference worker; IG on the explain worker.
    assert {e.image.claimed_by.split("@")[0] for e in gradcams} == {celery_worker.node}
    assert {e.claimed_by.split("@")[0] for e in igs} == {explain_worker.node}
    # Predictions did not wait for explanations: every prediction was stored before the last IG finished.
    last_ig = max(e.finished_at for e in igs)
    assert all(image.processed_at < last_ig for image in LesionImage.objects.filter(pk__in=ids))
    assert "Task diagnosis.tasks.explain_image_task[" in explain_worker.log()
    assert "Task diagnosis.tasks.explain_image_task[" not in celery_worker.log()
    assert "Task diagnosis.tasks.predict_image_task[" not in explain_worker.log()
