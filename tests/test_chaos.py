"""A short fault run under load (bench/chaos.py; the full one is `make chaos`): uploads keep coming while
the worker is killed, Redis stops and PostgreSQL is cut; every accepted upload ends done exactly once,
nothing is left queued or processing, and no file is orphaned."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from django.conf import settings

from bench.chaos import Schedule, run_chaos

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


def test_a_short_chaos_run_loses_nothing_and_processes_nothing_twice(worker_env, faults_setup, tmp_path):
    token, model_version = faults_setup
    media = tmp_path / "media"  # this run's own, so that its orphan check sees only its photos
    (media / "models").mkdir(parents=True)
    shutil.copy(Path(settings.MEDIA_ROOT) / model_version.weights.name, media / model_version.weights.name)
    schedule = Schedule(seconds=24, kill_at=0.1, restart_after=1, redis_at=0.35, redis_down=4, db_at=0.7, db_down=3)
    report = run_chaos(env={**worker_env, "MEDIA_ROOT": str(media)}, token=token, folder=tmp_path, schedule=schedule,
                       recorders=2, pause=0.25, settle_seconds=60)  # fmt: skip
    print(report.summary())
    assert len(report.accepted) >= 24, report.summary()
    assert report.problems == [], report.summary()
    assert report.orphan_files == [] and report.missing_files == [], report.summary()
    assert set(report.states) <= {"done", "failed"} and report.states.get("done", 0) >= len(report.accepted) - 2
    assert len(report.windows) == 3
    redis_window = next(window for name, window in report.windows.items() if name.startswith("Redis"))
    failed, total = report.error_rate(*redis_window)
    assert total > 0 and failed < total, report.summary()  # uploads are accepted while the broker is down
