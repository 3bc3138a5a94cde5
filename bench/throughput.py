"""Throughput, latency and memory of the whole system, side by side with the model's own ceiling.

    .venv/bin/python bench/throughput.py                      # everything below, resnet18 at 224 px
    .venv/bin/python bench/throughput.py --images 1000 --clients 8 --latency-uploads 50 --skip-embedded

One run measures, on the same JPEGs (1528x1360, photo-like, about 0.7 MB each) and the same cores:

1. Ceiling: in this process, decode and preprocess (DECODE_THREADS threads, the worker's own
   decode_image in draft mode) then batched forward passes, not overlapped. Images/s.
2. In-process single image: decode plus forward at batch 1 (the latency floor), in this process.
3. Idle latency: LATENCY_UPLOADS sequential uploads through the API (gunicorn, PostgreSQL, Redis, one
   real worker), each waited for before the next: upload row created -> prediction stored, and ->
   Grad-CAM stored, from the database's own timestamps (the client's polling does not count). Between
   two uploads, while the system idles, the same photo goes through the in-process floor three times
   (after 0.1 s idle, then back to back: the third counts), and the CPU the system's processes used
   meanwhile is reported: the ratio compares the two through the same minutes of this shared
   machine's noise, which moves either figure by 10-20% from one minute to the next.
4. System throughput: CLIENTS concurrent API clients (keep-alive connections, bodies encoded once)
   upload IMAGES photos, one per request or FILES_PER_REQUEST through the batch API, ROUNDS times;
   the worker gathers queued images into batches. Images/s from the first upload row to the last
   prediction stored, and the CPU each part of the system used per image.
5. Memory: resident and peak memory (VmRSS, VmHWM) of every web and worker process after half of the
   images and after all of them.
6. The embedded default (`make run`'s SQLite, filesystem broker, runserver): idle latency again.

Uses a fresh database `melanoma_bench`, Redis database 7, and var/bench/. The model is a freshly
initialised ResNet (weights do not change its speed). Automatic explanations are off: in production IG
runs on its own worker, for which this 2-core machine has no room (bench/explain_bench.py measures it).
"""

from __future__ import annotations

import argparse
import io
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

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
PY = sys.executable
DATABASE = "melanoma_bench"


# --- the photos -----------------------------------------------------------------------------------


def make_photos(count: int, size=(1528, 1360)) -> list[bytes]:
    """Photo-like JPEGs: a lesion-coloured blob on skin with texture and noise, quality 90."""
    from PIL import Image

    photos = []
    width, height = size
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    for index in range(count):
        rng = np.random.default_rng(index)
        cx, cy = width * rng.uniform(0.35, 0.65), height * rng.uniform(0.35, 0.65)
        radius = min(width, height) * rng.uniform(0.12, 0.25)
        blob = np.exp(-(((x - cx) ** 2 + (y - cy) ** 2) / (2 * radius**2)))
        skin = np.array([205, 160, 135], np.float32) + rng.normal(0, 6, 3)
        lesion = np.array([90, 55, 40], np.float32) + rng.normal(0, 10, 3)
        rgb = skin * (1 - blob[..., None]) + lesion * blob[..., None]
        rgb += (np.sin(x / rng.uniform(6, 20)) * np.cos(y / rng.uniform(6, 20)))[..., None] * 6
        rgb += rng.normal(0, 5, rgb.shape)
        buffer = io.BytesIO()
        Image.fromarray(rgb.clip(0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
        photos.append(buffer.getvalue())
    return photos


# --- in-process ceiling ---------------------------------------------------------------------------


class InProcess:
    """The model in this very process, as a worker decodes and runs it: the ceiling and the latency floor."""

    def __init__(self, *, arch: str, input_size: int, threads: int) -> None:
        import torch

        from mlcore.inference import Predictor, configure_torch_threads, decode_side
        from mlcore.model import CheckpointMeta, build_model

        configure_torch_threads()
        torch.manual_seed(0)
        self.predictor = Predictor(build_model(arch).eval(), CheckpointMeta(arch=arch, input_size=input_size),
                                   device="cpu")  # fmt: skip
        self.max_side = decode_side(input_size)
        self.pool = ThreadPoolExecutor(threads)

    def prepare(self, data: bytes):
        from mlcore.preprocessing import decode_image, to_tensor

        return to_tensor(decode_image(data, max_side=self.max_side, copy_pixels=False).image, self.predictor.spec)

    def single_ms(self, data: bytes) -> float:
        """Decode plus forward of one photo at batch 1, in milliseconds."""
        started = time.perf_counter()
        self.predictor.predict_tensors(self.prepare(data).unsqueeze(0))
        return (time.perf_counter() - started) * 1000

    def ceiling(self, photos: list[bytes], *, images: int, batch: int) -> dict:
        import torch

        work = [photos[i % len(photos)] for i in range(images)]
        self.predictor.predict_tensors(torch.stack(list(self.pool.map(self.prepare, work[:batch]))))  # warm up
        started = time.perf_counter()
        decode_seconds = forward_seconds = 0.0
        for start in range(0, len(work), batch):
            t0 = time.perf_counter()
            tensors = torch.stack(list(self.pool.map(self.prepare, work[start : start + batch])))
            t1 = time.perf_counter()
            self.predictor.predict_tensors(tensors)
            forward_seconds += time.perf_counter() - t1
            decode_seconds += t1 - t0
        total = time.perf_counter() - started
        single = [self.single_ms(data) for data in work[:30]]
        return {
            "images_per_s": len(work) / total, "decode_ms": decode_seconds / len(work) * 1000,
            "forward_ms": forward_seconds / len(work) * 1000, "single_ms": statistics.median(single),
        }  # fmt: skip


# --- the system -----------------------------------------------------------------------------------


class Stack:
    """gunicorn + one Celery worker (or runserver + worker for the embedded default), with a token."""

    def __init__(self, *, out: Path, embedded: bool, port: int, worker_concurrency: int, torch_threads: int,
                 web_workers: int, arch: str, input_size: int, queues: str, extra_env=None) -> None:  # fmt: skip
        self.out, self.embedded, self.port = out, embedded, port
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
            self.env.update({
                "DJANGO_SETTINGS_MODULE": "webapp.settings.prod",
                "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DATABASE}",
                "CELERY_BROKER_URL": "redis://127.0.0.1:6379/7", "CACHE_URL": "redis://127.0.0.1:6379/7",
            })  # fmt: skip
            subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
            subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], check=True)
            subprocess.run(["redis-cli", "-n", "7", "flushdb"], check=True, capture_output=True)
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
        deadline = time.monotonic() + 90
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
            self._connection = psycopg.connect(f"postgresql://postgres@127.0.0.1:5432/{DATABASE}", autocommit=True)
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
            pids = [process.pid, *_children(process.pid)]
            result[name] = [(pid, *_vm(pid)) for pid in pids]
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


def _cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


def cpu_by_group(stack: Stack) -> dict[str, dict[int, float]]:
    """CPU seconds used so far by each process of each part of the system (live processes only)."""
    groups = {name: [process.pid, *_children(process.pid)] for name, process in stack.processes.items()}
    for name, pattern in (("postgresql", "postgres"), ("redis", "redis-server")):
        found = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
        groups[name] = [int(pid) for pid in found]
    groups["clients (this script)"] = [os.getpid()]
    return {name: {pid: _cpu_seconds(pid) for pid in pids} for name, pids in groups.items()}


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


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").glob("*"):
        try:
            found += [int(child) for child in (task / "children").read_text().split()]
        except OSError:
            pass
    return found + [grandchild for child in found for grandchild in _children(child)]


def _vm(pid: int) -> tuple[float, float]:
    values = {}
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(("VmRSS:", "VmHWM:")):
                key, amount = line.split(":")
                values[key] = int(amount.split()[0]) / 1024
    except OSError:
        return (0.0, 0.0)
    return values.get("VmRSS", 0.0), values.get("VmHWM", 0.0)


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


def idle_latency(stack: Stack, photos: list[bytes], uploads: int, reference: InProcess | None = None) -> dict:
    """Sequential uploads, each waited for (and its Grad-CAM pictures, where the worker draws them).
    With a reference, after each upload and 0.1 s of idle, the same photo decoded and run in this
    process twice: the first as cold as the upload found the machine, the second back to back. So
    the system and its floor are measured through the same minutes of this shared machine's noise."""
    session = Client(stack.port)
    cold, warm = [], []
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


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--latency-uploads", type=int, default=50)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--worker-concurrency", type=int, default=1)
    parser.add_argument("--torch-threads", type=int, default=0, help="0: every core / worker concurrency")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--queues", default="inference,default",
                        help="the worker's queues: with default it also draws the Grad-CAM pictures")  # fmt: skip
    parser.add_argument("--port", type=int, default=8091)
    parser.add_argument("--coalesce", type=int, default=None,
                        help="INFERENCE_COALESCE_MESSAGES for the system (0: a message per upload)")  # fmt: skip
    parser.add_argument("--rounds", type=int, default=1, help="throughput runs, one after the other, each reported")
    parser.add_argument("--files-per-request", type=int, default=1,
                        help="above 1: clients use the batch API, this many photos per request")  # fmt: skip
    args = parser.parse_args()
    cores = os.cpu_count() or 1
    torch_threads = args.torch_threads or max(1, cores // args.worker_concurrency)
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "webapp.settings.test")

    photos = make_photos(32)
    print(f"{len(photos)} JPEGs of 1528x1360, {np.mean([len(p) for p in photos]) / 1e6:.2f} MB each on average; "
          f"{cores} cores; {args.arch} at {args.input_size} px")  # fmt: skip
    decode_threads = int(os.environ.get("DECODE_THREADS", "2"))
    reference = InProcess(arch=args.arch, input_size=args.input_size, threads=decode_threads)
    ceiling_before = reference.ceiling(photos, images=256, batch=args.batch)
    print(f"ceiling: {ceiling_before['images_per_s']:.1f} images/s (decode+preprocess "
          f"{ceiling_before['decode_ms']:.1f} ms/image on {decode_threads} threads, forward "
          f"{ceiling_before['forward_ms']:.1f} ms/image at batch {args.batch}); in-process single image "
          f"{ceiling_before['single_ms']:.1f} ms")  # fmt: skip

    coalesce = {} if args.coalesce is None else {"INFERENCE_COALESCE_MESSAGES": str(args.coalesce)}
    stack = Stack(out=ROOT / "var" / "bench" / "system", embedded=False, port=args.port,
                  worker_concurrency=args.worker_concurrency, torch_threads=torch_threads,
                  web_workers=args.web_workers, arch=args.arch, input_size=args.input_size, queues=args.queues,
                  extra_env=coalesce)  # fmt: skip
    try:
        latency = idle_latency(stack, photos, args.latency_uploads, reference)
        rounds = [throughput(stack, photos, args.images, args.clients, args.files_per_request)
                  for _ in range(args.rounds)]  # fmt: skip
        system = rounds[-1]
    finally:
        stack.stop()
    ceiling_after = reference.ceiling(photos, images=256, batch=args.batch)
    ceiling_rate = (ceiling_before["images_per_s"] + ceiling_after["images_per_s"]) / 2
    single_ms = (ceiling_before["single_ms"] + ceiling_after["single_ms"]) / 2

    print(f"\nceiling again after the system run: {ceiling_after['images_per_s']:.1f} images/s; mean of both "
          f"{ceiling_rate:.1f}; single image back to back {single_ms:.1f} ms")  # fmt: skip
    warm, cold = latency["single_warm_ms"], latency["single_cold_ms"]
    print(f"idle latency over {args.latency_uploads} sequential uploads (Redis broker, PostgreSQL): prediction stored "
          f"p50 {latency['prediction_p50']:.0f} ms, p95 {latency['prediction_p95']:.0f} ms; Grad-CAM stored p50 "
          f"{latency['gradcam_p50']:.0f} ms, p95 {latency['gradcam_p95']:.0f} ms")  # fmt: skip
    print(f"  in-process single image between the uploads: {warm:.1f} ms back to back (the third in a row), "
          f"{cold:.1f} ms after 0.1 s idle like each upload; the system's processes used "
          f"{latency['system_cpu_during_reference'] * 1000:.0f} CPU-ms during those "
          f"{latency['reference_seconds']:.1f} s")  # fmt: skip
    print(f"  p50 / in-process single image (back to back, between the uploads) = "
          f"{latency['prediction_p50'] / warm:.2f}x (goal <= 1.5x); / the idle one = "
          f"{latency['prediction_p50'] / cold:.2f}x; / the back-to-back one of the ceiling runs = "
          f"{latency['prediction_p50'] / single_ms:.2f}x")  # fmt: skip
    how = "single uploads" if args.files_per_request == 1 else f"the batch API, {args.files_per_request} per request"
    for number, result in enumerate(rounds, 1):
        print(f"system throughput{f' (round {number})' if len(rounds) > 1 else ''}: {result['images']} images from "
              f"{args.clients} clients ({how}) in {result['seconds']:.1f} s = {result['images_per_s']:.1f} images/s; "
              f"/ ceiling = {result['images_per_s'] / ceiling_rate:.2f}x (goal >= 0.8x); worker queues {args.queues}, "
              f"concurrency {args.worker_concurrency}, torch threads {torch_threads}, gunicorn workers "
              f"{args.web_workers}")  # fmt: skip
    if len(rounds) > 1:
        ratios = sorted(result["images_per_s"] / ceiling_rate for result in rounds)
        print(f"  median of {len(rounds)} rounds: {statistics.median(ratios):.2f}x; the memory and CPU below are "
              "the last round's")  # fmt: skip
    print_memory(system["memory"])
    total = sum(system["cpu"].values())
    print(f"\nCPU seconds during the throughput run ({system['wall']:.0f} s of wall time, {cores} cores = "
          f"{system['wall'] * cores:.0f} CPU-s available):")  # fmt: skip
    for name, seconds in sorted(system["cpu"].items(), key=lambda item: -item[1]):
        print(f"  {name}: {seconds:.1f} CPU-s ({seconds / max(total, 1e-9):.0%}), "
              f"{seconds / system['images'] * 1000:.1f} ms per image")  # fmt: skip

    if not args.skip_embedded:
        embedded = Stack(out=ROOT / "var" / "bench" / "embedded", embedded=True, port=args.port + 1,
                         worker_concurrency=1, torch_threads=cores, web_workers=1, arch=args.arch,
                         input_size=args.input_size, queues="inference,default")  # fmt: skip
        try:
            latency = idle_latency(embedded, photos, min(args.latency_uploads, 30))
        finally:
            embedded.stop()
        print(f"\nembedded default (SQLite, filesystem broker, runserver): prediction stored p50 "
              f"{latency['prediction_p50']:.0f} ms, p95 {latency['prediction_p95']:.0f} ms; Grad-CAM stored p50 "
              f"{latency['gradcam_p50']:.0f} ms")  # fmt: skip


if __name__ == "__main__":
    main()
