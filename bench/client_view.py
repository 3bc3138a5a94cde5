"""Results a client sees (issue 19): closed-loop clients upload a photo and wait for its result, the way a
hospital's client would, and this measures results/s and the latency each client observes.

    .venv/bin/python bench/client_view.py              # 1 and 8 clients; wait, poll, sync; then the embedded default
    .venv/bin/python bench/client_view.py --seconds 5 --clients 1 --modes poll,sync --skip-embedded  # a smoke test

Modes, each run with every --clients count for --seconds (after --warmup seconds that are not counted):

- wait: POST /api/v1/images/?wait=N (or `Prefer: wait=N`, --wait-via prefer): 201 with the prediction, or
  202, after which GET /api/v1/images/{id}/status/?wait=N until the state is final (200; 202: not yet).
  A GET that answers 200 with a state that is not final did not wait (a server without the option, or
  over its limits on waiting requests): the client then polls every --poll-ms, and the table counts those
  answers ("not waited"). Any other status code fails the run (exit status 1).
- poll: POST /api/v1/images/ (202), then GET .../status/ every --poll-ms until done or failed.
- sync: bench/sync_reference.py, a minimal synchronous endpoint in one process (decode and forward inside
  the request), started as a subprocess on the same cores, before the system starts and again after it
  stops; the goals use the mean of the two runs (the machine's noise moves either by 10-20%).

Closed loop: each client thread uploads, waits for the result, and uploads the next photo; one keep-alive
connection per client, multipart bodies encoded once per photo. Latency: from just before the upload is
sent to the final answer's arrival. Results/s and latency count the results that arrived within the
measured window; a failed state, a connection error or a timeout counts as an error, not a result.

The system: gunicorn (webapp/gunicorn.conf.py's threads, GUNICORN_THREADS to change them) + one Celery
worker with every core for torch, over PostgreSQL (a fresh database `melanoma_clientview`) and Redis
database 11 (flushed), under var/bench/client-view/; then the embedded default (`make run`: SQLite,
filesystem broker, runserver), measured with the same API modes. The model: a freshly initialised ResNet
(bench/system.py's; its weights do not change its speed), the photos: bench.inprocess.make_photos's
1528x1360 photo-like JPEGs of about 0.4 MB. Goals: with 8 clients, wait's results/s at least 1.15x the
synchronous reference's; with 1 client, wait's p50 at most 1.2x the reference's p50.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.inprocess import make_photos
from bench.services import free_port
from bench.system import PY, ROOT, Client, Stack

DATABASE_URL = "postgres://postgres@127.0.0.1:5432/melanoma_clientview"
BROKER_URL = "redis://127.0.0.1:6379/11"
UPLOADS = "/api/v1/images/"
FINAL = ("done", "failed")
RESULT_TIMEOUT = 120.0  # seconds one result may take before it counts as an error


class Unexpected(RuntimeError):
    """An answer outside the API's contract: the run stops and fails."""


class ResultFailed(RuntimeError):
    """A result that came back failed, or did not come back in time: an error in the table."""


def multipart(photo: bytes) -> bytes:
    """The body of an upload with the photo as its `image` field (bench.system.Client's boundary)."""
    head = (f'--{Client.BOUNDARY}\r\nContent-Disposition: form-data; name="image"; filename="lesion.jpg"\r\n'
            "Content-Type: image/jpeg\r\n\r\n")  # fmt: skip
    return head.encode() + photo + f"\r\n--{Client.BOUNDARY}--\r\n".encode()


class Connection:
    """One client's keep-alive connection; counts its requests and the waits the server did not do."""

    def __init__(self, port: int, token: str | None) -> None:
        self.port, self.connection, self.requests, self.not_waited = port, None, 0, 0
        self.headers = {"Authorization": f"Token {token}"} if token else {}

    def exchange(self, method: str, path: str, body: bytes | None = None, headers=None) -> tuple[int, dict]:
        headers = {**self.headers, **(headers or {})}
        if body is not None:
            headers["Content-Type"] = f"multipart/form-data; boundary={Client.BOUNDARY}"
        for retry in (False, True):  # a kept-alive connection the server closed meanwhile: once more, afresh
            if self.connection is None:
                self.connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=RESULT_TIMEOUT)
            try:
                self.connection.request(method, path, body=body, headers=headers)
                response = self.connection.getresponse()
                payload = response.read()
                break
            except (ConnectionError, http.client.HTTPException):
                self.close()
                if retry:
                    raise
        self.requests += 1
        try:
            return response.status, json.loads(payload)
        except ValueError:
            return response.status, {"body": payload[:300].decode(errors="replace")}

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()
            self.connection = None


def _result(answer: dict, where: str) -> dict:
    """A final answer: its prediction when done (which must carry a probability), else ResultFailed."""
    if answer.get("state") == "failed":
        raise ResultFailed(f"failed: {answer.get('error')}")
    if (answer.get("prediction") or {}).get("probability_malignant") is None:
        raise Unexpected(f"{where}: state {answer.get('state')!r} without a prediction's probability: {answer}")
    return answer["prediction"]


def _expect(status: int, allowed: tuple[int, ...], where: str, answer: dict) -> None:
    if status not in allowed:
        raise Unexpected(f"{where} answered {status} (expected {' or '.join(map(str, allowed))}): {answer}")


def by_waiting(client: Connection, body: bytes, options: argparse.Namespace) -> dict:
    """Upload with the wait option, then ask for the status with it until the state is final."""
    query, headers = f"?wait={options.wait}", None
    if options.wait_via == "prefer":
        query, headers = "", {"Prefer": f"wait={options.wait}"}
    status, answer = client.exchange("POST", UPLOADS + query, body, headers)
    _expect(status, (201, 202), f"POST {UPLOADS}{query}", answer)
    if status == 201:
        return _result(answer, f"POST {UPLOADS}{query} (201)")
    if answer.get("state") in FINAL:
        raise Unexpected(f"POST {UPLOADS}{query} answered 202 with the final state {answer['state']!r}")
    path, deadline = f"{UPLOADS}{answer['id']}/status/{query}", time.monotonic() + RESULT_TIMEOUT
    while time.monotonic() < deadline:
        status, answer = client.exchange("GET", path, headers=headers)
        _expect(status, (200, 202), f"GET {path}", answer)
        if answer.get("state") in FINAL:
            _expect(status, (200,), f"GET {path} with a final state", answer)
            return _result(answer, f"GET {path}")
        if status == 200:  # answered at once, without waiting: poll instead
            client.not_waited += 1
            time.sleep(options.poll_ms / 1000)
    raise ResultFailed(f"no final state within {RESULT_TIMEOUT:.0f} s")


def by_polling(client: Connection, body: bytes, options: argparse.Namespace) -> dict:
    """Upload, then ask for the status every poll_ms until the state is final."""
    status, answer = client.exchange("POST", UPLOADS, body)
    _expect(status, (202,), f"POST {UPLOADS}", answer)
    path, deadline = f"{UPLOADS}{answer['id']}/status/", time.monotonic() + RESULT_TIMEOUT
    while answer.get("state") not in FINAL:
        if time.monotonic() > deadline:
            raise ResultFailed(f"no final state within {RESULT_TIMEOUT:.0f} s")
        time.sleep(options.poll_ms / 1000)
        status, answer = client.exchange("GET", path)
        _expect(status, (200,), f"GET {path}", answer)
    return _result(answer, f"GET {path}")


def synchronously(client: Connection, body: bytes, options: argparse.Namespace) -> dict:
    status, answer = client.exchange("POST", "/predict", body)
    _expect(status, (200,), "the synchronous reference", answer)
    return answer


WAYS = {"wait": by_waiting, "poll": by_polling, "sync": synchronously}


def closed_loop(way, port: int, token: str | None, bodies: list[bytes], clients: int,
                options: argparse.Namespace) -> dict:  # fmt: skip
    """`clients` threads, each getting results one after the other for warmup + seconds; the figures of
    the results that arrived within the last `seconds`."""
    started = time.monotonic()
    counted_from, stop_at = started + options.warmup, started + options.warmup + options.seconds
    outcomes: list[tuple[float, float, str | None]] = []  # (sent, answered, error); list.append is atomic
    connections = [Connection(port, token) for _ in range(clients)]

    def client(number: int) -> None:
        connection, turn = connections[number], number
        while time.monotonic() < stop_at:
            body, turn = bodies[turn % len(bodies)], turn + clients
            sent = time.monotonic()
            try:
                way(connection, body, options)
                outcomes.append((sent, time.monotonic(), None))
            except (ResultFailed, OSError, http.client.HTTPException) as error:
                outcomes.append((sent, time.monotonic(), f"{type(error).__name__}: {error}"))
                time.sleep(options.poll_ms / 1000)  # a server that is down: no busy loop
        connection.close()

    with ThreadPoolExecutor(clients) as pool:
        jobs = [pool.submit(client, number) for number in range(clients)]
    for job in jobs:
        if isinstance(job.exception(), Unexpected):
            raise SystemExit(f"FAILED: {job.exception()}")
        job.result()
    counted = [(sent, answered, error) for sent, answered, error in outcomes if counted_from <= answered <= stop_at]
    latencies = [(answered - sent) * 1000 for sent, answered, error in counted if error is None]
    errors = [error for _, _, error in counted if error is not None]
    requests = sum(connection.requests for connection in connections)
    return {
        "clients": clients, "results": len(latencies), "results_per_s": len(latencies) / options.seconds,
        "p50": float(np.percentile(latencies, 50)) if latencies else float("nan"),
        "p95": float(np.percentile(latencies, 95)) if latencies else float("nan"),
        "errors": len(errors), "first_error": errors[0] if errors else "",
        "requests_per_result": requests / max(1, len(outcomes)),
        "not_waited": sum(connection.not_waited for connection in connections),
    }  # fmt: skip


def measure(system: str, mode: str, port: int, token: str | None, bodies: list[bytes],
            options: argparse.Namespace) -> list[dict]:  # fmt: skip
    rows = []
    for clients in options.clients:
        row = {"system": system, "mode": mode, **closed_loop(WAYS[mode], port, token, bodies, clients, options)}
        print(_line(row), flush=True)
        rows.append(row)
    return rows


def measure_sync(label: str, bodies: list[bytes], options: argparse.Namespace) -> list[dict]:
    """Every --references decode of the synchronous reference, one after the other."""
    return [row for decode in options.references for row in measure_reference(decode, label, bodies, options)]


def measure_reference(decode: str, label: str, bodies: list[bytes], options: argparse.Namespace) -> list[dict]:
    """The synchronous reference in its own process, on a free port, for the time of its measurements."""
    port = free_port()
    log = ROOT / "var" / "bench" / "client-view-sync.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [PY, "bench/sync_reference.py", "--port", str(port), "--arch", options.arch,
               "--input-size", str(options.input_size), "--decode", decode,
               *(["--serial"] if options.sync_serial else [])]  # fmt: skip
    env = {**os.environ, "TORCH_NUM_THREADS": str(options.torch_threads)}
    with open(log, "wb") as errors:
        server = subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=errors,
                                  text=True, start_new_session=True)  # fmt: skip
    try:
        ready = server.stdout.readline()
        if not ready.startswith("ready"):
            raise SystemExit(f"the synchronous reference did not start; see {log}")
        return measure(f"synchronous reference, {decode} decode ({label})", "sync", port, None, bodies, options)
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)


def measure_stack(embedded: bool, bodies: list[bytes], options: argparse.Namespace) -> list[dict]:
    modes = [mode for mode in options.modes if mode != "sync"]
    threads = {"GUNICORN_THREADS": str(options.web_threads)} if options.web_threads else {}
    threads.update(dict(pair.split("=", 1) for pair in options.env))
    name = "embedded default (SQLite, filesystem broker, runserver)" if embedded else "system (gunicorn, PG, Redis)"
    stack = Stack(out=ROOT / "var" / "bench" / ("client-view-embedded" if embedded else "client-view"),
                  embedded=embedded, port=options.port + (1 if embedded else 0),
                  worker_concurrency=options.worker_concurrency,
                  torch_threads=options.worker_torch_threads or options.torch_threads,
                  web_workers=1 if embedded else options.web_workers,
                  arch=options.arch, input_size=options.input_size, queues=options.queues, extra_env=threads,
                  database_url=DATABASE_URL, broker_url=BROKER_URL)  # fmt: skip
    pictures = None
    if options.picture_worker_nice is not None:  # the pictures (default queue) in a process of their own
        name += f", pictures at nice {options.picture_worker_nice}"
        log = open(stack.out / "pictures-worker.log", "wb")  # noqa: SIM115 - closed with the process
        pictures = subprocess.Popen(
            ["nice", "-n", str(options.picture_worker_nice), PY, "-m", "celery", "-A", "webapp", "worker", "-Q",
             "default", "--concurrency", "1", "--loglevel", "WARNING", "--hostname", "pictures@%h"],
            cwd=ROOT, env={**stack.env, "CELERY_WORKER_CONCURRENCY": "1"}, stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )  # fmt: skip
        time.sleep(3)
    try:
        return [row for mode in modes for row in measure(name, mode, stack.port, stack.token, bodies, options)]
    finally:
        stack.stop()
        if pictures is not None:
            os.killpg(pictures.pid, signal.SIGTERM)
            pictures.wait(timeout=30)


HEADER = "| system | mode | clients | results | results/s | p50 ms | p95 ms | errors | requests/result | not waited |"


def _line(row: dict) -> str:
    return (f"| {row['system']} | {row['mode']} | {row['clients']} | {row['results']} | {row['results_per_s']:.2f} | "
            f"{row['p50']:.0f} | {row['p95']:.0f} | {row['errors']} | {row['requests_per_result']:.1f} | "
            f"{row['not_waited'] if row['mode'] == 'wait' else ''} |")  # fmt: skip


def report(rows: list[dict], options: argparse.Namespace) -> None:
    print(f"\n{HEADER}\n|{'---|' * HEADER.count(' | ')}---|")
    for row in rows:
        print(_line(row))
    for row in rows:
        if row["errors"]:
            print(f"{row['system']}, {row['mode']}, {row['clients']} clients: first error: {row['first_error']}")
        if row["not_waited"]:
            print(
                f"NOTE {row['system']}, wait, {row['clients']} clients: {row['not_waited']} status answers came "
                "at once, not waited (no wait option on the server, or over its limits): those clients polled"
            )

    def mean(system_prefix: str, mode: str, clients: int, key: str) -> float:
        found = [row[key] for row in rows if row["system"].startswith(system_prefix) and row["mode"] == mode
                 and row["clients"] == clients]  # fmt: skip
        return float(np.mean(found)) if found else float("nan")

    if "sync" not in options.modes:
        return
    for decode in options.references:
        reference = f"synchronous reference, {decode} decode"
        print(f"\nagainst the {reference} (the mean of its runs before and after the system's; nan: not run):")
        for system in ("system", "embedded"):
            for mode in ("wait", "poll"):
                rate = mean(system, mode, 8, "results_per_s") / mean(reference, "sync", 8, "results_per_s")
                p50 = mean(system, mode, 1, "p50") / mean(reference, "sync", 1, "p50")
                if not (np.isnan(rate) and np.isnan(p50)):
                    print(f"  {system}, {mode}: 8 clients, results/s / the reference's = {rate:.2f}x (goal >= 1.15x)"
                          f"; 1 client, p50 / the reference's p50 = {p50:.2f}x (goal <= 1.2x)")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=20, help="measured seconds per mode and client count")
    parser.add_argument("--warmup", type=float, default=3, help="seconds before each measurement, not counted")
    parser.add_argument("--clients", default="1,8", help="client counts, comma-separated")
    parser.add_argument("--modes", default="wait,poll,sync", help="of wait, poll, sync; comma-separated")
    parser.add_argument("--skip-embedded", action="store_true")
    parser.add_argument("--poll-ms", type=float, default=100)
    parser.add_argument("--wait", type=int, default=30, help="N of ?wait=N (at most RESULT_WAIT_MAX_SECONDS)")
    parser.add_argument("--wait-via", choices=("query", "prefer"), default="query")
    parser.add_argument("--photos", type=int, default=16)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--torch-threads", type=int, default=0, help="the worker's and the reference's; 0: every core")
    parser.add_argument("--web-workers", type=int, default=2)
    parser.add_argument("--web-threads", type=int, default=0, help="GUNICORN_THREADS; 0: the configured default")
    parser.add_argument("--queues", default="inference,default", help="the worker's queues")
    parser.add_argument(
        "--worker-torch-threads", type=int, default=0, help="the system's worker's torch threads; 0: as --torch-threads"
    )
    parser.add_argument("--worker-concurrency", type=int, default=1, help="the worker's prefork children")
    parser.add_argument("--picture-worker-nice", type=int, default=None,
                        help="draw the pictures (the default queue) in a second worker at this nice level; "
                             "use with --queues inference")  # fmt: skip
    parser.add_argument("--sync-serial", action="store_true", help="the reference serves one photo at a time")
    parser.add_argument(
        "--references",
        default="plain,tuned",
        help="the reference's decodes: plain (the original project's), tuned (this project's)",
    )
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a setting for the system's processes (repeatable), e.g. PIPELINE_BATCHES=4",
    )
    options = parser.parse_args()
    options.clients = [int(count) for count in options.clients.split(",")]
    options.modes = [mode.strip() for mode in options.modes.split(",")]
    options.references = [decode.strip() for decode in options.references.split(",")]
    if unknown := set(options.modes) - set(WAYS):
        parser.error(f"unknown modes: {', '.join(sorted(unknown))}")
    options.torch_threads = options.torch_threads or os.cpu_count() or 1
    photos = make_photos(options.photos)
    bodies = [multipart(photo) for photo in photos]
    print(f"{len(photos)} JPEGs of 1528x1360, {np.mean([len(p) for p in photos]) / 1e6:.2f} MB each on average; "
          f"{os.cpu_count()} cores; {options.arch} at {options.input_size} px; torch threads {options.torch_threads}; "
          f"{options.seconds:g} s per measurement after {options.warmup:g} s of warm-up\n\n{HEADER}")  # fmt: skip
    rows = measure_sync("before", bodies, options) if "sync" in options.modes else []
    if set(options.modes) - {"sync"}:
        rows += measure_stack(False, bodies, options)
    if "sync" in options.modes:
        rows += measure_sync("after", bodies, options)
    if not options.skip_embedded and set(options.modes) - {"sync"}:
        rows += measure_stack(True, bodies, options)
    report(rows, options)


if __name__ == "__main__":
    main()
