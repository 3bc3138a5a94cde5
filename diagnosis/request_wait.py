"""What a request asks of a wait for its result, and whether its client is still there.

`?wait=N` (the API and the portal) or the header `Prefer: wait=N` (RFC 7240, the API): how many seconds
the request may wait for the result before it is answered, from 0 to RESULT_WAIT_MAX_SECONDS. A value
that is not a whole number of seconds is a 400, whichever carries it. Over the maximum, the parameter is
a 400 and the header is lowered to the maximum (a preference is a hint, RFC 7240 section 4.3); the
answer then says what was applied in `Preference-Applied: wait=N`. With both, the parameter counts.
"""

from __future__ import annotations

import re
import socket
from dataclasses import dataclass

from django.conf import settings

_PREFERENCE = re.compile(r'^\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*(?:=\s*("(?:[^"\\]|\\.)*"|[^;,\s]*))?')


class InvalidWait(ValueError):
    """The wait asked for is not a whole number of seconds in range; the message says so."""

    def __init__(self, message: str, *, source: str) -> None:
        super().__init__(message)
        self.source = source  # "wait" (the parameter) or "Prefer" (the header)


@dataclass(frozen=True)
class WaitOption:
    seconds: int = 0  # 0: answer at once
    from_header: bool = False  # asked with Prefer: answer with Preference-Applied


def _seconds(text: str, *, source: str) -> int:
    text = text.strip().strip('"')
    if not re.fullmatch(r"\d{1,6}", text):
        raise InvalidWait(f"wait must be a whole number of seconds from 0 to {settings.RESULT_WAIT_MAX_SECONDS}, "
                          f"not {text[:40]!r}.", source=source)  # fmt: skip
    return int(text)


def prefer_wait(header: str) -> str | None:
    """The value of the `wait` preference in a Prefer header (the first one), or None."""
    for preference in header.split(","):
        match = _PREFERENCE.match(preference)
        if match and match.group(1).lower() == "wait":
            return match.group(2) or ""
    return None


def wait_option(query: dict, headers: dict, *, header_allowed: bool = True) -> WaitOption:
    """The wait a request asks for: from its query parameters and headers. Raises InvalidWait."""
    maximum = max(0, int(settings.RESULT_WAIT_MAX_SECONDS))
    if "wait" in query:
        seconds = _seconds(query.get("wait") or "", source="wait")
        if seconds > maximum:
            raise InvalidWait(f"wait may be at most {maximum} seconds on this server.", source="wait")
        return WaitOption(seconds)
    value = prefer_wait(headers.get("Prefer", "")) if header_allowed else None
    if value is None:
        return WaitOption()
    return WaitOption(min(_seconds(value, source="Prefer"), maximum), from_header=True)


def hung_up_check(meta: dict):
    """A function that tells whether the request's client has closed its connection, or None where the
    server does not show its socket (gunicorn does, as `gunicorn.socket`; runserver does not)."""
    sock = meta.get("gunicorn.socket")
    if not isinstance(sock, socket.socket):
        return None

    def hung_up() -> bool:
        try:
            return sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
        except (BlockingIOError, InterruptedError):
            return False  # nothing to read: still connected
        except ValueError:  # a TLS socket takes no flags: cannot tell
            return False
        except OSError:  # reset by the peer, or closed
            return True

    return hung_up
