"""Two worker "machines": separate processes that share only what two machines would share (PostgreSQL,
Redis and the S3 bucket), each with its own --hostname, queues, model cache and temporary folder.
They split a burst of uploads between them, and no image is processed twice.
"""

from __future__ import annotations

import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from diagnosis.models import Explanation, ImageState, LesionImage, Prediction
from tests.conftest import WorkerProcess, start_worker, stop_worker, wait_for
from tests.test_faults import Processes, accepted
from tests.test_storage_s3 import moto_bucket

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

UPLOADS = 40

s3_bucket = pytest.fixture(scope="module")(moto_bucket)


@dataclass
class Machine:
    host: str
    queues: str
    home: Path

    @property
    def cache_dir(self) -> Path:
        return self.home / "model-cache"

    def env(self, common: dict[str, str]) -> dict[str, str]:
        (self.home / "tmp").mkdir(parents=True, exist_ok=True)
        return {**common, "MODEL_CACHE_DIR": str(self.cache_dir), "TMPDIR": str(self.home / "tmp")}

    def start(self, common: dict[str, str]) -> WorkerProcess:
        return start_worker(env=self.env(common), log_path=self.home / "worker.log", queues=self.queues,
                            name=f"worker-{uuid.uuid4().hex[:6]}@{self.host}")  # fmt: skip


def test_two_worker_machines_share_a_burst_of_uploads_and_never_process_an_image_twice(
    worker_env, s3_bucket, tiny_checkpoint, settings, tmp_path
):
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token
    from tests.factories import ClinicFactory, ClinicianFactory

    settings.STORAGES = s3_bucket.storages()
    model_version = register_model(
        checkpoint=tiny_checkpoint, version=f"machines-{uuid.uuid4().hex[:8]}", activate=True
    )
    clinic = ClinicFactory(name=f"Two machines {uuid.uuid4().hex[:6]}")
    _, token = create_api_token(user=ClinicianFactory(membership__clinic=clinic), name="two machines")
    # A GPU machine that only predicts, and a CPU machine that also draws the heatmaps (default queue).
    machines = [Machine("gpu-a.example", "inference", tmp_path / "a"), Machine("cpu-b.example", "inference,default",
                                                                               tmp_path / "b")]  # fmt: skip

    with Processes(tmp_path) as processes:
        redis = processes.redis()  # private: no other worker of the session can take these tasks
        common = {
            **worker_env,
            **s3_bucket.env,
            "CELERY_BROKER_URL": redis.url,
            "AUTO_EXPLAIN_METHODS": "none",
            "INFERENCE_BATCH_SIZE": "4",
            "GRADCAM_PICTURES": "eager",  # drawn at once, where the default queue is read
        }
        web = processes.web(common)
        with ThreadPoolExecutor(len(machines)) as pool:  # both machines boot at once
            starts = [pool.submit(machine.start, common) for machine in machines]
        workers = [start.result() for start in starts if start.exception() is None]
        try:
            assert len(workers) == len(machines), [str(start.exception()) for start in starts]
            # " ready." is the main process's; its pool's child may still be loading the model. A burst sent
            # then is cleared by the other machine alone, and the share below cannot be judged.
            for worker in workers:
                wait_for(lambda worker=worker: "warmed up model" in worker.log(), 90, message="each worker's warm-up")
            web.wait_ready()
            with web.client(token) as client, ThreadPoolExecutor(4) as uploaders:
                ids = list(uploaders.map(lambda seed: accepted(web, client, seed)["id"], range(UPLOADS)))
            images = LesionImage.objects.filter(pk__in=ids)
            wait_for(lambda: images.filter(state__in=[ImageState.DONE, ImageState.FAILED]).count() == UPLOADS, 120,
                     interval=0.5, message="every upload to finish")  # fmt: skip
            gradcams = Explanation.objects.filter(image_id__in=ids, method="gradcam", state=Explanation.State.DONE)
            wait_for(lambda: gradcams.count() == UPLOADS, 60, interval=0.5, message="the heatmaps of every upload")
        finally:
            for worker in workers:
                stop_worker(worker)

    assert set(images.values_list("state", flat=True)) == {ImageState.DONE}
    predictions = Prediction.objects.filter(image_id__in=ids)
    assert predictions.count() == UPLOADS and predictions.values("image_id").distinct().count() == UPLOADS
    assert set(predictions.values_list("model_version_id", flat=True)) == {model_version.pk}
    assert set(images.values_list("attempts", flat=True)) == {1}  # each claimed once, by one machine

    # Both machines took a share: the claims name each one's node and host.
    claims = [claim.split(":")[0] for claim in images.values_list("claimed_by", flat=True)]
    by_machine = {machine.host: sum(claim.endswith(f"@{machine.host}") for claim in claims) for machine in machines}
    assert sum(by_machine.values()) == UPLOADS and all(by_machine.values()), by_machine
    for machine, worker in zip(machines, workers, strict=True):
        log = worker.log()  # "Task diagnosis.tasks.<name>[<task id>] succeeded in ..."
        assert "predict_image_task[" in log and "] succeeded in " in log, log[-2000:]
        # The heatmaps were drawn only where the default queue is read.
        assert ("render_explanation_task[" in log) is ("default" in machine.queues), log[-2000:]

        # Each machine fetched the weights from the bucket into its own cache.
        cached = machine.cache_dir / f"{model_version.weights_sha256}.pt"
        assert cached.is_file() and hashlib.sha256(cached.read_bytes()).hexdigest() == model_version.weights_sha256
