"""bench/gpu_system.py's logic that is not timing: its options, the GPU worker's settings it gives the
worker, the decision to start PostgreSQL and Redis from the wheels only when they are absent, and the
summary's ratios. No service is started and nothing is timed."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from bench import gpu_system, services
from bench.services import Services, answers, to_start, with_port


def test_defaults_are_the_gpu_workers_settings(monkeypatch):
    monkeypatch.delenv("OUT", raising=False)
    args = gpu_system.parse_args([])
    assert args.processes == [2]
    assert args.batch_size == 128
    assert args.max_memory_per_child == 0  # the project's growth rule, not a ceiling
    assert args.services == "auto"
    assert args.files_per_request > 1  # through the batch API
    assert args.photo_wh == (1528, 1360)
    assert args.output == gpu_system.ROOT / "var" / "bench" / "gpu_system.md"


def test_output_goes_under_out_when_set(monkeypatch, tmp_path):
    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_system.parse_args([]).output == tmp_path / "gpu_system.md"
    assert gpu_system.parse_args(["--output", "x/y.md"]).output == Path("x/y.md")


def test_worker_process_list_and_bad_counts():
    assert gpu_system.parse_args(["--worker-processes", "1,2,4"]).processes == [1, 2, 4]
    for bad in ("0", "", "2,0"):
        with pytest.raises(SystemExit):
            gpu_system.parse_args(["--worker-processes", bad])


def test_smoke_preset_is_tiny_but_explicit_options_win():
    args = gpu_system.parse_args(["--smoke"])
    assert (args.images, args.processes, args.arch, args.batch_size) == (40, [1], "resnet_tiny", 8)
    assert args.photo_wh == (640, 480)
    args = gpu_system.parse_args(["--smoke", "--images", "100", "--worker-processes", "1,2"])
    assert args.images == 100 and args.processes == [1, 2] and args.clients == 2


def test_worker_settings_follow_processes_and_the_memory_cap():
    args = gpu_system.parse_args(["--batch-size", "64", "--max-memory-per-child", "8000000"])
    args.device = "cuda"
    env = gpu_system.worker_settings(args, processes=4, cores=16)
    assert env == {"INFERENCE_DEVICE": "cuda", "INFERENCE_BATCH_SIZE": "64", "DECODE_THREADS": "4",
                   "CELERY_WORKER_MAX_MEMORY_PER_CHILD": "8000000"}  # fmt: skip
    assert gpu_system.worker_settings(args, processes=4, cores=2)["DECODE_THREADS"] == "2"  # at least 2
    args = gpu_system.parse_args(["--max-memory-per-child", "0", "--decode-threads", "3"])
    args.device = "cpu"
    env = gpu_system.worker_settings(args, processes=2, cores=16)
    assert "CELERY_WORKER_MAX_MEMORY_PER_CHILD" not in env  # the project's default stays
    assert env["DECODE_THREADS"] == "3"


@pytest.mark.parametrize(
    ("mode", "postgres_up", "redis_up", "expected"),
    [
        ("auto", True, True, (False, False)),
        ("auto", False, True, (True, False)),
        ("auto", True, False, (False, True)),
        ("auto", False, False, (True, True)),
        ("own", True, True, (True, True)),
        ("machine", True, True, (False, False)),
    ],
)
def test_services_are_started_only_when_absent_or_asked(mode, postgres_up, redis_up, expected):
    assert to_start(mode, postgres_answers=postgres_up, redis_answers=redis_up) == expected


def test_machine_mode_refuses_a_missing_service_and_unknown_modes_fail():
    with pytest.raises(SystemExit, match="Redis"):
        to_start("machine", postgres_answers=True, redis_answers=False)
    with pytest.raises(ValueError):
        to_start("sometimes", postgres_answers=True, redis_answers=True)


def test_answers_tells_a_listening_port_from_a_closed_one():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        port = listener.getsockname()[1]
        assert answers(f"redis://127.0.0.1:{port}/13")
    assert not answers(f"postgres://postgres@127.0.0.1:{port}/x", timeout=0.5)


def test_with_port_keeps_user_and_database():
    assert with_port("postgres://postgres@127.0.0.1:5432/melanoma_gpubench", 41000) == (
        "postgres://postgres@127.0.0.1:41000/melanoma_gpubench")  # fmt: skip
    assert with_port("redis://localhost:6379/13", 41001) == "redis://127.0.0.1:41001/13"


def test_services_start_only_the_missing_one(monkeypatch):
    started = []
    monkeypatch.setattr(services, "answers", lambda url, timeout=1.0: url.startswith("postgres"))
    monkeypatch.setattr(services, "wheel_binaries", lambda site: (Path("/pg/bin"), Path("/redis-server")))
    monkeypatch.setattr(Services, "_start_postgres", lambda self, pg_bin: started.append(("postgres", pg_bin)))
    monkeypatch.setattr(Services, "_start_redis", lambda self, binary: started.append(("redis", binary)))
    box = Services(
        mode="auto", database_url="postgres://postgres@127.0.0.1:5432/x", broker_url="redis://127.0.0.1:6379/1"
    )
    try:
        box.start()
        assert started == [("redis", Path("/redis-server"))]
        assert box.folder is not None and box.folder.is_dir()
    finally:
        box.stop()
    assert not box.folder.exists()


def test_services_with_both_answering_start_nothing(monkeypatch):
    monkeypatch.setattr(services, "answers", lambda url, timeout=1.0: True)
    monkeypatch.setattr(services, "wheel_binaries", lambda site: pytest.fail("no wheel is needed"))
    box = Services(
        mode="auto", database_url="postgres://postgres@127.0.0.1:5432/x", broker_url="redis://127.0.0.1:6379/1"
    )
    box.start()
    assert box.folder is None
    assert box.describe() == "the machine's PostgreSQL and Redis"
    assert box.database_url.endswith(":5432/x")


def test_ratio_of_one_worker_process_to_its_batch_path():
    figures = gpu_system.ratios(1200.0, 4, 4000.0, path_n=8000.0)
    assert figures["per_process"] == pytest.approx(300.0)
    assert figures["per_process_ratio"] == pytest.approx(0.075)
    assert figures["system_over_path_n"] == pytest.approx(0.15)
    assert "system_over_path_n" not in gpu_system.ratios(700.0, 1, 4000.0)


def test_worker_memory_sees_recycled_children():
    kept = {"half": {"worker": [(1, 150, 150), (2, 1900, 1910)]}, "all": {"worker": [(1, 150, 150), (2, 1950, 1990)]}}
    replaced = {"half": {"worker": [(1, 150, 150), (2, 1900, 1910)]}, "all": {"worker": [(1, 150, 150), (7, 600, 600)]}}
    assert gpu_system.worker_memory(kept) == {"rss": 1950, "peak": 1990, "replaced": False}
    assert gpu_system.worker_memory(replaced)["replaced"] is True
    assert gpu_system.worker_memory({"all": kept["all"]})["replaced"] is False  # no half-way reading


def _run(device: str) -> tuple[dict, list[dict]]:
    run = {"device": device, "machine": "m", "services": "s", "batch": 128, "decode": "nvJPEG",
           "path_rates": [4000.0, 4200.0], "settings": "x"}  # fmt: skip
    latency = {
        "prediction_p50": 12.0,
        "prediction_p95": 20.0,
        "single_warm_ms": 10.0,
        "others_warm_ms": {"device": 4.0},
    }
    config = {"processes": 2, "path_n": 5000.0, "rates": [700.0, 800.0, 750.0], "how": "h", "latency": latency,
              "uploads": 30, "cpu_ms": {"web": 2.9, "worker": 2.5},
              "memory": {"rss": 1900.0, "peak": 1950.0, "replaced": True}}  # fmt: skip
    return run, [config]


def test_summary_rows_carry_the_ratios_and_mark_goals_on_cuda_only():
    rows = dict(gpu_system.summary_rows(*_run("cuda")))
    text = gpu_system.table(list(rows.items()))
    assert "4,100 images/s" in text  # the batch path: mean of before and after
    assert "**750 images/s**" in text  # the system: median of the rounds
    ratio = next(figure for what, figure in rows.items() if what.startswith("one worker process / its own"))
    assert ratio.startswith("**0.09x** (375 / 4,100)") and "goal >= 0.5x" in ratio
    latency = next(figure for what, figure in rows.items() if "p50 / in-process single image" in what)
    assert latency.startswith("**1.20x**") and "goal <= 1.2x" in latency
    assert any(figure.startswith("3.00x") for figure in rows.values())  # p50 / the worker's path for one photo
    assert any("children were replaced" in figure for figure in rows.values())
    assert "0.15x" in rows["whole system / batch path of 2 processes"]
    assert "goal" not in gpu_system.table(gpu_system.summary_rows(*_run("cpu")))


def test_throughput_still_exports_make_photos():
    from bench.throughput import make_photos

    photos = make_photos(1, size=(64, 48))
    assert photos[0][:2] == b"\xff\xd8"  # a JPEG
