"""Settings shared by every environment. dev.py, test.py and prod.py set the defaults.

Long because: every setting the project reads is declared here once, each with its environment
variable, default and a comment on what it does; dev.py, test.py and prod.py only override."""

from __future__ import annotations

import json
import os
from datetime import timedelta
from pathlib import Path

import dj_database_url
from django.core.exceptions import ImproperlyConfigured

from .env import env_bool, env_float, env_int, env_list, env_str

BASE_DIR = Path(__file__).resolve().parent.parent.parent
# Everything the embedded default writes (SQLite, broker folders, media, model cache) lives here.
VAR_DIR = Path(env_str("VAR_DIR", str(BASE_DIR / "var"))).resolve()

DEBUG = env_bool("DJANGO_DEBUG", False)
ALLOWED_HOSTS = env_list("ALLOWED_HOSTS", ["localhost", "127.0.0.1", "[::1]"])
CSRF_TRUSTED_ORIGINS = env_list("CSRF_TRUSTED_ORIGINS", [])

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.auth",
    "django.contrib.contenttypes",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "rest_framework",
    "knox",
    "drf_spectacular",
    "drf_spectacular_sidecar",
    "axes",
    "django_prometheus",
    "diagnosis",
]

MIDDLEWARE = [
    # First and (before axes) last: django-prometheus times the whole stack and counts final statuses.
    "django_prometheus.middleware.PrometheusBeforeMiddleware",
    # Early, so every later log line of the request carries its request id.
    "webapp.request_id.RequestIdMiddleware",
    # Before anything reads the body: an oversized one is refused unread (413).
    "webapp.middleware.RequestSizeLimitMiddleware",
    "django.middleware.security.SecurityMiddleware",
    "whitenoise.middleware.WhiteNoiseMiddleware",
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
    "django.middleware.clickjacking.XFrameOptionsMiddleware",
    "webapp.middleware.SecurityHeadersMiddleware",
    "django_prometheus.middleware.PrometheusAfterMiddleware",
    # Last, as django-axes asks: it turns a locked-out login into the lockout page.
    "axes.middleware.AxesMiddleware",
]

ROOT_URLCONF = "webapp.urls"
WSGI_APPLICATION = "webapp.wsgi.application"

TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "DIRS": [BASE_DIR / "templates"],
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
                "diagnosis.portal.context.portal",
            ],
        },
    },
]


def database_from_env(default_url: str) -> dict:
    url = env_str("DATABASE_URL", default_url)
    config = dj_database_url.parse(url, conn_max_age=env_int("DB_CONN_MAX_AGE", 60), conn_health_checks=True)
    if config["ENGINE"] == "django.db.backends.sqlite3":
        # WAL lets the web server read while the worker writes; IMMEDIATE avoids lock upgrades that
        # fail with "database is locked" instead of waiting.
        config["CONN_MAX_AGE"] = 0
        config["CONN_HEALTH_CHECKS"] = False
        config["OPTIONS"] = {
            "timeout": 20,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL; PRAGMA synchronous=NORMAL;",
        }
    return config


AUTH_PASSWORD_VALIDATORS = [
    {"NAME": "django.contrib.auth.password_validation.UserAttributeSimilarityValidator"},
    {"NAME": "django.contrib.auth.password_validation.MinimumLengthValidator", "OPTIONS": {"min_length": 10}},
    {"NAME": "django.contrib.auth.password_validation.CommonPasswordValidator"},
    {"NAME": "django.contrib.auth.password_validation.NumericPasswordValidator"},
    # Not a rule: its password_changed() revokes the user's API tokens on every password change.
    {"NAME": "diagnosis.services.tokens.RevokeTokensOnPasswordChange"},
]

LANGUAGE_CODE = "en-gb"
TIME_ZONE = env_str("TIME_ZONE", "UTC")
USE_I18N = True
USE_TZ = True

STATIC_URL = "static/"
STATIC_ROOT = Path(env_str("STATIC_ROOT", str(VAR_DIR / "static")))
# No MEDIA_URL is routed anywhere: patient images are only ever served by authenticated views.
MEDIA_ROOT = Path(env_str("MEDIA_ROOT", str(VAR_DIR / "media")))
MEDIA_URL = None

# Where uploads, heatmaps, attribution arrays, drift reports and model weights live (everything goes
# through default_storage). "local": files under MEDIA_ROOT, for one machine. "s3": a private bucket of
# an S3-compatible service (AWS S3, MinIO, ...) shared by the web tier and every worker machine; see
# docs/storage-and-scaling.md.
STORAGE_BACKEND = env_str("STORAGE_BACKEND", "local")
# Lifetime of a presigned URL (only issued when MEDIA_PRESIGNED_REDIRECT is on, after the permission check).
S3_PRESIGNED_URL_SECONDS = env_int("S3_PRESIGNED_URL_SECONDS", 60)
# Off (the default): the API streams files through the app. On, with STORAGE_BACKEND=s3: the API's file,
# overlay, heatmap and attribution downloads answer 302 to a presigned URL of S3_PRESIGNED_URL_SECONDS,
# issued after the clinic check and the audit record. The clients must be able to reach S3_ENDPOINT_URL.
MEDIA_PRESIGNED_REDIRECT = env_bool("MEDIA_PRESIGNED_REDIRECT", False)


def default_storage_from_env(backend: str, media_root) -> dict:
    """STORAGES["default"] for a STORAGE_BACKEND, the bucket and credentials read from the environment."""
    if backend == "local":
        return {
            "BACKEND": "django.core.files.storage.FileSystemStorage",
            "OPTIONS": {"location": str(media_root), "base_url": None},
        }
    if backend == "s3":
        from botocore.config import Config

        endpoint = env_str("S3_ENDPOINT_URL", "") or None  # None: AWS S3 itself
        return {
            "BACKEND": "storages.backends.s3.S3Storage",
            "OPTIONS": {
                "bucket_name": env_str("S3_BUCKET"),
                "endpoint_url": endpoint,
                "region_name": env_str("S3_REGION", "us-east-1"),
                "access_key": env_str("AWS_ACCESS_KEY_ID", "") or None,
                "secret_key": env_str("AWS_SECRET_ACCESS_KEY", "") or None,
                # Private objects: no ACL is sent (objects stay private to the bucket's owner), no public
                # or custom-domain URLs, and url() only ever gives a signed, expiring URL.
                "default_acl": None,
                "querystring_auth": True,
                "querystring_expire": S3_PRESIGNED_URL_SECONDS,
                "custom_domain": None,
                "file_overwrite": False,  # a name already taken gets a suffix, as on local disk
                # Files read from the bucket are buffered in memory up to this size, then on disk.
                "max_memory_size": 8 * 1024 * 1024,
                "client_config": Config(
                    signature_version="s3v4",
                    # MinIO and most S3-compatible servers want bucket names in the path.
                    s3={"addressing_style": env_str("S3_ADDRESSING_STYLE", "path" if endpoint else "auto")},
                    connect_timeout=env_float("S3_CONNECT_TIMEOUT_SECONDS", 5.0),
                    read_timeout=env_float("S3_READ_TIMEOUT_SECONDS", 60.0),
                    retries={"max_attempts": env_int("S3_MAX_ATTEMPTS", 3), "mode": "standard"},
                ),
            },
        }
    raise ImproperlyConfigured(f"STORAGE_BACKEND={backend!r} is not supported; use 'local' or 's3'.")


STORAGES = {
    "default": default_storage_from_env(STORAGE_BACKEND, MEDIA_ROOT),
    # Static files are public and are collected at build time, as root, for an app that runs as another
    # user: they must not take the media's private modes (FILE_UPLOAD_*_PERMISSIONS below).
    "staticfiles": {
        "BACKEND": "whitenoise.storage.CompressedStaticFilesStorage",
        "OPTIONS": {"file_permissions_mode": 0o644, "directory_permissions_mode": 0o755},
    },
}
FILE_UPLOAD_PERMISSIONS = 0o600
FILE_UPLOAD_DIRECTORY_PERMISSIONS = 0o700

DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"
LOGIN_URL = "login"
LOGIN_REDIRECT_URL = "portal:patients"
LOGOUT_REDIRECT_URL = "login"
AUTHENTICATION_BACKENDS = [
    # django-axes first: it refuses logins for a locked-out username and address before the
    # password is checked.
    "axes.backends.AxesStandaloneBackend",
    "django.contrib.auth.backends.ModelBackend",
]
# Login throttling (portal and admin): after AXES_FAILURE_LIMIT failures for one username from one
# address, that pair is locked out for AXES_COOLOFF_MINUTES. A success resets the count.
AXES_FAILURE_LIMIT = env_int("AXES_FAILURE_LIMIT", 5)
AXES_COOLOFF_TIME = timedelta(minutes=env_int("AXES_COOLOFF_MINUTES", 15))
AXES_LOCKOUT_PARAMETERS = [["username", "ip_address"]]
# The reverse proxies in front of gunicorn (1 with the documented Caddy or nginx): the client's address is
# then taken from the trusted end of X-Forwarded-For, for the lockout above and the audit log alike
# (diagnosis.client_address). 0: REMOTE_ADDR, no proxy header trusted. Behind a proxy with 0, every client
# has the proxy's address, and five bad logins lock a username out for everyone.
TRUSTED_PROXY_COUNT = env_int("TRUSTED_PROXY_COUNT", 0)
AXES_CLIENT_IP_CALLABLE = "diagnosis.client_address.client_ip"
AXES_RESET_ON_SUCCESS = True
AXES_LOCKOUT_TEMPLATE = "registration/locked_out.html"
AXES_VERBOSE = False
SESSION_COOKIE_AGE = env_int("SESSION_COOKIE_AGE", 8 * 3600)  # a working day

CACHE_URL = env_str("CACHE_URL", "")
CACHES = {
    "default": (
        {"BACKEND": "django.core.cache.backends.redis.RedisCache", "LOCATION": CACHE_URL}
        if CACHE_URL.startswith(("redis://", "rediss://"))
        else {"BACKEND": "django.core.cache.backends.locmem.LocMemCache"}
    )
}

# --- Uploads and the model -------------------------------------------------------------------
MAX_UPLOAD_BYTES = env_int("MAX_UPLOAD_BYTES", 20 * 1024 * 1024)
MAX_IMAGE_PIXELS = env_int("MAX_IMAGE_PIXELS", 40_000_000)
# Images (with their results and files) older than this many days are deleted daily; 0 keeps them.
IMAGE_RETENTION_DAYS = env_int("IMAGE_RETENTION_DAYS", 0)
# POST /api/v1/images/batch/: at most this many files per request.
MAX_BATCH_FILES = env_int("MAX_BATCH_FILES", 100)
# The largest request body of any kind (a batch of photos; webapp.middleware.RequestSizeLimitMiddleware
# answers 413 above it without reading it). A single-photo upload is held to MAX_UPLOAD_BYTES and a little.
# Set the reverse proxy's limit (nginx client_max_body_size) to the same.
MAX_REQUEST_BYTES = env_int("MAX_REQUEST_BYTES", 200 * 1024 * 1024)
DATA_UPLOAD_MAX_NUMBER_FILES = MAX_BATCH_FILES + 1
# Django only buffers this much of a file in memory; larger uploads go to a temporary file.
FILE_UPLOAD_MAX_MEMORY_SIZE = 5 * 1024 * 1024
MODEL_CACHE_DIR = Path(env_str("MODEL_CACHE_DIR", str(VAR_DIR / "model-cache")))
INFERENCE_DEVICE = env_str("INFERENCE_DEVICE", "auto")
# How the inference worker decodes JPEGs: "auto" (nvJPEG through torchvision when the model is on a GPU
# that supports it, else Pillow), "torchvision" (always, on the model's device), "pillow" (never).
INFERENCE_DECODE = env_str("INFERENCE_DECODE", "auto").strip().lower()
if INFERENCE_DECODE not in ("auto", "torchvision", "pillow"):
    raise ImproperlyConfigured(f"INFERENCE_DECODE={INFERENCE_DECODE!r}: use auto, torchvision or pillow.")
# Load the active model and run one batch when an inference worker process starts.
INFERENCE_WARMUP = env_bool("INFERENCE_WARMUP", True)
# An inference task takes its own image plus up to INFERENCE_BATCH_SIZE - 1 other queued ones as one
# batch (never waiting for more); DECODE_THREADS read and decode a batch's photos in parallel.
INFERENCE_BATCH_SIZE = env_int("INFERENCE_BATCH_SIZE", 16)
DECODE_THREADS = env_int("DECODE_THREADS", 2)
# A task whose own photo (or explanation) was fresh keeps taking batches while a full batch is queued,
# up to this many batches (and half its soft time limit): one batch on the device while the next is
# claimed and decoded and the last one recorded (diagnosis.services.engine). 1: one batch per task.
# 0 (auto): 8 for a model on a GPU, 1 on the CPU, where the worker's prefork children already share the
# cores between them and pipelining measured 8% fewer images/s on 2 cores (bench/README.md, issue 17).
PIPELINE_BATCHES = env_int("PIPELINE_BATCHES", 0)
# Coalesced wake-ups (diagnosis/services/wakeups.py, Redis broker only): at most this many prediction
# messages wait for a worker at a time; the others' photos are gathered into their batches. 0 publishes
# one message per upload. The count expires after INFERENCE_COALESCE_SECONDS (bounds a lost message).
INFERENCE_COALESCE_MESSAGES = env_int("INFERENCE_COALESCE_MESSAGES", 4)
INFERENCE_COALESCE_SECONDS = env_float("INFERENCE_COALESCE_SECONDS", 20.0)
# A worker process that has finished no batch for this long (and has none in progress) starts decoding
# an upload's photo before it claims it (diagnosis/services/predictions.decode_ahead). Negative: never.
INFERENCE_DECODE_AHEAD_IDLE_MS = env_int("INFERENCE_DECODE_AHEAD_IDLE_MS", 50)
# A claim older than this is presumed dead (its worker was killed) and may be taken again.
CLAIM_TIMEOUT_SECONDS = env_int("CLAIM_TIMEOUT_SECONDS", 300)
# A queued image whose message has not been consumed for this long is enqueued again.
REQUEUE_AFTER_SECONDS = env_int("REQUEUE_AFTER_SECONDS", 120)
MAX_PROCESSING_ATTEMPTS = env_int("MAX_PROCESSING_ATTEMPTS", 3)
API_TOKEN_TTL_DAYS = env_int("API_TOKEN_TTL_DAYS", 90)
# Explanations: every prediction gets Grad-CAM at once and these methods on the explain queue.
# "none" turns them off.
AUTO_EXPLAIN_METHODS = [m for m in env_list("AUTO_EXPLAIN_METHODS", ["integrated_gradients"]) if m.lower() != "none"]
# Grad-CAM's pictures (overlay, heatmap, .npy): "on_view" draws them at the first request for them, in that
# request (about 60 ms for a 1.5 MP photo on one core), and keeps them; "eager" draws every one at once on
# the default queue. on_view spares the CPU of uploads whose pictures nobody opens (most API clients),
# which on a small machine is the CPU the next prediction needs (bench/README.md, issue 19).
GRADCAM_PICTURES = env_str("GRADCAM_PICTURES", "on_view")
# The photo-quality gate (issue 20; README, "Photo quality"): its thresholds are stored with each model
# version. QUALITY_GATE_OVERRIDES replaces some, as JSON: {"focus:low": 0.9, "brightness:high": 230,
# "ood": 3.5, "band": [0.2, 0.4]} (keys: mlcore.quality's "measure:low|high", "ood" for the
# out-of-distribution score, "band" for the refer-when-unsure probabilities). A clinic's check (strict,
# lenient or off) is set in the admin; an upload may ask for another (`check`).
try:
    QUALITY_GATE_OVERRIDES = json.loads(env_str("QUALITY_GATE_OVERRIDES", "") or "{}")
except ValueError as exc:
    raise ImproperlyConfigured(f"QUALITY_GATE_OVERRIDES is not valid JSON: {exc}") from None
# Test-time augmentation (three flips of each photo in the same forward pass; a disagreement makes the
# result "uncertain"): "auto" runs it on a GPU only, where it costs little; "on"; "off".
TEST_TIME_AUGMENTATION = env_str("TEST_TIME_AUGMENTATION", "auto")
# Results without polling (docs/api.md, "Waiting for the result"): the worker that changes an upload's
# state notifies the web processes, which wake the requests waiting for it. RESULT_NOTIFY: "auto" (a
# Redis channel when the broker is Redis, else PostgreSQL LISTEN/NOTIFY when the database is PostgreSQL,
# else datagrams between the processes of one machine under VAR_DIR: the embedded default), or one of
# "redis", "postgres", "local"; "off" answers every wait at once.
RESULT_NOTIFY = env_str("RESULT_NOTIFY", "auto")
RESULT_NOTIFY_REDIS_URL = env_str("RESULT_NOTIFY_REDIS_URL", "")  # default: the broker's, when it is Redis
# `?wait=N` / `Prefer: wait=N`: at most this many seconds (below the proxy's read timeout: nginx 60 s).
RESULT_WAIT_MAX_SECONDS = env_int("RESULT_WAIT_MAX_SECONDS", 30)
# A waiting request holds one of its web process's GUNICORN_THREADS (webapp/gunicorn.conf.py). At most
# this many wait at once per process, and this many for one user; a request beyond them is answered at
# once, as without the option. The defaults leave a quarter of the threads to uploads and pages.
GUNICORN_THREADS = env_int("GUNICORN_THREADS", 16)
RESULT_WAIT_MAX_PER_PROCESS = env_int("RESULT_WAIT_MAX_PER_PROCESS", max(1, GUNICORN_THREADS // 2))
RESULT_WAIT_MAX_PER_USER = env_int("RESULT_WAIT_MAX_PER_USER", RESULT_WAIT_MAX_PER_PROCESS)
# GET /api/v1/images/{id}/events/ (server-sent events): how long one stream waits for a final state,
# and how many streams one web process serves at once (each holds one of its GUNICORN_THREADS; 0
# turns streams off: 429). A stream reads the state when it is notified of a change, never on a timer.
STATUS_STREAM_SECONDS = env_float("STATUS_STREAM_SECONDS", 55.0)
STATUS_STREAM_MAX = env_int("STATUS_STREAM_MAX", max(1, GUNICORN_THREADS // 4))
STATUS_STREAM_MAX_PER_USER = env_int("STATUS_STREAM_MAX_PER_USER", 1)
EXPLAIN_MAX_STEPS = env_int("EXPLAIN_MAX_STEPS", 300)
EXPLAIN_MAX_EVALUATIONS = env_int("EXPLAIN_MAX_EVALUATIONS", 2000)
# Memory one explanation may take for its batched passes (activations and gradients); the batch
# size follows from it, so a large model or input cannot run a worker out of memory.
EXPLAIN_MEMORY_BUDGET_MB = env_int("EXPLAIN_MEMORY_BUDGET_MB", 512)
# An Integrated Gradients task takes its own explanation plus up to EXPLAIN_BATCH_SIZE - 1 other queued
# ones (same model version and parameters) into one Captum call; 1 turns batching off.
EXPLAIN_BATCH_SIZE = env_int("EXPLAIN_BATCH_SIZE", 4)
# ... and at most this many Integrated Gradients steps in all (4 explanations at 50 steps): the batch shares
# one task's time limit.
EXPLAIN_BATCH_MAX_STEPS = env_int("EXPLAIN_BATCH_MAX_STEPS", 200)
# Integrated Gradients' arithmetic: "auto" is bf16 autocast on CUDA (tensor cores; IG maps correlate with
# fp32's at r >= 0.98, see bench/README.md) and fp32 on the CPU; "fp32" or "bf16" force one. The other
# methods always run in fp32.
EXPLAIN_PRECISION = env_str("EXPLAIN_PRECISION", "auto").strip().lower()
if EXPLAIN_PRECISION not in ("auto", "fp32", "bf16"):
    raise ImproperlyConfigured(f"EXPLAIN_PRECISION={EXPLAIN_PRECISION!r}: use auto, fp32 or bf16.")

# --- Monitoring -----------------------------------------------------------------------------------
# The drift window: the last DRIFT_WINDOW_UPLOADS scored uploads when set (> 0), else the last
# DRIFT_WINDOW_DAYS days. Fewer than DRIFT_MIN_UPLOADS uploads: the report says so, no verdict.
DRIFT_WINDOW_DAYS = env_float("DRIFT_WINDOW_DAYS", 7.0)
DRIFT_WINDOW_UPLOADS = env_int("DRIFT_WINDOW_UPLOADS", 0)
DRIFT_MIN_UPLOADS = env_int("DRIFT_MIN_UPLOADS", 50)
DRIFT_MIN_REFERENCE = env_int("DRIFT_MIN_REFERENCE", 100)
# Family-wise false-alarm rate of one report (Holm's correction over the features).
DRIFT_ALPHA = env_float("DRIFT_ALPHA", 0.05)
DRIFT_REPORT_INTERVAL_SECONDS = env_float("DRIFT_REPORT_INTERVAL_SECONDS", 6 * 3600.0)
# The dashboard's "run now": at most one report queued per this many seconds, for the whole deployment.
DRIFT_RUN_COOLDOWN_SECONDS = env_int("DRIFT_RUN_COOLDOWN_SECONDS", 60)
# Alerts: e-mail (ALERT_EMAILS, else every active staff user with an address) and an optional webhook.
ALERT_EMAILS = env_list("ALERT_EMAILS", [])
ALERT_WEBHOOK_URL = env_str("ALERT_WEBHOOK_URL", "")
ALERT_WEBHOOK_TIMEOUT_SECONDS = env_float("ALERT_WEBHOOK_TIMEOUT_SECONDS", 5.0)
ALERT_FAILED_SHARE = env_float("ALERT_FAILED_SHARE", 0.10)
ALERT_LATENCY_P95_SECONDS = env_float("ALERT_LATENCY_P95_SECONDS", 120.0)
ALERT_MIN_UPLOADS = env_int("ALERT_MIN_UPLOADS", 20)
# A condition that returns within this many minutes of its alert closing reopens it silently.
ALERT_COOLDOWN_MINUTES = env_int("ALERT_COOLDOWN_MINUTES", 60)
# The photo-quality gate's alert (issue 20, services.quality_monitoring): over the last
# QUALITY_ALERT_WINDOW_HOURS, a clinic or a camera with at least QUALITY_ALERT_MIN_PHOTOS done photos whose
# share not assessable is above QUALITY_ALERT_RATE and more than QUALITY_ALERT_MARGIN above its baseline (its
# own share in the QUALITY_ALERT_BASELINE_DAYS before; everyone's when it had too few photos then) opens the
# alert; it closes when no clinic or camera is above. Judged with every drift report.
QUALITY_ALERT_WINDOW_HOURS = env_float("QUALITY_ALERT_WINDOW_HOURS", 24.0)
QUALITY_ALERT_BASELINE_DAYS = env_float("QUALITY_ALERT_BASELINE_DAYS", 14.0)
QUALITY_ALERT_MIN_PHOTOS = env_int("QUALITY_ALERT_MIN_PHOTOS", 20)
QUALITY_ALERT_RATE = env_float("QUALITY_ALERT_RATE", 0.15)
QUALITY_ALERT_MARGIN = env_float("QUALITY_ALERT_MARGIN", 0.10)
# The subgroup alert (issue 21, services.subgroup_monitoring): on the active model's confirmed outcomes, a
# skin-tone band, body site, clinic or camera with at least SUBGROUP_ALERT_MIN_POSITIVES confirmed malignant
# cases whose sensitivity is more than SUBGROUP_ALERT_MARGIN below the overall sensitivity opens the alert; it
# closes when none is. Judged with every drift report.
SUBGROUP_ALERT_MARGIN = env_float("SUBGROUP_ALERT_MARGIN", 0.10)
SUBGROUP_ALERT_MIN_POSITIVES = env_int("SUBGROUP_ALERT_MIN_POSITIVES", 20)
# The quality-gate calibration report (the drift dashboard, manage.py quality_report): predictions of the
# last this many days.
QUALITY_CALIBRATION_DAYS = env_float("QUALITY_CALIBRATION_DAYS", 30.0)
DEFAULT_FROM_EMAIL = env_str("DEFAULT_FROM_EMAIL", "lesion-triage@localhost")
# Outgoing mail (alerts): an SMTP relay. dev and test settings replace the backend.
EMAIL_HOST = env_str("EMAIL_HOST", "localhost")
EMAIL_PORT = env_int("EMAIL_PORT", 25)
EMAIL_HOST_USER = env_str("EMAIL_HOST_USER", "")
EMAIL_HOST_PASSWORD = env_str("EMAIL_HOST_PASSWORD", "")
EMAIL_USE_TLS = env_bool("EMAIL_USE_TLS", False)
EMAIL_USE_SSL = env_bool("EMAIL_USE_SSL", False)
EMAIL_TIMEOUT = env_int("EMAIL_TIMEOUT", 10)

# --- Portal -------------------------------------------------------------------------------------
# The lesion timeline flags a rise in malignancy probability of more than this (0.10 = 10
# percentage points) since the lesion's previous image.
RISK_RISE_FLAG = env_float("RISK_RISE_FLAG", 0.10)
PORTAL_PAGE_SIZE = env_int("PORTAL_PAGE_SIZE", 25)

# --- REST API ---------------------------------------------------------------------------------
REST_FRAMEWORK = {
    "DEFAULT_AUTHENTICATION_CLASSES": ["diagnosis.api.authentication.ApiTokenAuthentication"],
    "DEFAULT_PERMISSION_CLASSES": ["diagnosis.api.permissions.IsClinician"],
    "DEFAULT_PAGINATION_CLASS": "diagnosis.api.pagination.NewestFirstPagination",
    "PAGE_SIZE": 50,
    "DEFAULT_SCHEMA_CLASS": "drf_spectacular.openapi.AutoSchema",
    "EXCEPTION_HANDLER": "diagnosis.api.errors.exception_handler",
    "DEFAULT_RENDERER_CLASSES": ["rest_framework.renderers.JSONRenderer"],
    "DEFAULT_PARSER_CLASSES": [
        "rest_framework.parsers.JSONParser",
        "rest_framework.parsers.MultiPartParser",
        "rest_framework.parsers.FormParser",
    ],
    "UNAUTHENTICATED_USER": "django.contrib.auth.models.AnonymousUser",
    "DEFAULT_THROTTLE_CLASSES": ["diagnosis.api.throttling.ApiRateThrottle"],
    "NUM_PROXIES": TRUSTED_PROXY_COUNT,  # anonymous throttling keys on the client, not on X-Forwarded-For
}
# Rate limits ("<n>/<second|minute|hour|day>"; set but empty, or "none", for no limit). Counters live
# in the cache (CACHE_URL: Redis in production, so every web process shares them).


def _rate_limit(name: str, default: str) -> str:
    value = os.environ.get(name)
    if value is None:
        return default
    return "" if value.strip().lower() in ("", "none", "off") else value.strip()


API_RATE_LIMIT = _rate_limit("API_RATE_LIMIT", "1200/minute")
API_UPLOAD_RATE_LIMIT = _rate_limit("API_UPLOAD_RATE_LIMIT", "300/minute")
# Explanations a clinician requests by hand (API and portal alike; services.explanations): new jobs
# per user over time, jobs of theirs waiting or running at once, and requested per photo and model.
# Files the web tier must decode and re-encode itself (WebP, a PNG with an EXIF block, a JPEG it cannot
# strip in place: mlcore.preprocessing.prepare_upload) cost about 20 bytes of memory per pixel, however
# small the file: at most this many pixels, and this many at once per web process (a request waits up to
# WEB_CONVERT_WAIT_SECONDS for a slot, then gets 503 with Retry-After).
WEB_CONVERT_MAX_PIXELS = env_int("WEB_CONVERT_MAX_PIXELS", 16_000_000)
WEB_CONVERT_CONCURRENCY = env_int("WEB_CONVERT_CONCURRENCY", 1)
WEB_CONVERT_WAIT_SECONDS = env_float("WEB_CONVERT_WAIT_SECONDS", 10.0)
EXPLAIN_RATE_LIMIT = _rate_limit("EXPLAIN_RATE_LIMIT", "60/hour")
EXPLAIN_MAX_PENDING_PER_USER = env_int("EXPLAIN_MAX_PENDING_PER_USER", 10)
EXPLAIN_MAX_PER_IMAGE = env_int("EXPLAIN_MAX_PER_IMAGE", 12)
KNOX_TOKEN_MODEL = "diagnosis.ApiToken"
# knox's own migrations create its default AuthToken table even when the model is swapped out;
# that stray table references auth_user and breaks TRUNCATE. Our ApiToken replaces it entirely.
MIGRATION_MODULES = {"knox": None}
REST_KNOX = {
    "TOKEN_TTL": timedelta(days=API_TOKEN_TTL_DAYS) if API_TOKEN_TTL_DAYS > 0 else None,
    "TOKEN_PREFIX": "mlt_",
    "AUTH_HEADER_PREFIX": "Token",
}
SPECTACULAR_SETTINGS = {
    "TITLE": "Melanoma lesion triage API",
    "DESCRIPTION": (
        "Upload photos of skin lesions and receive a malignancy risk from a ResNet classifier. "
        "Results are decision support, not a diagnosis. Authenticate with `Authorization: Token <token>`; "
        "every object is scoped to your clinic, and objects of other clinics answer 404."
    ),
    "VERSION": "1.0.0",
    "SERVE_INCLUDE_SCHEMA": False,
    "COMPONENT_SPLIT_REQUEST": True,
    "SERVE_PERMISSIONS": ["rest_framework.permissions.AllowAny"],
    "SERVE_AUTHENTICATION": [],
    "SWAGGER_UI_DIST": "SIDECAR",
    "SWAGGER_UI_FAVICON_HREF": "SIDECAR",
    "REDOC_DIST": "SIDECAR",
    "ENUM_NAME_OVERRIDES": {"ImageStateEnum": "diagnosis.models.ImageState"},
}

# --- Celery -----------------------------------------------------------------------------------
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_TRANSPORT_OPTIONS: dict = {}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_TASK_IGNORE_RESULT = True  # state lives in the database, not in a result backend
CELERY_TASK_ACKS_LATE = True
CELERY_TASK_REJECT_ON_WORKER_LOST = True
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
# A prefork child that warms up the model (weights from the bucket, a first batch) must not be taken for
# a hung one: Celery's default gives it 4 s.
CELERY_WORKER_PROC_ALIVE_TIMEOUT = env_int("CELERY_WORKER_PROC_ALIVE_TIMEOUT", 120)
# Worker transactions on PostgreSQL wait for the disk only when true (webapp/celery.py explains why not).
WORKER_SYNCHRONOUS_COMMIT = env_bool("WORKER_SYNCHRONOUS_COMMIT", False)
# Workers keep their database connection from one task to the next. Celery's Django fixup would close it
# before and after every task, and each task would then pay for a new PostgreSQL backend (about 7 ms
# with its cold catalogue caches). Instead webapp.celery closes a connection before and after a task
# only when it is broken or older than DB_CONN_MAX_AGE, as Django does around a request.
CELERY_DB_REUSE_MAX = 1 << 40
CELERY_TASK_SOFT_TIME_LIMIT = env_int("CELERY_TASK_SOFT_TIME_LIMIT", 120)
CELERY_TASK_TIME_LIMIT = env_int("CELERY_TASK_TIME_LIMIT", 180)
# A prefork child's memory (webapp/worker_memory.py). Celery's own cap is off: it is one absolute number
# for every child, and a warmed CUDA child (1.65-2.0 GB on the H200) sat above its 2,000,000 KiB default,
# so each child was replaced after every task. Instead a child is replaced after a task once its resident
# memory exceeds what it held after its warm-up by WORKER_MAX_MEMORY_GROWTH_MB; empty: by role, about the
# size of a warmed child of that role (CPU children hold 0.93-1.09 GB, CUDA children 1.65-2.0 GB).
# 0: never for growth. WORKER_MAX_MEMORY_MB, if set, is an absolute ceiling as well (0: none); a child
# already above it after its warm-up says so once and keeps only the growth cap. The former
# CELERY_WORKER_MAX_MEMORY_PER_CHILD (KiB) still sets that ceiling.
CELERY_WORKER_MAX_MEMORY_PER_CHILD = None
WORKER_MAX_MEMORY_GROWTH_MB = env_int("WORKER_MAX_MEMORY_GROWTH_MB", None)  # None: by role
WORKER_MAX_MEMORY_GROWTH_MB_BY_ROLE = {"cpu": 1024, "gpu": 2048}
WORKER_MAX_MEMORY_MB = env_int("WORKER_MAX_MEMORY_MB", env_int("CELERY_WORKER_MAX_MEMORY_PER_CHILD", 0) // 1024)
CELERY_TASK_DEFAULT_QUEUE = "default"
CELERY_TASK_ROUTES = {
    "diagnosis.tasks.predict_image_task": {"queue": "inference"},
    "diagnosis.tasks.explain_image_task": {"queue": "explain"},
}
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
# Publishing must not hang a web request when the broker is down: the sweeper re-enqueues later.
CELERY_TASK_PUBLISH_RETRY_POLICY = {"max_retries": 2, "interval_start": 0, "interval_step": 0.5}
CELERY_BEAT_SCHEDULE = {
    "requeue-stale-images": {
        "task": "diagnosis.tasks.requeue_stale_images_task",
        "schedule": env_float("REQUEUE_INTERVAL_SECONDS", 60.0),
    },
    "drift-report": {
        "task": "diagnosis.tasks.drift_report_task",
        "schedule": DRIFT_REPORT_INTERVAL_SECONDS,
    },
    "purge-expired-images": {"task": "diagnosis.tasks.purge_expired_images_task", "schedule": 24 * 3600.0},
    "delete-expired-tokens": {"task": "diagnosis.tasks.delete_expired_tokens_task", "schedule": 24 * 3600.0},
}
CELERY_BEAT_SCHEDULE_FILENAME = str(VAR_DIR / "celerybeat-schedule")

# --- Logs and metrics (docs/observability.md) -------------------------------------------------------
# "json" (production): one JSON object per line with time, level, logger, message, request_id, image_id,
# task_id and task_name. "plain": readable text (the default in dev and tests; Celery keeps its own format).
LOG_FORMAT = env_str("LOG_FORMAT", "plain").strip().lower()
if LOG_FORMAT not in ("plain", "json"):
    raise ImproperlyConfigured(f"LOG_FORMAT={LOG_FORMAT!r}: use plain or json.")
LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "filters": {
        "context": {"()": "webapp.structured_logging.ContextFilter"},
        # Defence in depth: "Token mlt_...", "Bearer ..." and the like never reach a log.
        "redact": {"()": "webapp.structured_logging.RedactSecretsFilter"},
    },
    "formatters": {
        "plain": {"format": "%(asctime)s %(levelname)s %(name)s %(message)s"},
        "json": {"()": "webapp.structured_logging.JsonFormatter"},
    },
    "handlers": {
        "console": {"class": "logging.StreamHandler", "formatter": LOG_FORMAT, "filters": ["context", "redact"]}
    },
    "root": {"handlers": ["console"], "level": env_str("LOG_LEVEL", "INFO")},
    "loggers": {"django.db.backends": {"level": "WARNING"}},
}
# GET /metrics (web tier): with a token, only "Authorization: Bearer <METRICS_TOKEN>"; without, only local
# clients not relayed by a proxy.
METRICS_TOKEN = env_str("METRICS_TOKEN", "")
# Workers serve their metrics on this port (0: off), from the main process, summed over the pool's children.
WORKER_METRICS_PORT = env_int("WORKER_METRICS_PORT", 0)
WORKER_METRICS_ADDR = env_str("WORKER_METRICS_ADDR", "0.0.0.0")

# Security headers that apply everywhere; prod.py adds the HTTPS-only ones.
SECURE_CONTENT_TYPE_NOSNIFF = True
X_FRAME_OPTIONS = "DENY"
SECURE_REFERRER_POLICY = "same-origin"
SESSION_COOKIE_HTTPONLY = True
