"""Coalesced wake-ups for the inference queue: at most INFERENCE_COALESCE_MESSAGES prediction
messages are waiting for a worker at any time, however fast photos arrive.

Every inference task gathers the queued images into its batch (process_images), so under load most
per-upload messages used to find their image already finished: a no-op that still cost a worker
about 2.7 CPU-ms (receive, dispatch to a child, claim, acknowledge), as much as a fifth of a small
model's forward pass. Instead:

- an upload rings (`ring`): a counter in the broker's Redis goes up, and a message is published only
  while the counter is at most INFERENCE_COALESCE_MESSAGES;
- an inference task answers (`answer`) before it gathers: the counter goes down, so a photo committed
  before a refused ring is always seen by the gather of one of the messages it counted on;
- a task that leaves never-attempted photos queued (its batch was full, or it could not gather) rings
  again for the oldest one (`ring_for_waiting`).

The counter expires INFERENCE_COALESCE_SECONDS after it was created, so a message lost with its count
(a purged queue, say) blocks wake-ups for at most that long; a photo refused meanwhile is gathered by
the next task that runs, or published again by the sweeper (requeue_stale_images, after
REQUEUE_AFTER_SECONDS), which stays the last resort. Workers that never answer (an older release
during a rolling upgrade) therefore slow uploads to INFERENCE_COALESCE_MESSAGES per period until
they are replaced: upgrade the workers first. Only with a Redis broker: with another broker (the
embedded default's filesystem broker) or INFERENCE_COALESCE_MESSAGES=0, every upload publishes.
"""

from __future__ import annotations

import logging

import redis
from django.conf import settings
from redis.backoff import NoBackoff
from redis.retry import Retry

from ..models import ImageState, LesionImage
from . import dispatch

logger = logging.getLogger(__name__)

KEY = "melanoma:inference:waiting-messages"

_RING = """
local n = redis.call('INCR', KEYS[1])
if n == 1 then redis.call('EXPIRE', KEYS[1], ARGV[2]) end
if n > tonumber(ARGV[1]) then redis.call('DECR', KEYS[1]) return 0 end
return 1
"""
_ANSWER = """
local n = redis.call('DECR', KEYS[1])
if n <= 0 then redis.call('DEL', KEYS[1]) end
return n
"""

_client = None  # (broker url, redis client, ring script, answer script)


def _scripts():
    """The broker's Redis and the two scripts, or None when coalescing is off."""
    global _client
    url = settings.CELERY_BROKER_URL or ""
    if settings.INFERENCE_COALESCE_MESSAGES <= 0 or not url.startswith(("redis://", "rediss://")):
        return None
    if _client is None or _client[0] != url:
        # Short timeouts and no retries: ring() runs in a web request, which must not wait long for a
        # counter it can do without (a failed ring publishes anyway).
        connection = redis.Redis.from_url(url, socket_timeout=0.5, socket_connect_timeout=0.5,
                                          retry=Retry(NoBackoff(), 0))  # fmt: skip
        _client = (url, connection, connection.register_script(_RING), connection.register_script(_ANSWER))
    return _client


def enabled() -> bool:
    return _scripts() is not None


def ring() -> bool:
    """True when the caller should publish a message (coalescing off, a free slot, or Redis unreachable:
    publishing then fails or succeeds on its own). False when enough messages are already waiting."""
    try:
        scripts = _scripts()
        if scripts is None:
            return True
        return bool(scripts[2](keys=[KEY], args=[settings.INFERENCE_COALESCE_MESSAGES,
                                                  max(1, int(settings.INFERENCE_COALESCE_SECONDS))]))  # fmt: skip
    except Exception as exc:
        logger.warning("wake-up counter unavailable (%s); publishing", exc)
        return True


def unring() -> None:
    """A rung message could not be published: give its slot back."""
    answer()


def answer() -> None:
    """An inference task took a message: one fewer is waiting."""
    try:
        scripts = _scripts()
        if scripts is None:
            return
        scripts[3](keys=[KEY], args=[])
    except Exception as exc:  # the counter expires on its own
        logger.warning("wake-up counter unavailable (%s)", exc)


def reset() -> None:
    """Forget every counted message (after purging the inference queue)."""
    scripts = _scripts()
    if scripts is not None:
        scripts[1].delete(KEY)


def ring_for_waiting(*, queued_before) -> None:
    """After a task: if never-attempted photos queued before it started are still waiting, make sure a
    message will gather them."""
    if not enabled():
        return
    try:
        oldest = (LesionImage.objects.filter(state=ImageState.QUEUED, attempts=0, enqueued_at__lt=queued_before)
                  .order_by("enqueued_at").values_list("pk", flat=True).first())  # fmt: skip
        if oldest is not None and ring():
            try:
                enqueue_prediction(str(oldest))
            except Exception:
                unring()
                raise
    except Exception as exc:  # the sweeper publishes them later
        logger.warning("could not wake a worker for the photos still queued: %s", exc)


def enqueue_prediction(image_id: str, *, file: str = "") -> None:
    """Publish one message for this image (the sweeper, a rung upload, a task for the photos it left).
    `file`, the stored photo's name, travels as a message header that lets an idle worker start decoding
    it before it has claimed the image (decoding.decode_ahead): a hint, used only if the claimed image
    has that very file."""
    headers = {dispatch.UPLOAD_FILE_HEADER: file} if file else None
    dispatch.send(dispatch.PREDICT, args=[image_id], headers=headers)
