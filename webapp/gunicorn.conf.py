"""gunicorn settings for the web tier (the load test and the production image use this file)."""

import os

bind = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000")
workers = int(os.environ.get("GUNICORN_WORKERS", "2"))
worker_class = "gthread"
threads = int(os.environ.get("GUNICORN_THREADS", "4"))
timeout = int(os.environ.get("GUNICORN_TIMEOUT", "60"))
# Idle keep-alive connections wait in gthread's poller, not in a thread. A short keep-alive lets the
# server close a connection just as a client reuses it (a reset on a non-idempotent POST); keep them
# longer than clients and proxies do (nginx and most load balancers: 60 s).
keepalive = int(os.environ.get("GUNICORN_KEEPALIVE", "75"))
accesslog = os.environ.get("GUNICORN_ACCESS_LOG") or None
errorlog = "-"
