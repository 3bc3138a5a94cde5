"""One batch engine for the two kinds of claimed work: predictions (the `inference` queue) and
explanations (the `explain` queue). A kind supplies only what differs (a Work); the engine does the
rest, once:

    claim (one statement) -> read and decode -> run on the device -> record; or fail, or give back.

**Pipelined.** A task that may take more work (its own item was fresh, and the kind gathers) keeps
going while a full batch of compatible work is queued, up to PIPELINE_BATCHES batches (by default 8 on
a GPU, 1 on the CPU) and half the task's soft time limit. While one batch runs on the device
(runtime.device_thread), this thread records the batch before it and claims the next one, whose
photos the decode threads read meanwhile; the next batch is handed to the device thread before the
one running is recorded, so the device waits for neither the database nor the disk while work is
queued. A lone item goes straight through: claimed, decoded in this thread, run and recorded, with no
wait for a batch to fill.

**Every claim is the worker's own.** Records are conditional on the claim (a claim taken over writes
nothing). A database error anywhere gives back every claim of this call that has no outcome yet and
becomes a TransientError, for the task's bounded retry; a storage error gives that item back (and
defers a TransientError when it is one of the task's own items). One item's fault fails only it: a
batch the device refuses is run again item by item. A worker killed mid-pipeline leaves its claims in
`processing`; the sweeper returns them after CLAIM_TIMEOUT_SECONDS, and an item on a later attempt
always goes alone.

**The model a batch started with.** Work.open() chooses the runner (the model) when the batch is
claimed, and the batch keeps it to the end: a model promoted meanwhile is used from the next batch on.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field

from celery.exceptions import SoftTimeLimitExceeded
from django.conf import settings

from .errors import DATABASE_ERRORS, TransientError
from .runtime import device_thread

logger = logging.getLogger(__name__)


@dataclass
class Batch:
    """Items claimed together and the runner (model) chosen for them when they were claimed."""

    items: list
    runner: object = None
    extra: dict = field(default_factory=dict)  # what a kind keeps per batch (its model version, say)
    jobs: list[Future] = field(default_factory=list)


@dataclass
class Launched:
    """A batch on the device: its ready (item, prepared) pairs and the future of its outputs."""

    batch: Batch
    ready: list
    outputs: Future


class Work:
    """What one kind of work supplies to the Engine. `item_id(item)` is the claimed row's id as a string."""

    label = "item"
    # Why an item on its attempt past MAX_PROCESSING_ATTEMPTS fails; {attempts}: how often it was started.
    exhausted = "Processing was started {attempts} times and never finished (the worker stopped each time)."
    too_long = "The work took too long and was stopped."

    def claim(self, ids: list[str], worker_id: str) -> list:
        """The task's own items: those still claimable (queued, or a stale or redelivered claim)."""
        raise NotImplementedError

    def gather(self, first, *, exclude: list[str], limit: int, worker_id: str, full: bool = False) -> list:
        """Claim up to `limit` other queued, never-attempted items that can share `first`'s batch, in one
        statement, oldest first; with `full`, only when `limit` of them are waiting (else none)."""
        return []

    def batch_size(self, first) -> int:
        return 1

    def open(self, engine: Engine, batch: Batch):
        """The runner for the batch, or None when it cannot run (the kind has failed or given back its
        items through the engine). May raise TransientError or another exception for the task."""
        raise NotImplementedError

    def prepare(self, engine: Engine, batch: Batch) -> list[Future]:
        """One future per item: what the device needs (or the exception reading or decoding raised)."""
        raise NotImplementedError

    def read_fault(self, exc: Exception) -> str | None:
        """The reason when `exc` (from prepare's future) is the item's own fault; None when it is not
        (storage unavailable: given back). Anything else fails the item as an internal error."""
        return None

    def run(self, runner, group: list) -> list:
        """The outputs of one group of (item, prepared) on the device. Runs on the device thread."""
        raise NotImplementedError

    def run_failed(self, exc: Exception) -> str:
        return f"The {self.label} could not be processed (internal error: {type(exc).__name__})."

    def record(self, engine: Engine, batch: Batch, group: list, outputs: list) -> None:
        """Store a group's outputs and set engine.outcomes for each of its items."""
        raise NotImplementedError

    def fail(self, item_id: str, reason: str, worker_id: str) -> None:
        raise NotImplementedError

    def release(self, item_id: str, worker_id: str) -> None:
        raise NotImplementedError

    def release_all(self, worker_id: str) -> None:
        """Give back every claim this worker id holds (one statement)."""
        raise NotImplementedError

    def item_id(self, item) -> str:
        return str(item.pk)

    def pipeline_batches(self, runner) -> int:
        """How many batches a task takes in a row: PIPELINE_BATCHES, or with 0 (auto) 8 when the runner's
        model is on a GPU and 1 on the CPU (whose cores the worker's children already share)."""
        if settings.PIPELINE_BATCHES > 0:
            return settings.PIPELINE_BATCHES
        device = getattr(runner, "device", None)
        return 8 if getattr(device, "type", "cpu") != "cpu" else 1


class Engine:
    """One task's work. `ids`: the task's own items (their temporary errors raise for its retry);
    `gather`: how many others may join the first batch (0: none); with `pipeline`, batches keep
    coming while compatible work is queued."""

    def __init__(self, work: Work, *, ids: list[str], worker_id: str, gather: int = 0, pipeline: bool = False,
                 gather_if_finished: bool = False) -> None:  # fmt: skip
        self.work = work
        self.own = list(ids)
        self.ids = list(ids)  # every item claimed or about to be: all of them can be given back
        self.worker_id = worker_id
        self.gather_limit = gather
        self.gather_if_finished = gather_if_finished
        self.pipeline = pipeline and gather > 0
        self.outcomes: dict[str, str] = {}
        self.deferred: Exception | None = None
        self.batches = 0
        self.started = time.monotonic()
        self.first = None  # the first claimed item: later batches are gathered to match it
        self.drained = False  # the last gather found fewer items than it asked for
        self.first_runner = None  # the first batch's runner (its device decides PIPELINE_BATCHES=0)

    # --- outcomes -------------------------------------------------------------------------------

    def fail(self, item_id: str, reason: str) -> None:
        self.work.fail(item_id, reason, self.worker_id)
        self.outcomes[item_id] = "failed"

    def give_back(self, item_id: str, exc: BaseException | None = None) -> None:
        try:
            self.work.release(item_id, self.worker_id)
        except Exception:  # the database itself is down; the sweeper recovers the claim later
            logger.warning("could not release %s %s", self.work.label, item_id)
        self.outcomes[item_id] = "released"
        if exc is not None and item_id in self.own and self.deferred is None:
            self.deferred = TransientError(str(exc))

    # --- the run --------------------------------------------------------------------------------

    def run(self) -> dict[str, str]:
        try:
            self._pipeline()
        except DATABASE_ERRORS as exc:
            # Every claim of this task without an outcome, by its worker id: a claim whose UPDATE went
            # through but whose answer was lost with the connection is given back too.
            try:
                self.work.release_all(self.worker_id)
            except Exception:  # the database itself is down; the sweeper recovers the claims later
                logger.warning("could not release the claims of %s", self.worker_id)
            for item_id in self.ids:
                self.outcomes.setdefault(item_id, "released")
            raise TransientError(str(exc)) from exc
        except SoftTimeLimitExceeded:
            # Only the task's own items have used up its time; the others go back to wait for their own
            # messages (or the sweeper), where each has the whole limit to itself.
            for item_id in self.ids:
                if item_id not in self.outcomes:
                    if item_id in self.own:
                        self.fail(item_id, self.work.too_long)
                    else:
                        self.give_back(item_id)
        if self.deferred is not None:
            raise self.deferred
        return self.outcomes

    def _pipeline(self) -> None:
        batch = self._first_batch()
        in_flight: Launched | None = None
        while batch is not None or in_flight is not None:
            launched = self._launch(batch) if batch is not None else None
            if in_flight is not None:
                self._finish(in_flight)  # recorded while the next batch is on the device
            in_flight = launched
            try:
                batch = self._next_batch() if batch is not None else None
            except (*DATABASE_ERRORS, SoftTimeLimitExceeded):
                raise  # run() gives back or fails every item without an outcome, the batch in flight's too
            except Exception as exc:  # the next batch could not start (open() gave its items back)
                if in_flight is not None:  # the one on the device still ends
                    self._finish(in_flight)
                    in_flight = None
                if any(item_id not in self.outcomes for item_id in self.own):
                    raise
                # The task's own work is done: its retry would have nothing to do. Stop taking batches.
                logger.warning("%s: no further batch after %d (%s: %s)", self.work.label, self.batches,
                               type(exc).__name__, exc)  # fmt: skip
                batch = None

    def _first_batch(self) -> Batch | None:
        claimed = {self.work.item_id(item): item for item in self.work.claim(self.own, self.worker_id)}
        items, fresh = [], False
        for item_id in self.own:
            item = claimed.get(item_id)
            if item is None:
                self.outcomes[item_id] = "skipped"
            elif item.attempts > settings.MAX_PROCESSING_ATTEMPTS:
                self.fail(item_id, self.work.exhausted.format(attempts=item.attempts - 1))
            else:
                items.append(item)
                fresh = fresh or item.attempts == 1
        if not claimed and self.gather_if_finished:
            fresh = True  # the message may stand for other waiting work too (coalesced wake-ups)
        if self.gather_limit > 0 and fresh:
            first = items[0] if items else None
            limit = min(self.gather_limit, self.work.batch_size(first) - len(items))
            items += self._gather(first, limit)
        else:
            self.pipeline = False  # an item on a later attempt goes alone
        if not items:
            return None
        self.first = items[0]
        return self._open(items)

    def _gather(self, first, limit: int, full: bool = False) -> list:
        if limit <= 0:
            return []
        gathered = self.work.gather(first, exclude=self.own, limit=limit, worker_id=self.worker_id, full=full)
        self.ids += [self.work.item_id(item) for item in gathered]
        # Fewer than asked for: nothing else was queued. Photos that arrive later have their own
        # messages, so the task does not look again (a lone upload costs no extra claim on its way).
        self.drained = len(gathered) < limit
        return gathered

    def _next_batch(self) -> Batch | None:
        if not self.pipeline or self.drained or self.batches >= self.work.pipeline_batches(self.first_runner):
            return None
        if time.monotonic() - self.started > settings.CELERY_TASK_SOFT_TIME_LIMIT / 2:
            return None
        # Only a full batch: claimed while the last one still runs, a part batch would be smaller than
        # what the next task (or this one's next message) takes once it ends, and on a CPU a forward pass
        # of a few photos costs more per photo than one of a full batch.
        items = self._gather(self.first, self.work.batch_size(self.first), full=True)
        return self._open(items) if items else None

    def _open(self, items: list) -> Batch | None:
        self.batches += 1
        batch = Batch(items=items)
        batch.runner = self.work.open(self, batch)
        if batch.runner is None:
            return None
        if self.first_runner is None:
            self.first_runner = batch.runner
        batch.jobs = self.work.prepare(self, batch)
        return batch

    def _launch(self, batch: Batch) -> Launched | None:
        """Wait for the batch's photos, then hand the ready ones to the device thread."""
        ready = []
        for item, job in zip(batch.items, batch.jobs, strict=True):
            item_id = self.work.item_id(item)
            if item_id in self.outcomes:
                continue
            try:
                ready.append((item, job.result()))
            except (*DATABASE_ERRORS, SoftTimeLimitExceeded):
                raise
            except Exception as exc:
                self._read_failed(item_id, exc)
        if not ready:
            return None
        return Launched(batch, ready, device_thread().submit(_run_groups, self.work, batch.runner, ready))

    def _read_failed(self, item_id: str, exc: Exception) -> None:
        try:
            reason = self.work.read_fault(exc)
        except Exception:
            logger.exception("%s %s: its photo could not be read", self.work.label, item_id)
            reason = f"The stored image could not be read (internal error: {type(exc).__name__})."
        if reason is None:
            logger.warning("%s %s: its photo could not be read now (%s)", self.work.label, item_id,
                           type(exc).__name__)  # fmt: skip
            self.give_back(item_id, exc)
        else:
            self.fail(item_id, reason)

    def _finish(self, launched: Launched) -> None:
        for group, output in launched.outputs.result():
            if isinstance(output, Exception):
                self.fail(self.work.item_id(group[0][0]), self.work.run_failed(output))
            else:
                self.work.record(self, launched.batch, group, output)


def _run_groups(work: Work, runner, ready: list) -> list[tuple[list, object]]:
    """On the device thread: the whole batch at once; if that raises, item by item, so that only the
    broken one fails. Returns (group, outputs or the exception) pairs."""

    def attempt(group: list):
        try:
            return work.run(runner, group)
        except Exception as exc:
            logger.exception("%s: the device failed on a batch of %d", work.label, len(group))
            return exc

    output = attempt(ready)
    if isinstance(output, Exception) and len(ready) > 1:
        return [([item], attempt([item])) for item in ready]
    return [(ready, output)]


def done_future(function: Callable, *args) -> Future:
    """A finished Future of function(*args): one photo is handled in this thread, with no hand-off."""
    future: Future = Future()
    try:
        future.set_result(function(*args))
    except Exception as exc:
        future.set_exception(exc)
    return future
