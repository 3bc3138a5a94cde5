"""gunicorn settings for the web tier (the load test and the production image use this file)."""

import os
import shutil
import tempfile
from pathlib import Path

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "gthread"
# Requests that wait for a result (`?wait=N`, the event stream) hold a thread each while they wait, with
# no CPU: the settings let at most half of the threads wait and a quarter stream (RESULT_WAIT_MAX_PER_PROCESS,
# STATUS_STREAM_MAX), so uploads and pages always find one free.
threads = int(os.environ.get("GUNICORN_THREADS", "16"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# Idle keep-alive connections wait in gthread's poller, not in a thread. A short keep-alive lets the
# server close a connection just as a client reuses it (a reset on a non-idempotent POST); keep them
# longer than clients and proxies do (nginx and most load balancers: 60 s).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
# The heartbeat file each worker touches on every loop: in memory, not on the container's overlay disk
# (gunicorn's advice for Docker).
worker_tmp_dir = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"

# --- metrics and logs (docs/observability.md) ------------------------------------------------------------
# prometheus_client's multiprocess mode: each worker process records into files in this folder and /metrics
# adds them all up. It is read when prometheus_client is first imported, so it is set here, in the master,
# before any worker loads the app. The folder belongs to this gunicorn alone: it is emptied at start.
_metrics_dir_is_ours = not os.environ.get("PROMETHEUS_MULTIPROC_DIR")
if _metrics_dir_is_ours:
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="prometheus-web-")


def on_starting(server):
    folder = Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    folder.mkdir(parents=True, exist_ok=True)
    for leftover in folder.glob("*.db"):  # an earlier run's counts
        leftover.unlink()


def child_exit(server, worker):
    from prometheus_client import multiprocess

    multiprocess.mark_process_dead(worker.pid)  # its live gauges go; its counters stay in the sums


def pre_request(worker, req):
    """A body the app refuses unread (webapp.middleware.RequestSizeLimitMiddleware: 413 over its limit,
    411 when chunked): close the connection after the answer. On a kept-alive connection gunicorn
    would otherwise read the rest of the body, however large, to find the next request; the app cannot
    ask for the close itself (gunicorn drops a Connection header from the application)."""
    from webapp.middleware import body_limit  # the worker has loaded the app (and Django) by now

    chunked = any(name == "TRANSFER-ENCODING" and "chunked" in value.lower() for name, value in req.headers)
    length = next((value for name, value in req.headers if name == "CONTENT-LENGTH"), "0")
    try:
        too_long = int(length) > body_limit(req.path)
    except ValueError:
        too_long = False
    if chunked or too_long:
        req.must_close = True


def on_exit(server):
    if _metrics_dir_is_ours:
        shutil.rmtree(os.environ["PROMETHEUS_MULTIPROC_DIR"], ignore_errors=True)


if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
    # gunicorn's own lines as JSON too. Its access log stays off: it writes the full URL, query string
    # included (a portal search would put a patient reference in the log); the app logs one line per
    # request instead (logger webapp.request, with the request id).
    logconfig_dict = {
        "version": 1,
        "disable_existing_loggers": False,
        "formatters": {"json": {"()": "webapp.structured_logging.JsonFormatter"}},
        "filters": {"redact": {"()": "webapp.structured_logging.RedactSecretsFilter"}},
        "handlers": {
            "json": {
                "class": "logging.StreamHandler",
                "formatter": "json",
                "filters": ["redact"],
                "stream": "ext://sys.stderr",
            },
            "none": {"class": "logging.NullHandler"},
        },  # fmt: skip
        "root": {"level": "INFO", "handlers": ["json"]},
        "loggers": {
            "gunicorn.error": {"level": "INFO", "handlers": ["json"], "propagate": False},
            "gunicorn.access": {"level": "INFO", "handlers": ["none"], "propagate": False},
        },
    }
