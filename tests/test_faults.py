"""Fault injection with real processes: the promise under test is that an accepted upload is never lost
and never processed twice.

Every test starts its own processes (a private redis-server, a web server, its own Celery workers) so
that killing or stopping them never disturbs the shared session worker; PostgreSQL is the test
database, reached directly or through a TCP proxy that this process can cut.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import httpx
import pytest
from django.conf import settings as django_settings

from diagnosis.models import Explanation, ImageState, LesionImage, Prediction
from tests.conftest import ROOT, WorkerProcess, lesion_jpeg, reachable, stored_image_files, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

# The sweeper as the worker's embedded beat runs it, on a short clock. A claim is presumed dead only
# after the task time limit (the system check diagnosis.E001 insists), so the limits shrink with it.
SWEEPER_ENV = {
    "REQUEUE_INTERVAL_SECONDS": "1",
    "CLAIM_TIMEOUT_SECONDS": "8",
    "CELERY_TASK_TIME_LIMIT": "7",
    "CELERY_TASK_SOFT_TIME_LIMIT": "6",
    "REQUEUE_AFTER_SECONDS": "2",
    "DRIFT_REPORT_INTERVAL_SECONDS": "3600",
    "AUTO_EXPLAIN_METHODS": "none",  # predictions only: nothing consumes the explain queue here
}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def tail(path: Path, size: int = 4000) -> str:
    return path.read_text(errors="replace")[-size:] if path.exists() else ""


class Processes:
    """Starts the processes of one test, each in its own process group, and stops all of them on exit."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.started: list[subprocess.Popen] = []

    def __enter__(self) -> Processes:
        return self

    def __exit__(self, *exc_info) -> None:
        for process in reversed(self.started):
            stop_group(process)

    def popen(self, args: list[str], *, env: dict[str, str] | None, log_name: str) -> tuple[subprocess.Popen, Path]:
        log_path = self.folder / log_name
        with open(log_path, "ab") as log:
            process = subprocess.Popen(
                args, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.started.append(process)
        return process, log_path

    def redis(self, port: int | None = None) -> PrivateRedis:
        redis = PrivateRedis(self, port or free_port())
        redis.start()
        return redis

    def web(self, env: dict[str, str]) -> WebServer:
        port = free_port()
        process, log_path = self.popen(
            [sys.executable, "manage.py", "runserver", f"127.0.0.1:{port}", "--noreload"],
            env={**env, "DJANGO_SETTINGS_MODULE": "webapp.settings.test"},
            log_name=f"web-{port}.log",
        )
        return WebServer(process, log_path, port)

    def worker(self, env: dict[str, str], *, queues: str = "inference,default", beat: bool = False) -> WorkerProcess:
        name = f"fault-{uuid.uuid4().hex[:6]}@%h"
        args = [sys.executable, "-m", "celery", "-A", "webapp", "worker", "-Q", queues, "--concurrency", "1",
                "--pool", "prefork", "--without-gossip", "--without-mingle", "--loglevel", "INFO",
                "--hostname", name]  # fmt: skip
        if beat:
            args += ["--beat", "--schedule", str(self.folder / f"beat-{name.split('@')[0]}")]
        process, log_path = self.popen(args, env=env, log_name=f"{name.split('@')[0]}.log")
        return WorkerProcess(process, log_path, name)


def stop_group(process: subprocess.Popen) -> None:
    """terminate, then kill: the process and whatever it started (prefork children, embedded beat)."""
    if process.returncode is not None:  # reaped earlier, when its group was stopped
        return
    if process.poll() is None:
        try:
            os.killpg(process.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            pass
    try:
        os.killpg(process.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    process.wait()


def wait_ready(worker: WorkerProcess, timeout: float = 90) -> WorkerProcess:
    wait_for(lambda: " ready." in worker.log() or worker.process.poll() is not None, timeout, message="the worker")
    assert worker.process.poll() is None, f"the worker exited at start:\n{worker.log()[-3000:]}"
    return worker


def wait_showing_log(predicate, timeout: float, what: str, worker: WorkerProcess, interval: float = 0.2):
    """wait_for, with the worker's log as it is at the timeout in the failure message."""
    try:
        return wait_for(predicate, timeout, interval=interval, message=what)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n--- worker log ---\n{worker.log()[-3000:]}") from None


class PrivateRedis:
    def __init__(self, processes: Processes, port: int):
        self.processes, self.port, self.process = processes, port, None
        self.url = f"redis://127.0.0.1:{port}/0"

    def start(self) -> None:
        self.process, _ = self.processes.popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
             "--daemonize", "no"],
            env=None, log_name=f"redis-{self.port}.log",
        )  # fmt: skip
        wait_for(lambda: reachable("127.0.0.1", self.port, 0.2), 10, message=f"redis-server on port {self.port}")

    def stop(self) -> None:
        stop_group(self.process)
        wait_for(lambda: not reachable("127.0.0.1", self.port, 0.2), 10, message="redis-server to stop")

    def client(self):
        import redis

        return redis.Redis(port=self.port)


class WebServer:
    def __init__(self, process: subprocess.Popen, log_path: Path, port: int):
        self.process, self.log_path, self.port = process, log_path, port
        self.url = f"http://127.0.0.1:{port}"

    def wait_ready(self, timeout: float = 60) -> WebServer:
        wait_for(
            lambda: reachable("127.0.0.1", self.port, 0.2) or self.process.poll() is not None,
            timeout,
            message="the web server",
        )
        assert self.process.poll() is None, f"the web server exited at start:\n{tail(self.log_path)}"
        return self

    def client(self, token: str) -> httpx.Client:
        return httpx.Client(base_url=self.url, headers={"Authorization": f"Token {token}"}, timeout=30)


def upload(client: httpx.Client, seed: int, size: int = 96) -> httpx.Response:
    image = ("lesion.jpg", lesion_jpeg(seed=seed, size=size), "image/jpeg")
    return client.post("/api/v1/images/", files={"image": image})


def accepted(web: WebServer, client: httpx.Client, seed: int) -> dict:
    """Upload; the answer must be 202 (queued). Returns the body."""
    response = upload(client, seed)
    assert response.status_code == 202, (response.status_code, response.text[:500], tail(web.log_path))
    return response.json()


def assert_each_upload_done_once(ids: list[str], model_version, *, retried: frozenset = frozenset()) -> None:
    """Every upload finished (done, or failed with a reason), none waits, and each was processed once:
    one Prediction per image for the model version, one successful claim per image (two for those whose
    worker was killed mid-way)."""
    images = {str(image.pk): image for image in LesionImage.objects.filter(pk__in=ids)}
    assert set(images) == set(ids), "an accepted upload has no row"
    by_state = Counter(image.state for image in images.values())
    assert set(by_state) <= {ImageState.DONE, ImageState.FAILED}, f"uploads left unfinished: {by_state}"
    predictions = Counter(
        str(image_id)
        for image_id in Prediction.objects.filter(image_id__in=ids, model_version=model_version).values_list(
            "image_id", flat=True
        )
    )
    for image_id, image in images.items():
        if image.state == ImageState.FAILED:
            assert image.error, f"{image_id} failed without a reason"
            assert predictions[image_id] == 0, f"{image_id} failed but has a prediction"
        else:
            assert predictions[image_id] == 1, f"{image_id} has {predictions[image_id]} predictions"
        expected_attempts = 2 if image_id in retried else 1
        assert image.attempts == expected_attempts, (
            f"{image_id} was claimed {image.attempts} times, expected {expected_attempts} ({image.claimed_by})"
        )


# --- 1. a worker killed mid-job ------------------------------------------------------------------------


def test_worker_killed_mid_job_loses_nothing_and_processes_nothing_twice(worker_env, faults_setup, tmp_path):
    """kill -9 of a worker (and its prefork child) holding a batch of claims; a new worker whose embedded
    beat runs the sweeper returns the dead claims to the queue; every upload ends done exactly once."""
    token, model_version = faults_setup
    with Processes(tmp_path) as processes:
        redis = processes.redis()
        env = {**worker_env, **SWEEPER_ENV, "CELERY_BROKER_URL": redis.url}
        web = processes.web(env).wait_ready()
        with web.client(token) as client:  # all 40 wait in the broker before the first worker starts
            ids = [accepted(web, client, seed)["id"] for seed in range(40)]
        first = wait_ready(processes.worker(env))

        # A task claims its image plus queued ones as one batch: kill while one holds several claims.
        batch = min(4, getattr(django_settings, "INFERENCE_BATCH_SIZE", 1))

        def first_worker_mid_batch():
            if LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE).count() < 3:
                return False  # its model is loaded and it has finished work before
            claims = LesionImage.objects.filter(
                pk__in=ids, state=ImageState.PROCESSING, claimed_by__startswith=f"{first.node}@"
            )
            return claims.count() >= batch

        wait_showing_log(first_worker_mid_batch, 90, "the first worker to be mid-batch", first, interval=0.002)
        os.killpg(first.process.pid, signal.SIGKILL)  # the worker and its prefork child, no warm shutdown
        first.process.wait(timeout=10)

        processing = LesionImage.objects.filter(pk__in=ids, state=ImageState.PROCESSING)
        in_flight = {str(pk) for pk in processing.values_list("pk", flat=True)}
        assert in_flight, "no image was being processed when the worker was killed"
        assert all(
            claim.startswith(f"{first.node}@")
            for claim in LesionImage.objects.filter(pk__in=in_flight).values_list("claimed_by", flat=True)
        )
        left = LesionImage.objects.filter(pk__in=ids).exclude(state=ImageState.DONE).count()
        assert left >= 5, "the first worker had almost finished: the kill tested little"

        second = wait_ready(processes.worker(env, beat=True))
        wait_showing_log(
            lambda: (
                LesionImage.objects.filter(pk__in=ids, state__in=[ImageState.DONE, ImageState.FAILED]).count()
                == len(ids)
            ),
            90,
            "every upload to finish after the kill",
            second,
        )
        time.sleep(2.5)  # let the spare messages of the sweeper arrive: each must be a no-op
        assert_each_upload_done_once(ids, model_version, retried=frozenset(in_flight))
        for image in LesionImage.objects.filter(pk__in=in_flight):
            assert image.state == ImageState.DONE, (image.state, image.error)
            assert image.claimed_by.startswith(f"{second.node}@")
        # (Whether the sweeper or a redelivered message took each dead claim over depends on timing;
        # either way each in-flight image was retried once and done once, as checked above.)
        assert second.process.poll() is None


# --- 2. the broker down while uploads arrive ---------------------------------------------------------------


def test_uploads_accepted_while_redis_is_down_complete_once_it_is_back(worker_env, faults_setup, tmp_path):
    """With the broker down the API still accepts uploads (202, queued, file stored) within the bounded
    publish retry; once Redis is back (empty), the sweeper enqueues them and each is predicted once."""
    token, model_version = faults_setup
    with Processes(tmp_path) as processes:
        redis = processes.redis()
        env = {**worker_env, **SWEEPER_ENV, "CELERY_BROKER_URL": redis.url}
        web = processes.web(env)
        worker = processes.worker(env, beat=True)
        web.wait_ready()
        wait_ready(worker)

        with web.client(token) as client:
            warm = accepted(web, client, seed=100)  # all up: the web process holds a broker connection now
            wait_showing_log(
                lambda: LesionImage.objects.filter(pk=warm["id"], state=ImageState.DONE).exists(),
                60,
                "the first upload",
                worker,
            )

            redis.stop()
            ids = []
            for seed in range(101, 105):
                started = time.monotonic()
                response = upload(client, seed)
                elapsed = time.monotonic() - started
                assert response.status_code == 202, (response.status_code, response.text, tail(web.log_path))
                assert elapsed < 5, f"the upload took {elapsed:.1f} s with the broker down"
                body = response.json()
                assert body["state"] == "queued"
                ids.append(body["id"])
                image = LesionImage.objects.get(pk=body["id"])
                assert image.state == ImageState.QUEUED
                assert (Path(django_settings.MEDIA_ROOT) / image.file.name).is_file()
            status = client.get(f"/api/v1/images/{ids[0]}/")
            assert status.status_code == 200 and status.json()["state"] == "queued"
            time.sleep(2)  # the sweeper fails to publish meanwhile; it must try again later
            assert LesionImage.objects.filter(pk__in=ids, state=ImageState.QUEUED).count() == len(ids)

            redis.start()  # same port, empty: every message published before the outage is gone too
            wait_showing_log(
                lambda: (
                    LesionImage.objects.filter(pk__in=ids, state__in=[ImageState.DONE, ImageState.FAILED]).count()
                    == len(ids)
                ),
                90,
                "the uploads accepted during the outage to finish",
                worker,
            )
            time.sleep(2.5)
            assert re.search(r"sweeper: \d+ dead claims returned to the queue, [1-9]\d* images", worker.log())
            assert_each_upload_done_once([*ids, warm["id"]], model_version)
            assert set(LesionImage.objects.filter(pk__in=ids).values_list("state", flat=True)) == {ImageState.DONE}
            for image_id in ids:
                assert client.get(f"/api/v1/images/{image_id}/").json()["state"] == "done"
        assert worker.process.poll() is None and web.process.poll() is None


# --- 3. the database down under the web server ---------------------------------------------------------


class PostgresProxy:
    """127.0.0.1:<port> <-> PostgreSQL, in threads of this process. `down()` cuts every connection and
    hangs up on new ones at once; `cut_on(pattern)` cuts a connection whose client sends that text
    (a query) before the server receives it."""

    def __init__(self, target: tuple[str, int]):
        self.target = target
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(64)
        self.listener.settimeout(0.2)
        self.port = self.listener.getsockname()[1]
        self.is_down = False
        self.pattern: bytes | None = None
        self.cuts = 0
        self.lock = threading.Lock()
        self.sockets: set[socket.socket] = set()
        self.closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while not self.closed:
            try:
                client, _ = self.listener.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            if self.is_down:
                client.close()
                continue
            try:
                server = socket.create_connection(self.target, timeout=5)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self.lock:
                self.sockets |= {client, server}
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, from_client: bool) -> None:
        recent = b""
        try:
            while True:
                data = source.recv(65536)
                if not data:
                    break
                pattern = self.pattern
                if from_client and pattern is not None and pattern in recent + data:
                    with self.lock:
                        self.cuts += 1
                    break
                recent = (recent + data)[-len(pattern) :] if pattern else b""
                sink.sendall(data)
        except OSError:
            pass
        finally:
            self._hang_up(source, sink)

    def _hang_up(self, *sockets: socket.socket) -> None:
        for sock in sockets:
            with self.lock:
                self.sockets.discard(sock)
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()

    def down(self) -> None:
        self.is_down = True
        with self.lock:
            sockets = list(self.sockets)
        self._hang_up(*sockets)

    def cut_on(self, pattern: bytes | None) -> None:
        self.pattern = pattern

    def up(self) -> None:
        self.is_down, self.pattern = False, None

    def close(self) -> None:
        self.closed = True
        self.down()
        self.listener.close()


def assert_json_503(response: httpx.Response) -> None:
    assert response.status_code == 503, (response.status_code, response.text[:500])
    assert response.headers["content-type"].startswith("application/json"), response.text[:500]
    body = response.json()
    assert body["code"] == "service_unavailable" and body["detail"], body


def test_database_down_gives_json_503_leaves_no_orphan_file_and_recovers(worker_env, faults_setup, tmp_path):
    """PostgreSQL unreachable, then cut at the INSERT of the image row: JSON 503s, no file left behind;
    once it is back, the same web process accepts uploads again."""
    token, _ = faults_setup
    database = django_settings.DATABASES["default"]
    proxy = PostgresProxy((database["HOST"] or "127.0.0.1", int(database["PORT"] or 5432)))
    try:
        with Processes(tmp_path) as processes:
            redis = processes.redis()  # a private broker, so that the accepted uploads reach no other worker
            database_url = (
                f"postgres://{database['USER']}:{database.get('PASSWORD') or ''}@127.0.0.1:{proxy.port}/"
                f"{database['NAME']}?sslmode=disable"
            )
            web = processes.web({**worker_env, "DATABASE_URL": database_url, "CELERY_BROKER_URL": redis.url})
            web.wait_ready()
            with web.client(token) as client:
                status_url = f"/api/v1/images/{accepted(web, client, seed=200)['id']}/"
                files_before = stored_image_files()
                assert len(files_before) == 1

                proxy.down()
                assert_json_503(upload(client, seed=201))
                assert_json_503(client.get(status_url))
                assert stored_image_files() == files_before

                # The database fails after the file is stored: the very INSERT of the image row is cut.
                proxy.up()
                proxy.cut_on(b'INSERT INTO "diagnosis_lesionimage"')
                assert_json_503(upload(client, seed=202))
                assert proxy.cuts == 1, "the upload never reached the INSERT of its row"
                assert stored_image_files() == files_before, "a file whose row never committed was left behind"
                assert LesionImage.objects.count() == 1

                proxy.up()  # the same web process, not restarted
                after = accepted(web, client, seed=203)
                assert client.get(status_url).status_code == 200
                assert client.get(f"/api/v1/images/{after['id']}/").json()["state"] == "queued"
                assert len(stored_image_files()) == 2
                assert redis.client().llen("inference") == 2  # both accepted uploads were enqueued
            assert web.process.poll() is None
    finally:
        proxy.close()


# --- 4. poison input inside a worker -------------------------------------------------------------------


def test_poison_image_and_poison_explanation_fail_once_and_the_worker_serves_on(worker_env, faults_setup, tmp_path):
    """The damaged-file prediction is also covered by test_e2e_worker; here it must fail exactly once,
    and the same worker must go on to serve the next image; an explanation whose computation raises
    must end failed with a reason, once, with the next explanation served."""
    from diagnosis.services.explanations import canonical_key
    from diagnosis.tasks import explain_image_task
    from webapp.celery import app

    token, model_version = faults_setup
    with Processes(tmp_path) as processes:
        redis = processes.redis()
        env = {**worker_env, "CELERY_BROKER_URL": redis.url, "AUTO_EXPLAIN_METHODS": "none"}
        web = processes.web(env).wait_ready()
        with web.client(token) as client:
            # Both messages wait in the broker until the worker starts: the poison is damaged before it is read.
            # The message waits in the broker until the worker starts: the file is damaged before it is read.
            poison = accepted(web, client, seed=300)["id"]
            stored = Path(django_settings.MEDIA_ROOT) / LesionImage.objects.get(pk=poison).file.name
            stored.write_bytes(stored.read_bytes()[:400])
            worker = wait_ready(processes.worker(env, queues="inference,explain,default"))
            finished = LesionImage.objects.filter(state__in=[ImageState.DONE, ImageState.FAILED])
            wait_showing_log(lambda: finished.filter(pk=poison).exists(), 60, "the poison image", worker)

            good = accepted(web, client, seed=301)["id"]  # the next job, after the poison
            wait_showing_log(lambda: finished.filter(pk=good).exists(), 60, "the next image", worker)
            poisoned, served = LesionImage.objects.get(pk=poison), LesionImage.objects.get(pk=good)
            assert poisoned.state == ImageState.FAILED and "could not be decoded" in poisoned.error
            assert served.state == ImageState.DONE
            assert poisoned.attempts == 1 and served.attempts == 1
            assert not Prediction.objects.filter(image_id=poison).exists()

            # An explanation whose computation raises: a target class the model does not have.
            params = {"baseline": "black", "n_steps": 8}
            bad = Explanation.objects.create(
                image=served, model_version=model_version, method="integrated_gradients", params=params,
                params_key=canonical_key("integrated_gradients", params, 7), target_index=7, target_class="unknown",
            )  # fmt: skip
            with app.connection_for_write(redis.url) as connection:
                explain_image_task.apply_async(args=[str(bad.pk)], connection=connection)
            request = {"method": "integrated_gradients", "params": {"n_steps": 8}}
            response = client.post(f"/api/v1/images/{good}/explanations/", json=request)
            assert response.status_code == 202, response.text
            next_one = response.json()["id"]
            explained = Explanation.objects.filter(pk__in=[bad.pk, next_one], state__in=["done", "failed"])
            wait_showing_log(lambda: explained.count() == 2, 60, "both explanations", worker)
            time.sleep(1)  # a retry, if one were scheduled, would be received by now
            bad.refresh_from_db()
            assert bad.state == Explanation.State.FAILED, bad.state
            assert "could not be computed" in bad.error and "internal error" in bad.error, bad.error
            assert bad.attempts == 1
            assert Explanation.objects.get(pk=next_one).state == Explanation.State.DONE
            assert client.get(f"/api/v1/explanations/{bad.pk}/").json()["error"] == bad.error
        log = worker.log()
        assert log.count("Task diagnosis.tasks.predict_image_task[") == 4  # received + succeeded, two images
        assert log.count("Task diagnosis.tasks.explain_image_task[") == 4  # no retry of the failing one
        assert "] retry:" not in log
        assert worker.process.poll() is None
