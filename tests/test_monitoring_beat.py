"""The drift report on its schedule: a real worker process with beat embedded, the real broker and the
real database; nothing in this process computes a report."""

from __future__ import annotations

import re
import subprocess
import sys
import uuid
from datetime import datetime

import pytest

from diagnosis.models import DriftReport, ModelVersion, ReferenceFeature
from tests.conftest import ROOT, WorkerProcess, stop_worker, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_beat_schedule_has_a_real_worker_compute_drift_reports(worker_env, tmp_path):
    # An active model with a reference set (the report reads only the database, never the weights).
    model_version = ModelVersion.objects.create(
        version="beat-model", arch="resnet_tiny", input_size=64, class_names=["benign", "malignant"], threshold=0.5,
        weights="models/beat.pt", weights_sha256="2" * 64, is_active=True,
    )  # fmt: skip
    ReferenceFeature.objects.bulk_create(
        ReferenceFeature(model_version=model_version, split="test", label="benign", path=f"ref/{index}.jpg",
                         values={"brightness": 100.0 + index})
        for index in range(120)
    )  # fmt: skip
    env = {**worker_env, "DRIFT_REPORT_INTERVAL_SECONDS": "2", "REQUEUE_INTERVAL_SECONDS": "3600"}
    name = f"beat-{uuid.uuid4().hex[:6]}@%h"
    log_path = tmp_path / "beat-worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "webapp", "worker", "--beat", "--schedule",
             str(tmp_path / "celerybeat-schedule"), "-Q", "default", "--concurrency", "1", "--pool", "prefork",
             "--without-gossip", "--without-mingle", "--loglevel", "INFO", "--hostname", name],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker = WorkerProcess(process, log_path, name)
    try:
        reports = wait_for(
            lambda: (
                list(DriftReport.objects.filter(triggered_by="schedule").order_by("created_at")[:2])
                if DriftReport.objects.filter(triggered_by="schedule").count() >= 2 or process.poll() is not None
                else None
            ),
            90,
            message="two scheduled drift reports",
        )
        assert process.poll() is None, worker.log()[-3000:]
        first, second = reports
        for report in (first, second):
            assert report.model_version == model_version
            assert report.status == DriftReport.Status.INSUFFICIENT
            assert report.message == "Too few uploads to judge: 0 in this window, at least 50 are needed."
            assert report.reference_count == 120 and report.window_description == "last 7 days"
        log = worker.log()
        assert "beat: Starting..." in log
        # Sent every DRIFT_REPORT_INTERVAL_SECONDS (2 s) by beat, not all at once.
        sent = [
            datetime.strptime(match, "%Y-%m-%d %H:%M:%S,%f")
            for match in re.findall(
                r"^\[([\d-]+ [\d:,]+): INFO/Beat\] Scheduler: Sending due task drift-report "
                r"\(diagnosis\.tasks\.drift_report_task\)$",
                log,
                flags=re.MULTILINE,
            )
        ]
        assert len(sent) >= 2, log[-3000:]
        assert 1.5 <= (sent[1] - sent[0]).total_seconds() <= 10
        assert "Sending due task requeue-stale-images" not in log  # its interval is an hour here
    finally:
        stop_worker(worker)
    assert process.returncode is not None
