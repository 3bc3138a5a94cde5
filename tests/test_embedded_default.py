"""`make run`'s embedded default, end to end: `manage.py rundemo` with SQLite, the filesystem
broker and local files, a real web server and a real worker, then a clean Ctrl-C."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import requests

from tests.conftest import ROOT, lesion_jpeg, wait_for

pytestmark = pytest.mark.e2e


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_rundemo_serves_the_api_with_sqlite_and_filesystem_broker(tmp_path):
    port = free_port()
    var_dir = tmp_path / "var"
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DATABASE_URL", "CELERY_BROKER_URL", "MEDIA_ROOT", "MODEL_CACHE_DIR", "STATIC_ROOT")
    }
    env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "VAR_DIR": str(var_dir), "PYTHONUNBUFFERED": "1"})
    output = tmp_path / "rundemo.out"
    with open(output, "wb") as out:
        process = subprocess.Popen(
            [sys.executable, "manage.py", "rundemo", "--port", str(port), "--arch", "resnet_tiny",
             "--input-size", "64", "--train-images", "120", "--test-images", "40", "--epochs", "1"],
            cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT,
        )  # fmt: skip
    try:
        wait_for(
            lambda: "Press Ctrl-C" in output.read_text() or process.poll() is not None, 180, message="rundemo banner"
        )
        banner = output.read_text()
        assert process.poll() is None, banner
        token = re.search(r"API token:\s+(mlt_\w+)", banner).group(1)
        assert f"http://127.0.0.1:{port}/" in banner
        assert "demo / demo-clinician" in banner
        assert (var_dir / "db.sqlite3").exists()

        headers = {"Authorization": f"Token {token}"}
        base = f"http://127.0.0.1:{port}"
        # The upload waits for its prediction (?wait=N): the worker tells the web server through the local
        # transport (a Unix datagram socket under var/notify), no polling.
        # The first one may find the worker still loading the model: it follows with GETs that wait.
        first = requests.post(f"{base}/api/v1/images/?wait=30", headers=headers,
                              files={"image": ("lesion.jpg", lesion_jpeg(seed=6))}, timeout=60)  # fmt: skip
        assert first.status_code in (201, 202), (first.status_code, first.text)
        for _ in range(3):
            if first.json()["state"] in ("done", "failed"):
                break
            first = requests.get(f"{first.json()['status_url']}?wait=30", headers=headers, timeout=60)
        assert first.json()["state"] == "done", first.text
        response = requests.post(f"{base}/api/v1/images/?wait=30", headers=headers,
                                 files={"image": ("lesion.jpg", lesion_jpeg(seed=5))}, timeout=60)  # fmt: skip
        assert response.status_code == 201, (response.status_code, response.text)
        body = response.json()
        assert list((var_dir / "notify").glob("*.sock")), "the web server listens on no local socket"
        again = requests.get(f"{response.json()['status_url']}status/", headers={**headers, "Prefer": "wait=5"},
                             timeout=30)  # fmt: skip
        assert again.status_code == 200 and again.headers["Preference-Applied"] == "wait=5"
        assert again.json()["prediction"] == {key: body["prediction"][key] for key in again.json()["prediction"]}
        worker_log = (var_dir / "log" / "worker.log").read_text()
        assert body["state"] == "done", (body, worker_log[-3000:])
        assert body["prediction"]["model_version"] == "demo-resnet_tiny-64px-seed0"
        assert "filesystem://" in worker_log
        stored = list(Path(var_dir / "media" / "images").glob("*.jpg"))
        assert len(stored) == 6  # these two uploads and the demo patient's four synthetic photos

        def demo_photos_done():
            images = requests.get(f"{base}/api/v1/images/", headers=headers, timeout=10).json()["results"]
            return images if all(image["state"] == "done" for image in images) else None

        images = wait_for(demo_photos_done, 60, interval=0.5, message="the demo patient's photos to be scored")
        assert len(images) == 6
        assert "Seeded demo patient DEMO-0001 with 4 synthetic photos." in output.read_text()
        assert requests.get(f"{base}/api/v1/images/", timeout=10).status_code == 401
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGINT)
        returncode = process.wait(timeout=60)
    assert returncode == 0, output.read_text()[-3000:]
    assert "Stopped." in output.read_text()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"http://127.0.0.1:{port}/", timeout=5)
