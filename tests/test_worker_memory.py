"""A worker process is replaced for its memory only when it grows above what it held once warmed up
(webapp/worker_memory.py), never for what a healthy warmed process holds: on the H200 a warmed CUDA process
sat above Celery's absolute 2,000,000 KiB cap and was replaced after every task.

The rule is checked with this process's real resident memory, grown by real allocations; then a real
prefork worker, warmed up on a real model, runs tasks under a ceiling far below what it holds."""

from __future__ import annotations

import logging
import os
import re
import resource
import subprocess
import sys
import uuid

import pytest

from tests.conftest import ROOT, WorkerProcess, stop_worker, wait_for
from webapp.worker_memory import MemoryCap, resident_kib

ROLES = {"cpu": 1024, "gpu": 2048}
MB = 1024  # KiB


def warnings(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "webapp.worker_memory" and r.levelno >= logging.WARNING]


def test_the_reading_is_the_resident_memory_now_not_the_peak():
    before = resident_kib()
    block = b"\x01" * (96 << 20)
    during = resident_kib()
    assert during - before >= 90 * MB
    del block
    after = resident_kib()
    assert during - after >= 90 * MB  # given back: the reading falls again
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux: what Celery's own cap reads
    assert peak - after >= 80 * MB  # the peak keeps the block


def test_a_warmed_process_is_replaced_only_for_growth_above_its_baseline(caplog):
    caplog.set_level(logging.INFO, logger="webapp.worker_memory")
    cap = MemoryCap(growth_mb=64, growth_by_role_mb=ROLES)
    cap.warmed_up(resident_kib(), "cpu")
    held = []
    for _ in range(5):  # however much a healthy warmed process holds
        assert cap.after_task(resident_kib()) is False
    held.append(b"\x01" * (32 << 20))
    assert cap.after_task(resident_kib()) is False  # within the growth allowed
    held.append(b"\x01" * (64 << 20))
    assert cap.after_task(resident_kib()) is True  # 96 MB above its baseline
    assert len(warnings(caplog)) == 1
    assert "WORKER_MAX_MEMORY_GROWTH_MB=64" in warnings(caplog)[0]
    assert "replaced after this task" in warnings(caplog)[0]


def test_a_process_above_the_ceiling_right_after_its_warm_up_says_so_once_and_is_not_replaced(caplog):
    rss = resident_kib()
    ceiling_mb = rss // MB // 2  # as Celery's 2,000,000 KiB was for a warmed CUDA process
    cap = MemoryCap(growth_mb=64, growth_by_role_mb=ROLES, ceiling_mb=ceiling_mb)
    cap.warmed_up(rss, "gpu")
    for _ in range(10):
        assert cap.after_task(resident_kib(), "gpu") is False
    [warning] = warnings(caplog)
    assert f"holds {round(rss / MB)} MB right after its warm-up" in warning
    assert f"above WORKER_MAX_MEMORY_MB={ceiling_mb}" in warning
    assert f"baseline {round(rss / MB)} MB + WORKER_MAX_MEMORY_GROWTH_MB=64" in warning
    assert "Raise WORKER_MAX_MEMORY_MB" in warning
    held = [b"\x01" * (96 << 20)]  # growth is still capped
    assert cap.after_task(resident_kib(), "gpu") is True
    assert len(warnings(caplog)) == 2 and held


def test_a_process_above_its_cap_at_its_first_task_says_so_once_and_keeps_a_cap_above_that(caplog):
    cap = MemoryCap(growth_mb=32, growth_by_role_mb=ROLES)
    baseline = resident_kib()
    cap.warmed_up(baseline, "cpu")
    held = [b"\x01" * (64 << 20)]  # the first task touches what the warm-up did not
    first = resident_kib()
    assert cap.after_task(first) is False
    [warning] = warnings(caplog)
    assert f"holds {round(first / MB)} MB after its first task since its warm-up" in warning
    assert f"baseline {round(baseline / MB)} MB" in warning
    assert "Raise WORKER_MAX_MEMORY_GROWTH_MB" in warning
    assert cap.baseline_kib == first
    for _ in range(5):
        assert cap.after_task(resident_kib()) is False
    assert len(warnings(caplog)) == 1
    held.append(b"\x01" * (64 << 20))  # then it grows: replaced
    assert cap.after_task(resident_kib()) is True


def test_a_process_without_a_warm_up_takes_its_baseline_after_its_first_task():
    cap = MemoryCap(growth_mb=64, growth_by_role_mb=ROLES)
    held = [b"\x01" * (128 << 20)]  # its first task loads the model
    assert cap.after_task(resident_kib()) is False
    assert cap.baseline_kib is not None and cap.cap_kib() == cap.baseline_kib + 64 * MB
    assert cap.after_task(resident_kib()) is False and held


@pytest.mark.parametrize(("process_role", "growth_mb"), [("cpu", 1024), ("gpu", 2048)])
def test_the_growth_allowed_is_the_roles_default_unless_set(settings, process_role, growth_mb):
    assert settings.WORKER_MAX_MEMORY_GROWTH_MB is None and settings.WORKER_MAX_MEMORY_MB == 0
    cap = MemoryCap.from_settings()
    cap.warmed_up(resident_kib(), process_role)
    assert cap.growth_kib == growth_mb * MB and cap.ceiling_kib == 0
    assert f"WORKER_MAX_MEMORY_GROWTH_MB={growth_mb} (the {process_role} default)" == cap.growth_text

    settings.WORKER_MAX_MEMORY_GROWTH_MB = 300
    cap = MemoryCap.from_settings()
    cap.warmed_up(resident_kib(), process_role)
    assert cap.growth_kib == 300 * MB


def test_celerys_absolute_cap_is_off_and_its_former_setting_sets_the_ceiling():
    from webapp.celery import app

    assert app.conf.worker_max_memory_per_child is None

    def ceiling(**env: str) -> int:
        environment = {k: v for k, v in os.environ.items() if not k.startswith(("WORKER_MAX_MEMORY", "CELERY_WORKER"))}
        result = subprocess.run(
            [sys.executable, "-c", "from webapp.settings import base; print(base.WORKER_MAX_MEMORY_MB)"],
            cwd=ROOT, env={**environment, **env}, capture_output=True, text=True, timeout=60,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return int(result.stdout)

    assert ceiling() == 0
    assert ceiling(CELERY_WORKER_MAX_MEMORY_PER_CHILD="8000000") == 7812  # KiB, as the H200 run set it
    assert ceiling(CELERY_WORKER_MAX_MEMORY_PER_CHILD="8000000", WORKER_MAX_MEMORY_MB="3000") == 3000


def test_the_compose_gpu_worker_has_the_measured_batch_size_and_memory_cap():
    from tests.test_deploy import ENV_EXAMPLE, compose_environment, read_env_file

    variables = read_env_file(ENV_EXAMPLE)
    gpu, cpu = compose_environment("worker-gpu", variables), compose_environment("worker-cpu", variables)
    assert gpu["INFERENCE_BATCH_SIZE"] == "128"  # the H200 runs' batch size
    assert gpu["WORKER_MAX_MEMORY_GROWTH_MB"] == "2048"
    assert "INFERENCE_BATCH_SIZE" not in cpu and "WORKER_MAX_MEMORY_GROWTH_MB" not in cpu  # the CPU defaults
    assert gpu["WORKER_MAX_MEMORY_MB"] == cpu["WORKER_MAX_MEMORY_MB"] == ""  # no ceiling: the default
    # Without .env, compose's own defaults are the same.
    bare = {name: value for name, value in variables.items() if not name.startswith("GPU_")}
    assert compose_environment("worker-gpu", bare)["INFERENCE_BATCH_SIZE"] == "128"
    assert compose_environment("worker-gpu", bare)["WORKER_MAX_MEMORY_GROWTH_MB"] == "2048"


# --- a real worker ----------------------------------------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_a_real_warmed_worker_process_keeps_running_under_a_tight_ceiling_until_it_grows(
    worker_env, tiny_checkpoint, tmp_path
):
    """The worker warms up a real model, then holds far more than WORKER_MAX_MEMORY_MB (as a CUDA process
    held more than Celery's 2,000,000 KiB). It says so once and runs task after task in the same process;
    a task that leaves it 150 MB above its baseline ends with the process replaced, and the next task
    runs in a new one."""
    from diagnosis.services.registry import register_model
    from webapp.celery import app

    register_model(checkpoint=tiny_checkpoint, version=f"memcap-{uuid.uuid4().hex[:6]}", activate=True)
    queue = f"memcap-{uuid.uuid4().hex[:8]}"
    env = {**worker_env, "WORKER_MAX_MEMORY_GROWTH_MB": "100", "WORKER_MAX_MEMORY_MB": "50"}
    log_path = tmp_path / "worker.log"
    with open(log_path, "wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "celery", "-A", "tests.worker_memory_app", "worker", "-Q", f"inference,{queue}",
             "--concurrency", "1", "--pool", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
             "--hostname", f"test-memcap-{uuid.uuid4().hex[:6]}@%h"],
            cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
    worker = WorkerProcess(process, log_path)
    try:
        wait_for(lambda: " ready." in worker.log() or process.poll() is not None, 90, message="the worker to start")
        assert process.poll() is None, worker.log()[-3000:]

        def ran(count: int) -> list[int]:
            def enough():
                pids = [int(pid) for pid in re.findall(r"keep_memory ran in process (\d+)", worker.log())]
                return pids if len(pids) >= count or process.poll() is not None else None

            return wait_for(enough, 60, message=f"{count} tasks to run")

        for _ in range(6):
            app.send_task("tests.keep_memory", args=[0], queue=queue)
        pids = ran(6)
        log = worker.log()
        assert "warmed up model memcap-" in log, log[-3000:]
        assert len(set(pids)) == 1, log[-3000:]  # one process for all six: never replaced for its size
        assert log.count("right after its warm-up, above WORKER_MAX_MEMORY_MB=50") == 1, log[-3000:]
        assert "replaced after this task" not in log

        app.send_task("tests.keep_memory", args=[150], queue=queue)  # a leak: 150 MB above its baseline
        app.send_task("tests.keep_memory", args=[0], queue=queue)
        pids = ran(8)
        log = worker.log()
        assert pids[6] == pids[0] and pids[7] != pids[0], log[-3000:]
        assert "replaced after this task" in log
        # It left as Celery's own cap makes a process leave (EX_RECYCLE, after its result), not as a lost one.
        assert "exited with" not in log and "WorkerLostError" not in log, log[-3000:]
        # The new process warmed up too, and said so once itself.
        assert log.count("right after its warm-up, above WORKER_MAX_MEMORY_MB=50") == 2, log[-3000:]
        assert process.poll() is None
    finally:
        stop_worker(worker)
