"""Log formatting: one JSON object per line (LOG_FORMAT=json), and a filter that redacts secrets.

No Django imports: gunicorn's config and Celery's signals use these before Django is set up.
"""

from __future__ import annotations

import json
import logging
import re
from datetime import UTC, datetime

from webapp import request_id as log_context

CONTEXT_FIELDS = ("request_id", "image_id", "task_id", "task_name")
# A LogRecord's own attributes; anything else on a record came from `extra=`.
_RECORD_ATTRIBUTES = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}

# Defence in depth: nothing should log a credential, but if something does, it leaves the process redacted.
_SECRETS = [
    # Authorization header values: "Token mlt_...", "Bearer ...", "Basic ...".
    (re.compile(r"\b(Token|Bearer|Basic)(\s+)[A-Za-z0-9._~+/=-]{8,}"), r"\1\2[redacted]"),
    # The API's tokens (and their 15-character keys) wherever they appear, e.g. in a URL.
    (re.compile(r"\bmlt_[A-Za-z0-9]+"), "mlt_[redacted]"),
    # Credentials in query strings or key=value text.
    (re.compile(r"(?i)\b(token|access_token|api_key|apikey|password|secret)=[^&\s'\"]+"), r"\1=[redacted]"),
    # PostgreSQL repeats the offending values in constraint errors ("Key (reference)=(PT-0042) already exists").
    (re.compile(r"(\bKey \([^)]*\)=\()[^)]*(\))"), r"\1[redacted]\2"),
]


def redact(text: str) -> str:
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)
    return text


class ContextFilter(logging.Filter):
    """Stamps the record with the request id, image id and task of the current context."""

    def filter(self, record: logging.LogRecord) -> bool:
        for field, value in log_context.current().items():
            if getattr(record, field, None) is None:
                setattr(record, field, value)
        return True


class RedactSecretsFilter(logging.Filter):
    """Rewrites the message and the traceback text of a record with secrets redacted (for every handler
    it is attached to, whatever the format)."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string: let the formatter report it
            return True
        redacted = redact(message)
        if redacted != message:
            record.msg, record.args = redacted, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC, ISO 8601), level, logger, message, process, the context's
    request_id / image_id / task_id / task_name when known, simple `extra=` fields, and the exception."""

    def format(self, record: logging.LogRecord) -> str:
        created = datetime.fromtimestamp(record.created, tz=UTC).isoformat(timespec="milliseconds")
        entry: dict[str, object] = {
            "time": created.replace("+00:00", "Z"),
            "level": record.levelname,
            "logger": record.name,
            "message": redact(record.getMessage()),
            "process": record.process,
        }
        context = log_context.current()
        for field in CONTEXT_FIELDS:
            value = getattr(record, field, None) or context.get(field)
            if value:
                entry[field] = str(value)
        for key, value in vars(record).items():
            if key in _RECORD_ATTRIBUTES or key in entry or key.startswith("_"):
                continue
            if isinstance(value, bool | int | float):
                entry[key] = value
            elif isinstance(value, str):
                entry[key] = redact(value)
        if record.exc_info:
            entry["exception"] = redact(record.exc_text or self.formatException(record.exc_info))
        elif record.exc_text:
            entry["exception"] = redact(record.exc_text)
        if record.stack_info:
            entry["stack"] = redact(self.formatStack(record.stack_info))
        return json.dumps(entry, default=str)
