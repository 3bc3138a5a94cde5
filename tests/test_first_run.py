"""`make run` on a first start (issue 22): the web server and the worker start at once and the banner comes
before the demo model exists; the model trains in the background while the portal shows its progress;
uploads made meanwhile, the demo patient's photos too, are scored by themselves once it is registered; a
second start trains nothing. Ctrl-C during training stops every process and registers nothing, and the next
start trains again. Real processes throughout: `manage.py rundemo` on the embedded default (SQLite, the
filesystem broker, local files) in a temporary var/, with a tiny model so that training takes seconds."""

from __future__ import annotations

import json
import os
import re
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from diagnosis.services.demo_training import TrainingProgress, clear_stale_status, read_status, training_notice
from tests.conftest import ROOT, lesion_jpeg, wait_for
from tests.test_embedded_default import free_port

pytestmark = pytest.mark.e2e

VERSION = "demo-resnet_tiny-64px-seed0"
TINY = ["--arch", "resnet_tiny", "--input-size", "64", "--test-images", "40", "--epochs", "2"]
NOTICE = 'id="demo-training"'


class Demo:
    """One `manage.py rundemo` in a subprocess, its output in a file."""

    def __init__(self, var_dir: Path, output: Path, *options: str) -> None:
        self.var_dir, self.output, self.port = var_dir, output, free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        env = {
            key: value
            for key, value in os.environ.items()
            if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "MEDIA_ROOT", "MODEL_CACHE_DIR", "STATIC_ROOT")
        }
        env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1"})
        self.started = time.monotonic()
        with open(output, "wb") as out:
            command = [sys.executable, "manage.py", "rundemo", "--port", str(self.port), *options]
            self.process = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def text(self) -> str:
        return self.output.read_text()

    def wait_for_banner(self, timeout: float = 150) -> str:
        wait_for(lambda: "Press Ctrl-C" in self.text() or self.process.poll() is not None, timeout, message="banner")
        assert self.process.poll() is None, self.text()
        return self.text()

    def token_headers(self) -> dict:
        token = re.search(r"API token:\s+(mlt_\w+)", self.text()).group(1)
        return {"Authorization": f"Token {token}"}

    def status(self) -> dict:
        path = self.var_dir / "demo-training.json"
        return json.loads(path.read_text()) if path.exists() else {}

    def interrupt(self) -> None:
        """Ctrl-C, as `make run` gets it: SIGINT to the command; it stops its processes."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        returncode = self.process.wait(timeout=90)
        assert returncode == 0, self.text()[-3000:]
        assert "Stopped." in self.text()


def model_versions(var_dir: Path) -> list[tuple[str, int]]:
    with sqlite3.connect(var_dir / "db.sqlite3") as database:
        return database.execute("SELECT version, is_active FROM diagnosis_modelversion").fetchall()


def descendants(pid: int) -> set[int]:
    """Every process below `pid` now (children, their children...), from /proc."""
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
    found, frontier = set(), {pid}
    while frontier:
        frontier = {child for child, parent in parents.items() if parent in frontier} - found
        found |= frontier
    return found


def alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def portal_session(base: str) -> requests.Session:
    session = requests.Session()
    session.get(f"{base}/accounts/login/", timeout=10)
    signed_in = session.post(f"{base}/accounts/login/", timeout=10, data={
        "username": "demo", "password": "demo-clinician", "csrfmiddlewaretoken": session.cookies["csrftoken"],
    })  # fmt: skip
    assert signed_in.ok and "Sign out" in signed_in.text, signed_in.text[:2000]
    return session


def test_banner_first_uploads_wait_for_the_background_model_and_a_second_start_trains_nothing(tmp_path):
    var_dir = tmp_path / "var"
    demo = Demo(var_dir, tmp_path / "first.out", *TINY, "--train-images", "120")
    try:
        banner = demo.wait_for_banner()
        assert f"Model:      {VERSION}, training in the background" in banner
        assert model_versions(var_dir) == [], "the banner came after the model was registered"
        # The training process has just been started: its status file follows within its start-up.
        status = wait_for(demo.status, 60, message="the training's status file")
        assert status["state"] in ("preparing", "training") and status["epochs"] == 2, status

        # While it trains: a visible notice on every portal page, the sign-in page included, and an upload
        # is accepted and waits in the queue.
        session = portal_session(demo.base)
        for path in ("/accounts/login/", "/"):
            page = (session if path == "/" else requests).get(f"{demo.base}{path}", timeout=10).text
            assert NOTICE in page and "Demo model training: " in page, page[:3000]
            assert "scored automatically once the model is registered" in page
        headers = demo.token_headers()
        upload = requests.post(f"{demo.base}/api/v1/images/", headers=headers, timeout=30,
                               files={"image": ("lesion.jpg", lesion_jpeg(seed=7))})  # fmt: skip
        assert upload.status_code in (201, 202) and upload.json()["state"] == "queued", upload.text
        assert model_versions(var_dir) == [], "the upload was not made before the model existed"

        # Then, with no click and no restart: the model is registered and every waiting photo is scored.
        def scored():
            image = requests.get(f"{upload.json()['status_url']}?wait=20", headers=headers, timeout=40).json()
            return image if image["state"] in ("done", "failed") else None

        image = wait_for(scored, 240, interval=0, message="the upload made during training to be scored")
        assert image["state"] == "done" and image["prediction"]["model_version"] == VERSION, image
        assert model_versions(var_dir) == [(VERSION, 1)]

        def demo_photos_done():
            images = requests.get(f"{demo.base}/api/v1/images/", headers=headers, timeout=10).json()["results"]
            return images if all(image["state"] == "done" for image in images) else None

        assert len(wait_for(demo_photos_done, 120, interval=0.5, message="the demo patient's photos")) == 5
        wait_for(lambda: "registered and active" in demo.text(), 30, message="rundemo to report the model")
        assert demo.status()["state"] == "registered" and demo.status()["epoch"] == 2  # read from training's log
        assert NOTICE not in session.get(f"{demo.base}/", timeout=10).text
        log = (var_dir / "log" / "training.log").read_text()
        assert "epoch 2/2" in log and f"Registered and activated {VERSION}" in log
    finally:
        demo.interrupt()

    second = Demo(var_dir, tmp_path / "second.out", *TINY, "--train-images", "120")
    try:
        banner = second.wait_for_banner(timeout=90)
        seconds = time.monotonic() - second.started
        assert f"Model:      {VERSION}\n" in banner and "training" not in banner, banner
        assert not (var_dir / "demo-training.json").exists()  # the finished run's status was cleared
        assert NOTICE not in requests.get(f"{second.base}/accounts/login/", timeout=10).text
        assert model_versions(var_dir) == [(VERSION, 1)]
        print(f"second start: banner after {seconds:.1f} s")
    finally:
        second.interrupt()


def test_ctrl_c_during_training_stops_every_process_and_the_next_start_trains_again(tmp_path):
    var_dir = tmp_path / "var"
    # More images than above, so that the interrupt lands while it trains.
    demo = Demo(var_dir, tmp_path / "first.out", *TINY, "--train-images", "400")
    try:
        demo.wait_for_banner()
        wait_for(lambda: demo.status().get("state") == "training", 120, message="training to start")
        training_pid = demo.status()["pid"]
        processes = descendants(demo.process.pid)
        assert training_pid in processes and len(processes) >= 3, processes  # web, worker (and its child), training
    finally:
        demo.interrupt()
    left = [pid for pid in processes if alive(pid)]
    assert left == [], f"processes still running after Ctrl-C: {left}"
    assert model_versions(var_dir) == []
    assert demo.status()["state"] == "stopped"
    assert "Demo training stopped (SIGTERM); no model was activated." in (var_dir / "log/training.log").read_text()
    with sqlite3.connect(var_dir / "db.sqlite3") as database:
        runs = database.execute("SELECT status FROM diagnosis_trainingrun").fetchall()
    assert ("running",) not in runs, runs

    again = Demo(var_dir, tmp_path / "again.out", *TINY, "--train-images", "400")
    try:
        assert "training in the background" in again.wait_for_banner()
        wait_for(lambda: "registered and active" in again.text() or "failed" in again.text(), 300,
                 message="the training started again to register its model")  # fmt: skip
        assert f"Demo model {VERSION} registered and active" in again.text(), again.text()
        assert model_versions(var_dir) == [(VERSION, 1)]
    finally:
        again.interrupt()


def test_the_notice_follows_the_training_log_and_a_dead_training_shows_none(settings, tmp_path):
    """The status file from training's own log lines: the data summary starts the clock, each epoch's summary
    gives the epochs done and the time left; a status whose process is gone shows no notice and is cleared."""
    settings.VAR_DIR = tmp_path
    now = [100.0]
    lines = []
    progress = TrainingProgress(epochs=4, write_line=lines.append, clock=lambda: now[0])
    assert "preparing the synthetic images (4 epochs to train)" in training_notice()
    progress("Data: 960 training, 240 validation and 300 test images; classes benign, malignant.")
    assert "epoch 1 of 4, the time left is known after the first epoch" in training_notice()
    now[0] += 30
    progress("epoch 1/4  loss 0.512  val AUC 0.801")
    status = read_status()
    assert (status["state"], status["epoch"], status["seconds_left"]) == ("training", 1, 108.0)  # 30 s x 3.6
    assert training_notice(now=status["updated_at"] + 18).startswith(
        "Demo model training: epoch 2 of 4, about 90 s left. Uploads are accepted meanwhile"
    )
    now[0] += 90
    progress("epoch 4/4  loss 0.301  val AUC 0.902")
    assert "evaluating and registering, about 20 s left" in training_notice(now=read_status()["updated_at"])
    assert lines[-1] == "epoch 4/4  loss 0.301  val AUC 0.902"

    progress.finish("registered", version="demo")
    assert training_notice() is None and clear_stale_status()["state"] == "registered"
    assert read_status() is None

    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    TrainingProgress(epochs=4, write_line=lines.append)
    status = read_status()
    status["pid"] = gone.pid  # a training killed without a word: its file still says "preparing"
    (tmp_path / "demo-training.json").write_text(json.dumps(status))
    assert training_notice() is None
    assert clear_stale_status()["state"] == "preparing" and read_status() is None
