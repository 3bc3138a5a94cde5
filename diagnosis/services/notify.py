"""Notifications that uploads changed state, from the process that changed them (a worker, mostly) to
the web processes whose requests wait for them (services.waiting: `?wait=N`, the event stream, the
portal's status). A waiting request never reads the database on a timer: it reads when it is told.

One message names the images and what happened to them: `{"s": state, "ids": [...]}`, where the state
is an image's new state (`processing`, `queued`, `done`, `failed`) or `explained` (one of its
explanations finished). Publishing never fails its caller: a lost message makes a waiter answer at its
deadline, as if nothing had happened, after one last read.

Three transports, chosen by RESULT_NOTIFY (`auto` picks the first that applies):

- `redis`: a pub/sub channel on the broker's Redis (or RESULT_NOTIFY_REDIS_URL);
- `postgres`: `pg_notify` on Django's connection, `LISTEN` on one connection of each listening process;
- `local`: for the embedded default (SQLite, filesystem broker), where every process runs on one
  machine: each listening process binds a Unix datagram socket in a folder under VAR_DIR, and a
  publisher sends the message to every socket there (removing those whose process has gone).

Each web process runs one listener thread, started with its first waiter. Every time the listener
(re)connects it wakes every waiter once, so a message missed while it was away costs one read, not a
result.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import psycopg
import redis
from django.conf import settings
from django.db import connection, connections, transaction
from redis.backoff import NoBackoff
from redis.retry import Retry

logger = logging.getLogger(__name__)

CHANNEL = "melanoma_results"  # the Redis channel and the PostgreSQL NOTIFY channel
FINAL = frozenset({"done", "failed"})
EXPLAINED = "explained"  # one of the image's explanations finished (done or failed)
_CHUNK = 100  # ids per message: PostgreSQL's NOTIFY payload must stay under 8,000 bytes
_RECONNECT_SECONDS = (0.2, 0.5, 1.0, 2.0, 5.0)
_STOP_CHECK_SECONDS = 1.0  # how soon a listener notices stop_listeners()


def transport_name() -> str:
    """The transport RESULT_NOTIFY names, with `auto` resolved: redis, postgres, local or off."""
    choice = (settings.RESULT_NOTIFY or "auto").strip().lower()
    if choice != "auto":
        return choice
    if _redis_url():
        return "redis"
    if connection.vendor == "postgresql":
        return "postgres"
    return "local"


def _redis_url() -> str:
    if settings.RESULT_NOTIFY_REDIS_URL:
        return settings.RESULT_NOTIFY_REDIS_URL
    broker = settings.CELERY_BROKER_URL or ""
    return broker if broker.startswith(("redis://", "rediss://")) else ""


# --- publishing ------------------------------------------------------------------------------------------


def changed(image_ids: Iterable, state: str) -> None:
    """Tell the waiters that these images changed (`state`: their new state, or `explained`), once the
    current transaction commits (at once outside one). Never raises."""
    ids = [str(image_id) for image_id in image_ids]
    if ids:
        transaction.on_commit(lambda: publish(ids, state), robust=True)


def publish(ids: list[str], state: str) -> None:
    transport = _transport()
    if transport is None:
        return
    for start in range(0, len(ids), _CHUNK):
        payload = json.dumps({"s": state, "ids": ids[start : start + _CHUNK]}, separators=(",", ":"))
        try:
            transport.publish(payload)
        except Exception as exc:  # the waiters answer at their deadline instead
            logger.warning("could not notify waiters (%s): %s", transport.name, exc)


# --- the transports -----------------------------------------------------------------------------------------


class RedisTransport:
    name = "redis"

    def __init__(self, url: str) -> None:
        self.url = url
        self._client = None

    def _connection(self):
        if self._client is None:  # short timeouts: publishing runs in a worker's hot path
            self._client = redis.Redis.from_url(self.url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                                retry=Retry(NoBackoff(), 1))  # fmt: skip
        return self._client

    def publish(self, payload: str) -> None:
        self._connection().publish(CHANNEL, payload)

    def listen(self, connected, deliver, stop: threading.Event) -> None:
        """Returns when `stop` is set; raises when the connection is lost."""
        client = redis.Redis.from_url(self.url, socket_connect_timeout=2, socket_keepalive=True,
                                      health_check_interval=15)  # fmt: skip
        pubsub = client.pubsub()
        try:
            pubsub.subscribe(CHANNEL)
            while not stop.is_set():
                message = pubsub.get_message(timeout=_STOP_CHECK_SECONDS)
                if message is None:
                    continue
                if message["type"] == "subscribe":
                    connected()
                elif message["type"] == "message":
                    deliver(message["data"])
        finally:
            pubsub.close()
            client.close()


class PostgresTransport:
    name = "postgres"

    def publish(self, payload: str) -> None:
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_notify(%s, %s)", [CHANNEL, payload])

    def listen(self, connected, deliver, stop: threading.Event) -> None:
        params = connections["default"].get_connection_params()
        params.pop("cursor_factory", None)
        params.pop("context", None)
        with psycopg.connect(**params, autocommit=True) as listener:
            listener.execute(f"LISTEN {CHANNEL}")
            connected()
            checked = time.monotonic()
            while not stop.is_set():
                for note in listener.notifies(timeout=_STOP_CHECK_SECONDS):
                    deliver(note.payload)
                if time.monotonic() - checked > 15:
                    listener.execute("SELECT 1")  # a dead connection raises here, and is made again
                    checked = time.monotonic()


class LocalTransport:
    """Unix datagram sockets in one folder: every process of the embedded default runs on one machine."""

    name = "local"

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.sender = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sender.setblocking(False)

    def publish(self, payload: str) -> None:
        data = payload.encode()
        for path in self.folder.glob("*.sock"):
            try:
                self.sender.sendto(data, str(path))
            except (ConnectionRefusedError, FileNotFoundError):  # its process has gone
                path.unlink(missing_ok=True)
            except BlockingIOError:  # that listener is far behind: it re-reads at its deadline
                logger.warning("notification dropped for %s: its queue is full", path.name)

    def listen(self, connected, deliver, stop: threading.Event) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.folder / f"{os.getpid()}-{uuid.uuid4().hex[:8]}.sock"
        receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            receiver.bind(str(path))
            receiver.settimeout(_STOP_CHECK_SECONDS)
            connected()
            while not stop.is_set():
                try:
                    deliver(receiver.recv(65536))
                except TimeoutError:
                    continue
        finally:
            receiver.close()
            path.unlink(missing_ok=True)


def local_folder() -> Path:
    """VAR_DIR/notify, or a short folder under /tmp named after it when that path is too long for a Unix
    socket's address (about 100 bytes)."""
    folder = Path(settings.VAR_DIR) / "notify"
    if len(str(folder)) + 24 < 100:
        return folder
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:16]
    return Path("/tmp") / f"melanoma-notify-{digest}"


_transports: dict[tuple, object] = {}


def _transport():
    """This process's transport for the current settings, or None when notifications are off."""
    name = transport_name()
    key = (name, _redis_url() if name == "redis" else str(local_folder()) if name == "local" else "", os.getpid())
    if key not in _transports:
        if name == "redis":
            _transports[key] = RedisTransport(key[1])
        elif name == "postgres":
            _transports[key] = PostgresTransport()
        elif name == "local":
            _transports[key] = LocalTransport(Path(key[1]))
        else:
            _transports[key] = None
    return _transports[key]


# --- waiting ---------------------------------------------------------------------------------------------


class Watch:
    """What one waiting request listens for: some images, and whether only final states matter."""

    def __init__(self, ids: Iterable, final_only: bool) -> None:
        self.ids = frozenset(str(image_id) for image_id in ids)
        self.final_only = final_only
        self.event = threading.Event()

    def wait(self, timeout: float) -> bool:
        """True when told of a change (or of a reconnection) within `timeout` seconds."""
        told = self.event.wait(max(0.0, timeout))
        self.event.clear()
        return told


_watches: dict[str, set[Watch]] = {}
_lock = threading.Lock()
_delivered = [0]
_listener: dict = {}  # (pid, transport) -> the state of this process's listener thread


@contextmanager
def watching(ids: Iterable, *, final_only: bool = True) -> Iterator[Watch]:
    """Be told while inside the block when any of these images changes (reaches a final state, with
    `final_only`). Read the state after entering: a change from then on wakes the watch."""
    watch = Watch(ids, final_only)
    _ensure_listener()
    with _lock:
        for image_id in watch.ids:
            _watches.setdefault(image_id, set()).add(watch)
    try:
        yield watch
    finally:
        with _lock:
            for image_id in watch.ids:
                waiting = _watches.get(image_id)
                if waiting is not None:
                    waiting.discard(watch)
                    if not waiting:
                        del _watches[image_id]


def deliver(payload) -> int:
    """Wake the watches a message concerns; returns how many were woken."""
    try:
        message = json.loads(payload)
        state, ids = message["s"], message["ids"]
    except (ValueError, KeyError, TypeError):
        logger.warning("ignored a malformed notification: %r", payload[:200])
        return 0
    woken = set()
    with _lock:
        _delivered[0] += 1
        for image_id in ids:
            for watch in _watches.get(image_id, ()):
                if state in FINAL or not watch.final_only:
                    woken.add(watch)
    for watch in woken:
        watch.event.set()
    return len(woken)


def delivered() -> int:
    """Messages this process's listeners have delivered so far."""
    return _delivered[0]


def wake_all() -> None:
    with _lock:
        watches = {watch for waiting in _watches.values() for watch in waiting}
    for watch in watches:
        watch.event.set()


def listening() -> bool:
    """Whether this process's listener for the current transport is connected now."""
    listener = _listener.get(_listener_key())
    return bool(listener and listener["connected"].is_set())


def _listener_key() -> tuple:
    return (os.getpid(), transport_name(), _redis_url(), str(local_folder()))


def _ensure_listener() -> None:
    key = _listener_key()
    if key in _listener:
        return
    with _lock:
        if key in _listener:
            return
        transport = _transport()
        state = {"connected": threading.Event(), "transport": transport, "stop": threading.Event()}
        for other in [other for other in _listener if other[0] != key[0]]:
            del _listener[other]  # a forked child does not inherit its parent's thread
        _listener[key] = state
    if transport is not None:
        state["thread"] = threading.Thread(target=_listen_forever, args=(transport, state),
                                           name="result-notifications", daemon=True)  # fmt: skip
        state["thread"].start()


def stop_listeners(timeout: float = 5.0) -> None:
    """Stop this process's listener threads and close their connections (a test session's end, before its
    database is dropped); the next waiter starts one again."""
    with _lock:
        states = list(_listener.values())
        _listener.clear()
    for state in states:
        state["stop"].set()
    for state in states:
        if "thread" in state:
            state["thread"].join(timeout)


def _listen_forever(transport, state) -> None:
    attempt = 0

    def connected() -> None:
        nonlocal attempt
        attempt = 0
        state["connected"].set()
        wake_all()  # whatever was published while no one listened: every waiter reads once

    while not state["stop"].is_set():
        try:
            transport.listen(connected, deliver, state["stop"])
        except Exception as exc:
            logger.warning("result notifications (%s) interrupted: %s", transport.name, exc)
        finally:
            state["connected"].clear()
        state["stop"].wait(_RECONNECT_SECONDS[min(attempt, len(_RECONNECT_SECONDS) - 1)])
        attempt += 1
