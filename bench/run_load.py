"""The load test: locust against the production processes on loopback (gunicorn, PostgreSQL, Redis and
a real Celery worker), then the upload-to-prediction times from the database's own timestamps.

    make load                          # 50 users for 5 minutes
    .venv/bin/python bench/run_load.py --users 50 --minutes 5 [--arch resnet18 --input-size 224]

Uses a fresh database `melanoma_load` on this machine's PostgreSQL and Redis databases 5 and 6, and
writes everything under var/load/. The model is a freshly initialised ResNet (its weights do not
change its speed). Automatic explanations are off (AUTO_EXPLAIN_METHODS=none): in production they run
on their own worker, which this 2-core machine has no room for.
"""

from __future__ import annotations

import argparse
import csv
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PY = sys.executable
DATABASE = "melanoma_load"


def run(command: list[str], env: dict, **kwargs) -> None:
    subprocess.run(command, cwd=ROOT, env=env, check=True, **kwargs)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--users", type=int, default=50)
    parser.add_argument("--minutes", type=float, default=5)
    parser.add_argument("--arch", default="resnet18")
    parser.add_argument("--input-size", type=int, default=224)
    parser.add_argument("--port", type=int, default=8090)
    parser.add_argument("--web-workers", type=int, default=2)
    args = parser.parse_args()

    out = ROOT / "var" / "load"
    out.mkdir(parents=True, exist_ok=True)
    media = out / "media"
    env = {
        **os.environ, "DJANGO_SETTINGS_MODULE": "webapp.settings.prod", "SECRET_KEY": secrets.token_urlsafe(50),
        "ALLOWED_HOSTS": "127.0.0.1,localhost", "SECURE_SSL_REDIRECT": "false",
        "DATABASE_URL": f"postgres://postgres@127.0.0.1:5432/{DATABASE}",
        "CELERY_BROKER_URL": "redis://127.0.0.1:6379/5", "CACHE_URL": "redis://127.0.0.1:6379/6",
        "MEDIA_ROOT": str(media), "MODEL_CACHE_DIR": str(out / "model-cache"), "VAR_DIR": str(out),
        "AUTO_EXPLAIN_METHODS": "none", "API_RATE_LIMIT": "", "API_UPLOAD_RATE_LIMIT": "",
        "LOG_LEVEL": "WARNING", "PYTHONUNBUFFERED": "1", "LOAD_TOKENS_FILE": str(out / "tokens.txt"),
    }  # fmt: skip
    subprocess.run(["dropdb", "-h", "127.0.0.1", "-U", "postgres", "--if-exists", DATABASE], check=True)
    subprocess.run(["createdb", "-h", "127.0.0.1", "-U", "postgres", DATABASE], check=True)
    subprocess.run(["redis-cli", "-n", "5", "flushdb"], check=True, capture_output=True)
    subprocess.run(["redis-cli", "-n", "6", "flushdb"], check=True, capture_output=True)
    run([PY, "manage.py", "migrate", "-v", "0"], env)
    run([PY, "manage.py", "shell", "-c", SETUP.format(arch=args.arch, size=args.input_size, users=10,
                                                       tokens=out / "tokens.txt")], env)  # fmt: skip

    logs = {name: open(out / f"{name}.log", "wb") for name in ("web", "worker")}  # noqa: SIM115
    processes = [
        subprocess.Popen([PY, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py", "-b",
                          f"127.0.0.1:{args.port}", "-w", str(args.web_workers)], cwd=ROOT, env=env,
                         stdout=logs["web"], stderr=subprocess.STDOUT, start_new_session=True),
        subprocess.Popen([PY, "-m", "celery", "-A", "webapp", "worker", "-Q", "inference,default", "--concurrency",
                          "1", "--loglevel", "WARNING", "--hostname", "load@%h"], cwd=ROOT, env=env,
                         stdout=logs["worker"], stderr=subprocess.STDOUT, start_new_session=True),
    ]  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{args.port}/healthz", timeout=2)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise SystemExit("gunicorn did not start; see var/load/web.log") from None
                time.sleep(0.5)
        started = time.time()
        subprocess.run(
            [PY, "-m", "locust", "-f", str(ROOT / "bench" / "locustfile.py"), "--headless", "-u", str(args.users),
             "-r", str(max(1, args.users // 10)), "-t", f"{int(args.minutes * 60)}s", "--host",
             f"http://127.0.0.1:{args.port}", "--csv", str(out / "locust"), "--only-summary"],
            cwd=ROOT, env=env, check=False,
        )  # fmt: skip
        time.sleep(2)
        run([PY, "manage.py", "shell", "-c", REPORT.format(since=started)], env)
    finally:
        for process in processes:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGTERM)
        for process in processes:
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
        for log in logs.values():
            log.close()
    print_locust_table(out / "locust_stats.csv")


SETUP = """
import torch
from diagnosis.models import Clinic
from diagnosis.services.clinics import create_clinician
from diagnosis.services.registry import register_model
from diagnosis.services.tokens import create_api_token
from mlcore.model import CheckpointMeta, build_model, checkpoint_bytes
torch.manual_seed(0)
meta = CheckpointMeta(arch="{arch}", input_size={size})
register_model(checkpoint=checkpoint_bytes(build_model("{arch}").eval(), meta), version="load-{arch}-{size}",
               activate=True)
clinic = Clinic.objects.create(name="Load test clinic")
tokens = []
for index in range({users}):
    user = create_clinician(clinic=clinic, username=f"load{{index}}", password=None)
    tokens.append(create_api_token(user=user, name="load")[1])
open("{tokens}", "w").write("\\n".join(tokens))
"""

REPORT = """
import numpy as np
from datetime import datetime, timezone
from diagnosis.models import LesionImage, Prediction
since = datetime.fromtimestamp({since}, tz=timezone.utc)
images = LesionImage.objects.filter(created_at__gte=since)
done = images.filter(state="done")
waits = [(p.created_at - p.image.created_at).total_seconds()
         for p in Prediction.objects.filter(image__in=done).select_related("image")]
print()
print(f"uploads {{images.count()}}, done {{done.count()}}, failed {{images.filter(state='failed').count()}}, "
      f"still waiting {{images.exclude(state__in=['done', 'failed']).count()}}")
if waits:
    p50, p95 = np.percentile(waits, [50, 95])
    print(f"upload to prediction stored: p50 {{p50:.2f}} s, p95 {{p95:.2f}} s")
"""


def print_locust_table(path: Path) -> None:
    if not path.exists():
        print("no locust statistics written")
        return
    print("\n| endpoint | requests | failures | req/s | p50 ms | p95 ms | p99 ms |")
    print("|---|---|---|---|---|---|---|")
    with open(path) as handle:
        for row in csv.DictReader(handle):
            print(
                f"| {row['Name']} | {row['Request Count']} | {row['Failure Count']} | "
                f"{float(row['Requests/s']):.1f} | {row['50%']} | {row['95%']} | {row['99%']} |"
            )


if __name__ == "__main__":
    main()
