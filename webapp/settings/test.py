"""Test settings: the real PostgreSQL and Redis of this machine, local files in a temporary folder."""

from __future__ import annotations

import tempfile

from .base import *  # noqa: F403
from .base import database_from_env, default_storage_from_env
from .env import env_str

DEBUG = False
SECRET_KEY = env_str("SECRET_KEY", "test-only-key")
DATABASES = {"default": database_from_env("postgres://postgres@127.0.0.1:5432/melanoma")}
DATABASES["default"]["CONN_MAX_AGE"] = 0
CELERY_BROKER_URL = env_str("CELERY_BROKER_URL", "redis://127.0.0.1:6379/14")
# A test that purges the inference queue loses the messages counted for coalesced wake-ups: the count
# lasts 5 s here instead of 20 (tests also reset it when they purge).
INFERENCE_COALESCE_SECONDS = 5.0
# Each process gets its own media folder unless one is given; the test suite passes its folder
# on to the worker processes it starts.
MEDIA_ROOT = env_str("MEDIA_ROOT", tempfile.mkdtemp(prefix="melanoma-test-media-"))
MODEL_CACHE_DIR = env_str("MODEL_CACHE_DIR", tempfile.mkdtemp(prefix="melanoma-test-models-"))
# STORAGE_BACKEND=s3 (tests/test_storage_s3.py starts its workers so) uses the bucket from the environment.
STORAGES = {
    "default": default_storage_from_env(STORAGE_BACKEND, MEDIA_ROOT),  # noqa: F405
    "staticfiles": {"BACKEND": "django.contrib.staticfiles.storage.StaticFilesStorage"},
}
STATIC_ROOT = tempfile.mkdtemp(prefix="melanoma-test-static-")
# Django's live test server wraps the site in a media handler built from MEDIA_URL, which fails on
# None. An address on another host is one that handler never serves: media stays unreachable
# except through the authenticated views, in tests as everywhere.
MEDIA_URL = "http://media.invalid/"
PASSWORD_HASHERS = ["django.contrib.auth.hashers.MD5PasswordHasher"]
EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
# No rate limits unless a test sets them (the throttling tests do).
API_RATE_LIMIT = ""
API_UPLOAD_RATE_LIMIT = ""
# A status stream of a photo nobody processes ends after this long (the schema fuzz opens some).
STATUS_STREAM_SECONDS = 1.0
