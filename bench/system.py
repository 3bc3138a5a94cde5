"""The whole system on loopback for the benchmarks (bench/throughput.py, bench/gpu_system.py): gunicorn and a
Celery worker over PostgreSQL and Redis (or the embedded default), API clients, and what the system's
processes use (CPU seconds, memory), with the sequential-upload latency and concurrent-client throughput
measurements built on them."""

from __future__ import annotations

import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC
from pathlib import Path

import numpy as np

from bench.procfs import children, cpu_seconds, vm
from bench.services import fresh_database

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATABASE_URL = "postgres://postgres@127.0.0.1:5432/melanoma_bench"
BROKER_URL = "redis://127.0.0.1:6379/7"


class Stack:
    """gunicorn + one Celery worker (or runserver + worker for the embedded default), with a token. The
    database (created afresh) and the Redis database (flushed) are DATABASE_URL's and BROKER_URL's, or
    those given; service_pids, when given, names the PostgreSQL and Redis processes for the CPU figures
    (else every process called so on the machine)."""

    def __init__(self, *, out: Path, embedded: bool, port: int, worker_concurrency: int, torch_threads: int,
                 web_workers: int, arch: str, input_size: int, queues: str, extra_env=None,
                 database_url: str = DATABASE_URL, broker_url: str = BROKER_URL, service_pids=None,
                 start_timeout: float = 90) -> None:  # fmt: skip
        self.out, self.embedded, self.port = out, embedded, port
        self.database_url, self.service_pids = database_url, service_pids
        self.draws_pictures = "default" in queues.split(",")
        shutil.rmtree(out, ignore_errors=True)
        out.mkdir(parents=True)
        self.env = {
            **os.environ, "SECRET_KEY": secrets.token_urlsafe(50), "ALLOWED_HOSTS": "127.0.0.1,localhost",
            "SECURE_SSL_REDIRECT": "false", "MEDIA_ROOT": str(out / "media"), "VAR_DIR": str(out),
            "MODEL_CACHE_DIR": str(out / "model-cache"), "AUTO_EXPLAIN_METHODS": "none", "API_RATE_LIMIT": "",
            "API_UPLOAD_RATE_LIMIT": "", "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
            "TORCH_NUM_THREADS": str(torch_threads), "CELERY_WORKER_CONCURRENCY": str(worker_concurrency),
            **(extra_env or {}),
        }  # fmt: skip
        if embedded:
            self.env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "DATABASE_URL": "",
                             "CELERY_BROKER_URL": "filesystem://"})  # fmt: skip
            self.env.pop("DATABASE_URL")
        else:
            self.env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "DATABASE_URL": database_url,
                             "CELERY_BROKER_URL": broker_url, "CACHE_URL": broker_url})  # fmt: skip
            fresh_database(database_url)
            import redis

            redis.Redis.from_url(broker_url).flushdb()
        self.manage("migrate", "-v", "0")
        token_file = out / "token.txt"
        self.manage("shell", "-c", SETUP.format(arch=arch, size=input_size, token=token_file))
        self.token = token_file.read_text().strip()
        self.logs = {name: open(out / f"{name}.log", "wb") for name in ("web", "worker")}  # noqa: SIM115
        if embedded:
            web = [PY, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"]
        else:
            web = [PY, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py", "-b", f"127.0.0.1:{port}",
                   "-w", str(web_workers)]  # fmt: skip
        worker = [PY, "-m", "celery", "-A", "webapp", "worker", "-Q", queues, "--concurrency",
                  str(worker_concurrency), "--loglevel", "WARNING", "--hostname", "bench@%h"]  # fmt: skip
        self.processes = {
            name: subprocess.Popen(
                command,
                cwd=ROOT,
                env=self.env,
                stdout=self.logs[name],
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )  # fmt: skip
            for name, command in (("web", web), ("worker", worker))
        }
        deadline = time.monotonic() + start_timeout
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit(f"the web server did not start; see {out}/web.log") from None
                time.sleep(0.5)
        time.sleep(3)  # the worker's warm-up

    def manage(self, *args: str) -> str:
        return subprocess.run([PY, "manage.py", *args], cwd=ROOT, env=self.env, check=True, capture_output=True,
                              text=True).stdout  # fmt: skip

    def upload(self, session: Client, data: bytes) -> str:
        return session.upload("/api/v1/images/", data, token=self.token)

    def query(self, sql: str, params: tuple = ()) -> list[tuple]:
        """Straight SQL, so that watching the system costs it next to nothing."""
        if self.embedded:
            import sqlite3

            if getattr(self, "_connection", None) is None:  # one connection, autocommit: no read transaction lingers
                self._connection = sqlite3.connect(self.out / "db.sqlite3", timeout=30, isolation_level=None)
            return self._connection.execute(sql.replace("%s", "?"), params).fetchall()
        import psycopg

        if getattr(self, "_connection", None) is None:
            self._connection = psycopg.connect(self.database_url, autocommit=True)
        return self._connection.execute(sql, params).fetchall()

    def state(self, image_id: str) -> str:
        return self.query("SELECT state FROM diagnosis_lesionimage WHERE id = %s", (image_id.replace("-", "")
                          if self.embedded else image_id,))[0][0]  # fmt: skip

    def predictions(self) -> int:
        return self.query("SELECT count(*) FROM diagnosis_prediction")[0][0]

    def timings(self) -> list[tuple[float, float, float | None]]:
        """Per image: (created, prediction stored, Grad-CAM stored) as epoch seconds, oldest first."""
        rows = self.query(
            "SELECT i.created_at, p.created_at, e.finished_at FROM diagnosis_prediction p "
            "JOIN diagnosis_lesionimage i ON i.id = p.image_id "
            "LEFT JOIN diagnosis_explanation e ON e.image_id = i.id AND e.method = 'gradcam' AND e.state = 'done' "
            "ORDER BY i.created_at"
        )
        return [(_epoch(c), _epoch(p), _epoch(g) if g else None) for c, p, g in rows]

    def memory(self) -> dict[str, list[tuple[int, float, float]]]:
        """Per process group: (pid, VmRSS MB, VmHWM MB) of the main process and each of its children."""
        result = {}
        for name, process in self.processes.items():
            pids = [process.pid, *children(process.pid)]
            result[name] = [(pid, *vm(pid)) for pid in pids]
        return result

    def stop(self) -> None:
        for process in self.processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in self.processes.values():
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for log in self.logs.values():
            log.close()


class Client:
    """One API client: a keep-alive HTTP connection and multipart bodies encoded once per photo, so that
    the load generator, which shares the cores with the system, takes as little of them as it can (a
    hospital's client runs on its own machine)."""

    BOUNDARY = "----melanoma-bench-boundary"

    def __init__(self, port: int) -> None:
        self.port, self.connection, self.bodies = port, None, {}

    def upload(self, path: str, data: bytes, *, token: str) -> str:
        return self._post(path, [data], "image", token=token)["id"]

    def upload_batch(self, path: str, photos: list[bytes], *, token: str) -> list[str]:
        """The batch API: several photos in one request; every one of them must be accepted."""
        answer = self._post(path, photos, "images", token=token)
        if answer["rejected"]:
            raise RuntimeError(f"the batch API rejected {answer['rejected']}")
        return [item["id"] for item in answer["accepted"]]

    def _post(self, path: str, photos: list[bytes], field: str, *, token: str) -> dict:
        import http.client
        import json

        key = (field, *map(id, photos))
        body = self.bodies.get(key)
        if body is None:
            parts = [
                (f'--{self.BOUNDARY}\r\nContent-Disposition: form-data; name="{field}"; filename="lesion.jpg"\r\n'
                 "Content-Type: image/jpeg\r\n\r\n").encode() + data + b"\r\n"
                for data in photos
            ]  # fmt: skip
            body = self.bodies[key] = b"".join(parts) + f"--{self.BOUNDARY}--\r\n".encode()
        headers = {"Authorization": f"Token {token}", "Content-Type": f"multipart/form-data; boundary={self.BOUNDARY}"}
        for attempt in range(2):  # a keep-alive connection the server closed meanwhile: reconnect once
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=120)
            try:
                self.connection.request("POST", path, body=body, headers=headers)
                response = self.connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.connection.close()
                self.connection = None
                if attempt:
                    raise
        if response.status != 202:
            raise RuntimeError(f"upload answered {response.status}: {payload[:300]!r}")
        return json.loads(payload)


def cpu_by_group(stack: Stack) -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each process of each part of the system (live processes only)."""
    groups = {name: [process.pid, *children(process.pid)] for name, process in stack.processes.items()}
    if stack.service_pids is not None:
        groups.update(stack.service_pids())
    else:
        for name, pattern in (("postgresql", "postgres"), ("redis", "redis-server")):
            found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
            groups[name] = [int(pid) for pid in found]
    groups["clients (this script)"] = [os.getpid()]
    return {name: {pid: cpu_seconds(pid) for pid in pids} for name, pids in groups.items()}


def cpu_used(before: dict[str, dict[int, float]], after: dict[str, dict[int, float]]) -> dict[str, float]:
    """CPU seconds each part used between two readings, process by process: a process that ended
    meanwhile (a database backend whose client disconnected) is left out rather than subtracted."""
    return {name: sum(seconds - before.get(name, {}).get(pid, 0.0) for pid, seconds in pids.items())
            for name, pids in after.items()}  # fmt: skip


def _epoch(value) -> float:
    from datetime import datetime

    if isinstance(value, str):  # SQLite: naive UTC
        value = datetime.fromisoformat(value).replace(tzinfo=UTC)
    return value.timestamp()


SETUP = """
import torch
from diagnosis.models import Clinic
from diagnosis.services.clinics import create_clinician
from diagnosis.services.registry import register_model
from diagnosis.services.tokens import create_api_token
from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes
torch.manual_seed(0)
meta = CheckpointMeta(arch="{arch}", input_size={size})
register_model(checkpoint=checkpoint_bytes(build_model("{arch}").eval(), meta), version="bench-{arch}-{size}",
               activate=True)
clinic = Clinic.objects.create(name="Bench clinic")
user = create_clinician(clinic=clinic, username="bench", password=None)
open("{token}", "w").write(create_api_token(user=user, name="bench")[1])
"""


def wait_done(stack: Stack, image_id: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = stack.state(image_id)
        if state in ("done", "failed"):
            return state
        # The times come from the server's own timestamps, so polling faster would not make them shorter;
        # it would only take CPU from the server on this 2-core machine while it works.
        time.sleep(0.05)
    raise SystemExit(f"image {image_id} was not processed within {timeout} s")


def idle_latency(stack: Stack, photos: list[bytes], uploads: int, reference=None, others=None) -> dict:
    """Sequential uploads, each waited for (and its Grad-CAM pictures, where the worker draws them).
    With a reference (an object with single_ms(photo), bench.inprocess's InProcess or WorkerPath), after
    each upload and 0.1 s of idle, the same photo decoded and run in this process three times: the first
    as cold as the upload found the machine, the third back to back. So the system and its floor are
    measured through the same minutes of this shared machine's noise. `others`, {name: reference}: each
    also run three times after the reference, its third run's median reported in others_warm_ms."""
    session = Client(stack.port)
    cold, warm = [], []
    others_warm: dict[str, list[float]] = {name: [] for name in others or {}}
    window = system_cpu = 0.0
    for index in range(uploads):
        photo = photos[index % len(photos)]
        image_id = stack.upload(session, photo)
        assert wait_done(stack, image_id) == "done"
        if stack.draws_pictures:  # idle means idle: the Grad-CAM pictures of this one are drawn too
            deadline = time.monotonic() + 60
            while not stack.query(
                "SELECT 1 FROM diagnosis_explanation WHERE image_id = %s AND method = 'gradcam' AND state = 'done'",
                (image_id.replace("-", "") if stack.embedded else image_id,),
            ):
                if time.monotonic() > deadline:
                    raise SystemExit("the Grad-CAM pictures were not drawn within 60 s")
                time.sleep(0.01)
        time.sleep(0.1)
        if reference is not None:
            before = cpu_by_group(stack)
            started = time.perf_counter()
            cold.append(reference.single_ms(photo))
            reference.single_ms(photo)
            warm.append(reference.single_ms(photo))  # the third in a row
            window += time.perf_counter() - started
            used = cpu_used(before, cpu_by_group(stack))
            system_cpu += sum(seconds for name, seconds in used.items() if name != "clients (this script)")
        for name, other in (others or {}).items():
            others_warm[name].append([other.single_ms(photo) for _ in range(3)][-1])
        time.sleep(0.1)
    rows = stack.timings()[-uploads:]
    prediction = [(p - c) * 1000 for c, p, _ in rows]
    gradcam = [(g - c) * 1000 for c, _, g in rows if g is not None]
    return {
        "prediction_p50": float(np.percentile(prediction, 50)), "prediction_p95": float(np.percentile(prediction, 95)),
        "gradcam_p50": float(np.percentile(gradcam, 50)) if gradcam else float("nan"),
        "gradcam_p95": float(np.percentile(gradcam, 95)) if gradcam else float("nan"),
        "single_warm_ms": statistics.median(warm) if warm else float("nan"),
        "single_cold_ms": statistics.median(cold) if cold else float("nan"),
        "reference_seconds": window, "system_cpu_during_reference": system_cpu,
        "others_warm_ms": {name: statistics.median(times) for name, times in others_warm.items() if times},
    }  # fmt: skip


def throughput(stack: Stack, photos: list[bytes], images: int, clients: int, files_per_request: int = 1) -> dict:
    """With files_per_request > 1 the clients use the batch API (POST /api/v1/images/batch/), as an
    archive import would."""

    done_before = stack.predictions()
    counter = iter(range(images))
    lock = threading.Lock()
    memory: dict[str, dict] = {}

    def client() -> None:
        session = Client(stack.port)
        while True:
            with lock:
                indexes = [index for index in (next(counter, None) for _ in range(files_per_request))
                           if index is not None]  # fmt: skip
            if not indexes:
                return
            if files_per_request == 1:
                stack.upload(session, photos[indexes[0] % len(photos)])
            else:
                session.upload_batch("/api/v1/images/batch/", [photos[i % len(photos)] for i in indexes],
                                     token=stack.token)  # fmt: skip

    started = time.time()
    cpu_before = cpu_by_group(stack)
    with ThreadPoolExecutor(clients) as pool:
        jobs = [pool.submit(client) for _ in range(clients)]
        half_seen = False
        while not all(job.done() for job in jobs) or stack.predictions() - done_before < images:
            for job in jobs:
                if job.done() and job.exception() is not None:
                    raise SystemExit(f"a client failed: {job.exception()}")
            processed = stack.predictions() - done_before
            if not half_seen and processed >= images // 2:
                memory["half"], half_seen = stack.memory(), True
            if time.time() - started > 3600:
                raise SystemExit("the system did not finish within an hour")
            time.sleep(0.5)
        for job in jobs:
            job.result()
    memory["all"] = stack.memory()
    cpu_after = cpu_by_group(stack)
    cpu = cpu_used(cpu_before, cpu_after)
    rows = stack.timings()[done_before:]
    first, last = min(c for c, _, _ in rows), max(p for _, p, _ in rows)
    return {"images_per_s": len(rows) / (last - first), "images": len(rows), "seconds": last - first,
            "memory": memory, "cpu": cpu, "wall": time.time() - started}  # fmt: skip


def print_memory(memory: dict) -> None:
    print("\n| process | pid | RSS after half (MB) | RSS after all (MB) | peak (MB) |")
    print("|---|---|---|---|---|")
    for name in memory["all"]:
        half = {pid: rss for pid, rss, _ in memory.get("half", {}).get(name, [])}
        for pid, rss, peak in memory["all"][name]:
            print(f"| {name} | {pid} | {half.get(pid, float('nan')):.0f} | {rss:.0f} | {peak:.0f} |")
