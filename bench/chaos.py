"""A fault run under load: uploads keep coming while the worker is killed, Redis stops and PostgreSQL is
cut, and at the end every accepted upload must be done exactly once, nothing stuck, no orphan file.

    make chaos                                   # 20 locust users for 5 minutes, the full schedule
    .venv/bin/python bench/chaos.py --users 20 --minutes 5 [--arch resnet18 --input-size 224] [--no-locust]

The stack runs on loopback with the production settings: gunicorn, a Celery worker with the sweeper
(its embedded beat, on a short clock), a private redis-server that can be stopped, and this machine's
PostgreSQL behind a TCP proxy that can cut every connection (tests/test_faults.py's). It uses a fresh
database `melanoma_chaos` and writes under var/chaos/.

Two kinds of client at once:
- the locust load (bench/locustfile.py's clinicians: upload, poll, browse), `--users` of them;
- recorders (`--recorders` threads): each uploads, and every answer is kept with its time and the image
  id, so that the error rate during each outage is measured and each accepted upload is checked by id.

The schedule, as fractions of the run: kill -9 the worker (and its children) at 15%, start a new one
`--restart-after` seconds later; stop Redis at 40% for `--redis-down` seconds (20); cut PostgreSQL at 65%
for `--db-down` seconds (10). After the load, the run waits for the sweeper (claims of the killed worker
come back after CLAIM_TIMEOUT_SECONDS) and checks:
- every upload answered 202 is done (or failed with a reason) with exactly one prediction;
- no image is queued or processing, anywhere in the database;
- no stored photo without its row (orphan files), no row without its file.

tests/test_chaos.py runs a short version (one kill, one Redis stop, one cut, a few dozen uploads) in
`make test`, through run_chaos().
"""

from __future__ import annotations

import argparse
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

DATABASE = "melanoma_chaos"
# The sweeper as the worker's embedded beat runs it, on a short clock (tests/test_faults.py's).
SWEEPER_ENV = {
    "REQUEUE_INTERVAL_SECONDS": "1", "CLAIM_TIMEOUT_SECONDS": "8", "CELERY_TASK_TIME_LIMIT": "7",
    "CELERY_TASK_SOFT_TIME_LIMIT": "6", "REQUEUE_AFTER_SECONDS": "2", "DRIFT_REPORT_INTERVAL_SECONDS": "3600",
    "AUTO_EXPLAIN_METHODS": "none",
}  # fmt: skip


@dataclass
class Schedule:
    seconds: float  # the load's length
    kill_at: float = 0.15  # fractions of the run
    restart_after: float = 5.0
    redis_at: float = 0.40
    redis_down: float = 20.0
    db_at: float = 0.65
    db_down: float = 10.0


@dataclass
class Answer:
    at: float  # seconds since the load started
    status: int  # 0: no answer (connection refused, reset, timeout)
    image_id: str = ""


@dataclass
class Report:
    answers: list[Answer] = field(default_factory=list)
    windows: dict[str, tuple[float, float]] = field(default_factory=dict)
    accepted: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    states: dict[str, int] = field(default_factory=dict)
    orphan_files: list[str] = field(default_factory=list)
    missing_files: list[str] = field(default_factory=list)
    locust: str = ""

    def error_rate(self, start: float, end: float) -> tuple[int, int]:
        inside = [a for a in self.answers if start <= a.at < end]
        return sum(1 for a in inside if not 200 <= a.status < 300), len(inside)

    def summary(self) -> str:
        lines = [f"recorded uploads: {len(self.answers)}, accepted (202): {len(self.accepted)}; final states of all "
                 f"images: {self.states}"]  # fmt: skip
        outside = [a for a in self.answers if not any(s <= a.at < e for s, e in self.windows.values())]
        bad = sum(1 for a in outside if not 200 <= a.status < 300)
        lines.append(f"  outside the outages: {bad} of {len(outside)} refused or unanswered")
        for name, (start, end) in self.windows.items():
            failed, total = self.error_rate(start, end)
            codes = Counter(a.status for a in self.answers if start <= a.at < end)
            lines.append(f"  {name} ({start:.0f}-{end:.0f} s): {failed} of {total} refused or unanswered {dict(codes)}")
        lines.append(f"orphan files: {len(self.orphan_files)}; rows without their file: {len(self.missing_files)}")
        lines.append("problems: " + ("; ".join(self.problems[:20]) if self.problems else "none"))
        return "\n".join(lines)


def _upload(client, seed: int):
    from tests.conftest import lesion_jpeg

    return client.post(
        "/api/v1/images/", files={"image": ("lesion.jpg", lesion_jpeg(seed=seed, size=128), "image/jpeg")}
    )


def _recorder(web_url: str, token: str, stop: threading.Event, started: float, report: Report, lock, seed0: int,
              pause: float) -> None:  # fmt: skip
    import httpx

    seed = seed0
    with httpx.Client(base_url=web_url, headers={"Authorization": f"Token {token}"}, timeout=15) as client:
        while not stop.is_set():
            seed += 1
            at = time.monotonic() - started
            try:
                response = _upload(client, seed)
                answer = Answer(at, response.status_code,
                                response.json().get("id", "") if response.status_code == 202 else "")  # fmt: skip
            except Exception:  # refused, reset or timed out: no answer
                answer = Answer(at, 0)
            with lock:
                report.answers.append(answer)
                if answer.image_id:
                    report.accepted.append(answer.image_id)
            stop.wait(pause)


def run_chaos(*, env: dict[str, str], token: str, folder: Path, schedule: Schedule, recorders: int = 2,
              pause: float = 0.3, locust_users: int = 0, settle_seconds: float = 90) -> Report:  # fmt: skip
    """Start the stack from `env` (its DATABASE_URL is this process's database, reached through a
    cuttable proxy; its MEDIA_ROOT is where the photos are checked), run the load and the schedule, wait
    for the sweeper, and check. The caller's Django must use the same database."""
    from urllib.parse import urlsplit

    from tests.test_faults import PostgresProxy, Processes, free_port, wait_ready

    database = urlsplit(env["DATABASE_URL"])
    proxy = PostgresProxy((database.hostname or "127.0.0.1", database.port or 5432))
    report, lock, stop = Report(), threading.Lock(), threading.Event()
    with Processes(folder) as processes:
        redis = processes.redis()
        through_proxy = env["DATABASE_URL"].replace(database.netloc.split("@")[-1], f"127.0.0.1:{proxy.port}")
        stack_env = {**env, **SWEEPER_ENV, "CELERY_BROKER_URL": redis.url, "DATABASE_URL": through_proxy}
        port = free_port()
        web, _ = processes.popen(
            [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py",
             "-b", f"127.0.0.1:{port}", "-w", "2"], env=stack_env, log_name="web.log",
        )  # fmt: skip
        worker = wait_ready(processes.worker(stack_env, beat=True))
        web_url = f"http://127.0.0.1:{port}"
        _wait_http(web_url, web)
        locust = (
            _start_locust(processes, web_url, token, locust_users, schedule.seconds, folder) if locust_users else None
        )
        started = time.monotonic()
        threads = [
            threading.Thread(target=_recorder, daemon=True,
                             args=(web_url, token, stop, started, report, lock, 10_000 * (i + 1), pause))
            for i in range(recorders)
        ]  # fmt: skip
        for thread in threads:
            thread.start()

        def at(fraction: float) -> None:
            time.sleep(max(0.0, started + fraction * schedule.seconds - time.monotonic()))

        def now() -> float:
            return time.monotonic() - started

        at(schedule.kill_at)
        kill_start = now()
        os.killpg(worker.process.pid, signal.SIGKILL)  # the worker, its prefork child and its beat
        worker.process.wait(timeout=10)
        time.sleep(schedule.restart_after)
        worker = wait_ready(processes.worker(stack_env, beat=True))
        report.windows["worker killed, until the new one is ready"] = (kill_start, now())

        def outage(name: str, fraction: float, seconds: float, down, up) -> None:
            at(fraction)
            start = now()
            down()
            time.sleep(seconds)
            up()
            report.windows[f"{name} ({seconds:.0f} s)"] = (start, now())

        outage("Redis stopped", schedule.redis_at, schedule.redis_down, redis.stop, redis.start)
        outage("PostgreSQL cut", schedule.db_at, schedule.db_down, proxy.down, proxy.up)
        at(1.0)
        stop.set()
        for thread in threads:
            thread.join(timeout=30)
        if locust is not None:
            locust.wait(timeout=120)
            report.locust = (folder / "locust_stats.csv").read_text() if (folder / "locust_stats.csv").exists() else ""
        _settle(settle_seconds)
        _check(report, Path(env["MEDIA_ROOT"]))
    proxy.close()
    return report


def _wait_http(url: str, process) -> None:
    import httpx

    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit("the web server exited at start")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise SystemExit("the web server did not answer /healthz")


def _start_locust(processes, web_url: str, token: str, users: int, seconds: float, folder: Path):
    tokens = folder / "tokens.txt"
    tokens.write_text("\n".join([token] * users))
    process, _ = processes.popen(
        [sys.executable, "-m", "locust", "-f", "bench/locustfile.py", "--headless", "-u", str(users), "-r",
         str(max(1, users // 5)), "-t", f"{int(seconds)}s", "--host", web_url, "--csv", str(folder / "locust"),
         "--only-summary"],
        env={**os.environ, "LOAD_TOKENS_FILE": str(tokens), "LOAD_POLL_TIMEOUT": "60"}, log_name="locust.log",
    )  # fmt: skip
    return process


def _settle(seconds: float) -> None:
    """Wait until no image is queued or processing (the sweeper returns the dead worker's claims)."""
    from diagnosis.models import ImageState, LesionImage

    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if not LesionImage.objects.filter(state__in=[ImageState.QUEUED, ImageState.PROCESSING]).exists():
            return
        time.sleep(1)


def _check(report: Report, media: Path) -> None:
    from django.db.models import Count

    from diagnosis.models import ImageState, LesionImage

    images = LesionImage.objects.annotate(predictions_count=Count("predictions"))
    report.states = dict(Counter(images.values_list("state", flat=True)))
    rows = {str(row.pk): row for row in images}
    for image_id in report.accepted:
        if image_id not in rows:
            report.problems.append(f"{image_id}: answered 202 but has no row")
    for image_id, row in rows.items():
        if row.state in (ImageState.QUEUED, ImageState.PROCESSING):
            report.problems.append(f"{image_id}: still {row.state}")
        elif row.state == ImageState.DONE and row.predictions_count != 1:
            report.problems.append(f"{image_id}: done with {row.predictions_count} predictions")
        elif row.state == ImageState.FAILED and not row.error:
            report.problems.append(f"{image_id}: failed without a reason")
    stored = (
        {str(path.relative_to(media)) for path in (media / "images").glob("*")}
        if (media / "images").exists()
        else set()
    )
    named = set(LesionImage.objects.values_list("file", flat=True))
    report.orphan_files = sorted(stored - named)
    report.missing_files = sorted(named - stored)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--users", type=int, default=20, help="locust users")
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--recorders", type=int, default=2)
    parser.add_argument("--no-locust", action="store_true", help="the recorders only")
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--redis-down", type=float, default=20)
    parser.add_argument("--db-down", type=float, default=10)
    parser.add_argument("--output", default=str(ROOT / "var" / "chaos" / "chaos.md"))
    args = parser.parse_args()
    folder = ROOT / "var" / "chaos"
    subprocess.run(["rm", "-rf", str(folder)], check=True)
    folder.mkdir(parents=True)
    database_url = f"postgres://postgres@127.0.0.1:5432/{DATABASE}"
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "false", "DATABASE_URL": database_url,
        "MEDIA_ROOT": str(folder / "media"), "MODEL_CACHE_DIR": str(folder / "model-cache"), "VAR_DIR": str(folder),
        "API_RATE_LIMIT": "", "API_UPLOAD_RATE_LIMIT": "", "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1",
        "CACHE_URL": "",
    }  # fmt: skip
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], check=True)
    own = ("DJANGO_SETTINGS_MODULE", "SECRET_KEY", "ALLOWED_HOSTS", "SECURE_SSL_REDIRECT", "DATABASE_URL", "MEDIA_ROOT",
           "VAR_DIR")  # fmt: skip
    os.environ.update({key: env[key] for key in own})
    os.environ["CELERY_BROKER_URL"] = "memory://"
    import logging

    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # a line per recorded upload otherwise
    from django.core.management import call_command

    call_command("migrate", verbosity=0)
    import torch

    from diagnosis.models import Clinic
    from diagnosis.services.clinics import create_clinician
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token
    from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes

    torch.manual_seed(0)
    checkpoint = checkpoint_bytes(
        build_model(args.arch).eval(), CheckpointMeta(arch=args.arch, input_size=args.input_size)
    )
    register_model(checkpoint=checkpoint, version="chaos", activate=True)
    user = create_clinician(clinic=Clinic.objects.create(name="Chaos clinic"), username="chaos", password=None)
    _, token = create_api_token(user=user, name="chaos")
    seconds = args.minutes * 60
    schedule = Schedule(seconds=seconds, redis_down=args.redis_down, db_down=args.db_down)
    users = 0 if args.no_locust else args.users
    print(f"chaos: {seconds:.0f} s, {users} locust users, {args.recorders} recorders; logs in {folder}", flush=True)
    report = run_chaos(env=env, token=token, folder=folder, schedule=schedule, recorders=args.recorders,
                       locust_users=users, settle_seconds=120)  # fmt: skip
    text = f"# Chaos run, {time.strftime('%Y-%m-%d %H:%M')}\n\n```\n{report.summary()}\n```\n"
    if report.locust:
        text += f"\nlocust (all users):\n\n```\n{report.locust}```\n"
    Path(args.output).parent.mkdir(parents=True, exist_ok=True)
    Path(args.output).write_text(text)
    print(text)
    sys.exit(1 if report.problems or report.orphan_files or report.missing_files else 0)


if __name__ == "__main__":
    main()
