"""The embedded default: SQLite, Celery's filesystem broker and local files, all under var/."""

from __future__ import annotations

from django.core.exceptions import ImproperlyConfigured

from .base import *  # noqa: F403
from .base import VAR_DIR, database_from_env
from .env import env_bool, env_float, env_int, env_str

DEBUG = env_bool("DJANGO_DEBUG", True)
DEV_SECRET_KEY = "dev-only-insecure-key-do-not-use-in-production"
SECRET_KEY = env_str("SECRET_KEY", DEV_SECRET_KEY)

LOCAL_HOSTS = {"localhost", "127.0.0.1", "[::1]", "::1", "testserver"}
_public_hosts = sorted(set(ALLOWED_HOSTS) - LOCAL_HOSTS)  # noqa: F405
if _public_hosts and (DEBUG or SECRET_KEY == DEV_SECRET_KEY):
    # DEBUG pages show settings and code, and this SECRET_KEY is public: never for a real host name.
    raise ImproperlyConfigured(
        f"The development settings (DEBUG on, a public SECRET_KEY) refuse to serve {_public_hosts}: use "
        "DJANGO_SETTINGS_MODULE=webapp.settings.prod for a real deployment (docs/deployment.md)."
    )

DATABASES = {"default": database_from_env(f"sqlite:///{VAR_DIR / 'db.sqlite3'}")}

_BROKER_DIR = VAR_DIR / "broker"
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "filesystem://")
if CELERY_BROKER_URL.startswith("filesystem://"):
    for _folder in ("queue", "processed", "control"):
        (_BROKER_DIR / _folder).mkdir(parents=True, exist_ok=True)
    CELERY_BROKER_TRANSPORT_OPTIONS = {
        "data_folder_in": str(_BROKER_DIR / "queue"),
        "data_folder_out": str(_BROKER_DIR / "queue"),
        "processed_folder": str(_BROKER_DIR / "processed"),
        "control_folder": str(_BROKER_DIR / "control"),
        "store_processed": False,
        # How often an idle worker looks for new messages: the main part of the embedded
        # default's upload-to-result latency.
        "polling_interval": env_float("FILESYSTEM_BROKER_POLL_SECONDS", 0.1),
    }
    # Celery's blocking loop for this transport acknowledges a finished task only when its 2-second
    # wait for messages ends; with one message in flight, every upload would wait for that. A few
    # messages in hand keep the worker busy meanwhile (bench/throughput.py: embedded latency).
    CELERY_WORKER_PREFETCH_MULTIPLIER = env_int("CELERY_WORKER_PREFETCH_MULTIPLIER", 8)

STATIC_ROOT.mkdir(parents=True, exist_ok=True)  # noqa: F405 - whitenoise warns when it is missing
EMAIL_BACKEND = "django.core.mail.backends.console.EmailBackend"
