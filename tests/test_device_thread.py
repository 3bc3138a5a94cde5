"""In a worker process every torch operator runs on the device thread (services.runtime.on_device). One
parallel operator on any other thread gives the process a second OpenMP team, and from then on every
forward pass takes up to twice as long (bench/README.md, issue 17). These tests watch the task's own
thread with a torch function mode, which sees only the calls made on the thread that entered it."""

from __future__ import annotations

import pytest
import torch
from django.db import transaction
from torch.overrides import TorchFunctionMode

from diagnosis.models import Explanation
from diagnosis.services.explanation_files import render_explanations
from diagnosis.services.explanation_work import compute_explanations
from diagnosis.services.images import submit_image
from diagnosis.services.predictions import process_images
from tests.conftest import lesion_jpeg, upload_file

# What a decode thread or the task's own thread may call: wrapping a NumPy array computes nothing.
HARMLESS = {torch.from_numpy}


class TorchCalls(TorchFunctionMode):
    """The torch functions called on this thread while the mode is active."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[str] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func not in HARMLESS:
            self.calls.append(getattr(func, "__qualname__", repr(func)))
        return func(*args, **(kwargs or {}))


def queued(clinic, clinician, count: int, seed: int) -> list[str]:
    with transaction.atomic():
        return [str(submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=seed + i))).pk)
                for i in range(count)]  # fmt: skip


def explanation_ids(image_ids: list[str], method: str) -> list[str]:
    return [
        str(pk) for pk in Explanation.objects.filter(image_id__in=image_ids, method=method).values_list("pk", flat=True)
    ]


@pytest.mark.parametrize(
    ("photos", "decoder"),
    [(1, "pillow"), (3, "pillow"), (3, "torchvision")],
    ids=["a lone photo", "a batch", "a batch decoded by torchvision"],
)
def test_predicting_explaining_and_drawing_call_no_torch_on_the_tasks_thread(
    clinic, clinician, active_model, settings, photos, decoder
):
    settings.AUTO_EXPLAIN_METHODS = ["integrated_gradients"]
    settings.INFERENCE_DECODE = decoder
    settings.INFERENCE_BATCH_SIZE = 4
    ids = queued(clinic, clinician, photos, seed=700 + photos)
    with TorchCalls() as watched:
        outcomes = process_images(image_ids=ids[:1], worker_id="thread:1", gather=photos - 1)
        rendered = render_explanations(explanation_ids=explanation_ids(ids, "gradcam"))
        explained = compute_explanations(explanation_ids=explanation_ids(ids, "integrated_gradients"), worker_id="t:2")
    assert outcomes == dict.fromkeys(ids, "done")
    assert len(rendered) == photos and set(rendered.values()) == {"done"}
    assert len(explained) == photos and set(explained.values()) == {"done"}
    assert watched.calls == []
