#!/usr/bin/env bash
# The one place that says how every process of the service starts. docker-compose.yml runs its
# services through this script (the image's ENTRYPOINT), and tests/test_deploy.py starts the same roles
# with the same environment on a machine without Docker, so the two cannot drift apart.
#
#   entrypoint.sh migrate         apply the database migrations, then exit
#   entrypoint.sh web             gunicorn (webapp/gunicorn.conf.py; GUNICORN_BIND, GUNICORN_WORKERS, ...)
#   entrypoint.sh worker          a Celery worker: WORKER_QUEUES, WORKER_CONCURRENCY, WORKER_POOL, WORKER_HOSTNAME
#   entrypoint.sh beat            the Celery beat scheduler (one per deployment)
#   entrypoint.sh worker-health   exit 0 if this container's own worker node answers a ping, else 1
#   entrypoint.sh web-health      exit 0 if this container's gunicorn answers GET /healthz, else 1
#   entrypoint.sh manage ARGS...  python manage.py ARGS... (register_model, createsuperuser, ...)
#
# The commands run whatever `python`, `gunicorn` and `celery` come first on PATH: the image's, or a
# virtual environment's when PATH starts with its bin/ folder.
set -euo pipefail

cd "$(dirname "$0")/.."

role="${1:-web}"
if [ "$#" -gt 0 ]; then shift; fi

# Celery's own expansion of the worker's --hostname (%h, %n, %d), so that the health check pings
# exactly the node name the worker registered under.
node_name() {
    python -c 'import os, sys
from celery.utils.nodenames import default_nodename, host_format
sys.stdout.write(host_format(default_nodename(os.environ.get("WORKER_HOSTNAME") or "worker@%h")))'
}

case "$role" in
    migrate)
        exec python manage.py migrate --noinput
        ;;
    web)
        exec gunicorn -c webapp/gunicorn.conf.py webapp.wsgi "$@"
        ;;
    worker)
        concurrency="${WORKER_CONCURRENCY:-1}"
        # webapp/celery.py sizes torch's threads per child from this.
        export CELERY_WORKER_CONCURRENCY="$concurrency"
        exec celery -A webapp worker \
            --queues "${WORKER_QUEUES:-inference,explain,default}" \
            --concurrency "$concurrency" \
            --pool "${WORKER_POOL:-prefork}" \
            --hostname "${WORKER_HOSTNAME:-worker@%h}" \
            --loglevel "${LOG_LEVEL:-INFO}" \
            --without-gossip --without-mingle \
            "$@"
        ;;
    beat)
        # The schedule's state file: CELERY_BEAT_SCHEDULE_FILENAME in the settings (under VAR_DIR).
        exec celery -A webapp --quiet beat --loglevel "${LOG_LEVEL:-INFO}" "$@"
        ;;
    worker-health)
        node="$(node_name)"
        if celery -A webapp inspect ping --destination "$node" --timeout "${WORKER_HEALTH_TIMEOUT:-5}"; then
            exit 0
        fi
        echo "worker $node did not answer a ping" >&2
        exit 1
        ;;
    web-health)
        # Sent as the TLS-terminating proxy would (X-Forwarded-Proto: https), to a name the site serves:
        # otherwise production settings answer a redirect to HTTPS, or 400 for an unknown host.
        exec python - <<'PYTHON'
import os
import sys
import urllib.request

port = os.environ.get("GUNICORN_BIND", "0.0.0.0:8000").rsplit(":", 1)[-1]
hosts = [host.strip().lstrip(".") for host in os.environ.get("ALLOWED_HOSTS", "").split(",")]
host = next((name for name in hosts if name and name != "*"), "localhost")
request = urllib.request.Request(
    f"http://127.0.0.1:{port}/healthz", headers={"Host": host, "X-Forwarded-Proto": "https"}
)
try:
    with urllib.request.urlopen(request, timeout=float(os.environ.get("WEB_HEALTH_TIMEOUT", "5"))) as response:
        healthy = response.status == 200
except Exception as exc:  # refused, timed out, or an error status
    print(f"web health check failed: {exc}", file=sys.stderr)
    sys.exit(1)
sys.exit(0 if healthy else 1)
PYTHON
        ;;
    manage)
        exec python manage.py "$@"
        ;;
    *)
        echo "unknown role '$role': use migrate, web, worker, beat, worker-health, web-health or manage" >&2
        exit 64
        ;;
esac
