"""The errors the worker services tell apart: temporary ones give a claim back for a bounded retry,
the others are a photo's or an explanation's own fault."""

from __future__ import annotations

from django.db import InterfaceError, OperationalError

# The database briefly unreachable: never a photo's fault.
DATABASE_ERRORS: tuple[type[Exception], ...] = (OperationalError, InterfaceError)


class TransientError(Exception):
    """Raised for failures worth retrying (database or storage briefly unavailable)."""


class ModelUnavailable(Exception):
    """The active model cannot be loaded: an operations problem, never the image's fault."""


def bucket_errors() -> tuple[type[Exception], ...]:
    """With STORAGE_BACKEND=s3, the bucket unreachable, slow or refusing: never the image's fault (a
    missing object is a FileNotFoundError). Empty where botocore is not installed."""
    try:
        # botocore is an optional dependency: only deployments on S3 install it.
        from botocore.exceptions import BotoCoreError, ClientError
    except ImportError:
        return ()
    return (BotoCoreError, ClientError)


def storage_errors() -> tuple[type[Exception], ...]:
    """Reading or writing a stored file failed for a reason outside the file (disk, network, bucket)."""
    return (OSError, *bucket_errors())
