"""When a prefork worker child is replaced for its memory: once its resident memory has grown more than
WORKER_MAX_MEMORY_GROWTH_MB above what it held when it had warmed up. Never for what a healthy warmed child
holds, whatever its role, model or batch size.

Why not Celery's own cap (worker_max_memory_per_child, CELERY_WORKER_MAX_MEMORY_PER_CHILD): it is one
absolute number for every child of every role, compared after each task with the child's peak RSS. A warmed
CUDA child holds 1.65-2.0 GB (resnet18, batches of 64-256; ../shared/results/h200-2026-12-04/). That is at
or above the 2,000,000 KiB Celery was given, so Celery replaced the child after every task. Each new child
set up CUDA and warmed up again, and the whole system fell from 1,157 to 128 images/s. A CPU child of the
same model holds 0.93-1.09 GB. What a healthy child holds depends on where it runs and what it was warmed up
with, so each child measures it itself. A leak is growth above that measure.

The rule (MemoryCap):
- The baseline is the child's resident memory right after its warm-up (webapp/celery.py). A child that
  did not warm up a model takes it after its first task: that task loaded what the child runs.
- The child is replaced after a task when its resident memory is above baseline + growth, or above
  WORKER_MAX_MEMORY_MB when that ceiling is set. growth is WORKER_MAX_MEMORY_GROWTH_MB, or by default
  the role's figure in WORKER_MAX_MEMORY_GROWTH_MB_BY_ROLE. A child that has initialised CUDA is a GPU
  child; any other child is a CPU child.
- It is never replaced for what it holds right after its warm-up, since a new child would start the same
  and be replaced in turn. That case is a wrong setting: the child logs one warning naming its memory,
  its baseline and the setting to raise, then keeps a cap above that memory:
  - already above the ceiling when it has warmed up: the ceiling no longer applies to it;
  - above its cap at its first task after the warm-up: the baseline moves to that task's end (the warm-up
    did not touch everything the work touches).
- The reading is the resident memory now (/proc/self/statm), not the peak Celery reads, so one large
  upload's passing peak is not taken for a leak.
- The defaults (WORKER_MAX_MEMORY_GROWTH_MB_BY_ROLE: 1024 MB on the CPU, 2048 MB on a GPU) are about the
  whole size of a warmed child of that role, so a child is replaced when it has about doubled. What a
  healthy child adds after its warm-up is far less: a resnet18 CPU child at batch 16 went from 825 MB after
  its warm-up to 963-1,083 MB over its next 15 batches of 1528x1360 JPEGs, and the H200's CUDA children
  grew 0-3 MB from the middle to the end of their runs (docs/deployment.md, Worker memory).

How a child leaves: the same way as with Celery's cap. After each task billiard's pool loop (billiard.pool.
Worker.workloop) compares `mem_rss()` with the Worker's `max_memory_per_child`. When it is larger, the
loop ends with EX_RECYCLE, after the task's result has gone to the parent, and the parent starts a new child.
install() runs in the child before that loop starts. It gives the child's own Worker object (the pool
process's target) a limit, so that billiard checks after every task, and points billiard's `mem_rss`, in
this child only, at a reading that applies MemoryCap.after_task. The decision is the rule's; the number
billiard compares is the real resident memory whenever the cap has not moved since the loop started.
Doing it there rather than in a task_postrun handler is what lets the child leave after its result is
sent and before it takes the next task: a handler can only decide, not end billiard's loop. The threads
and solo pools replace no process, with this cap or with Celery's.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass

import billiard.pool
from billiard import process as billiard_process
from billiard.compat import mem_rss as billiard_mem_rss
from django.conf import settings

logger = logging.getLogger(__name__)

_MIB = 1024  # KiB
_PAGE_KIB = max(1, os.sysconf("SC_PAGE_SIZE") // 1024) if hasattr(os, "sysconf") else 4


def resident_kib() -> int:
    """This process's resident memory now, in KiB: /proc/self/statm on Linux, else the peak as billiard
    reads it (getrusage), which is what Celery's own cap compares."""
    try:
        with open("/proc/self/statm", "rb") as statm:
            return int(statm.read().split()[1]) * _PAGE_KIB
    except (OSError, ValueError, IndexError):
        return int(billiard_mem_rss())


def role() -> str:
    """'gpu' for a process that has initialised CUDA, else 'cpu'. torch is never imported here for it."""
    torch = sys.modules.get("torch")
    return "gpu" if torch is not None and torch.cuda.is_initialized() else "cpu"


def _mb(kib: int) -> int:
    return round(kib / _MIB)


@dataclass
class MemoryCap:
    """The rule for one child (see the module's docstring). Settings in MB, readings in KiB; 0 turns a
    cap off. growth_mb None: the figure for the child's role in growth_by_role_mb."""

    growth_mb: int | None
    growth_by_role_mb: dict[str, int]
    ceiling_mb: int = 0
    baseline_kib: int | None = None
    growth_kib: int = 0  # the growth allowed, once the baseline (and so the role) is known
    ceiling_kib: int = 0  # the ceiling that applies, once the baseline is known
    settled: bool = False  # a task has ended within the cap since the baseline was taken
    growth_text: str = ""  # the growth setting and its value, for the logs

    @classmethod
    def from_settings(cls) -> MemoryCap:
        return cls(growth_mb=settings.WORKER_MAX_MEMORY_GROWTH_MB,
                   growth_by_role_mb=dict(settings.WORKER_MAX_MEMORY_GROWTH_MB_BY_ROLE),
                   ceiling_mb=settings.WORKER_MAX_MEMORY_MB)  # fmt: skip

    def may_apply(self) -> bool:
        """Whether any cap is set at all, for a child of any role."""
        growths = self.growth_by_role_mb.values() if self.growth_mb is None else [self.growth_mb]
        return self.ceiling_mb > 0 or any(growth > 0 for growth in growths)

    def cap_kib(self) -> int | None:
        """The resident memory above which the child is replaced; None: no cap (yet)."""
        if self.baseline_kib is None:
            return None
        caps = [self.baseline_kib + self.growth_kib] if self.growth_kib > 0 else []
        if self.ceiling_kib > 0:
            caps.append(self.ceiling_kib)
        return min(caps) if caps else None

    def warmed_up(self, rss_kib: int, process_role: str, when: str = "after its warm-up") -> None:
        """The child has warmed up and holds rss_kib: its baseline."""
        growth_mb = self.growth_by_role_mb[process_role] if self.growth_mb is None else self.growth_mb
        default = f" (the {process_role} default)" if self.growth_mb is None else ""
        self.growth_text = f"WORKER_MAX_MEMORY_GROWTH_MB={growth_mb}{default}"
        self.growth_kib, self.ceiling_kib = max(0, growth_mb) * _MIB, max(0, self.ceiling_mb) * _MIB
        self.baseline_kib, self.settled = rss_kib, False
        if self.ceiling_kib > 0 and rss_kib > self.ceiling_kib:
            logger.warning(
                "worker process %d holds %d MB right %s, above WORKER_MAX_MEMORY_MB=%d. It is not "
                "replaced for that, since a new process would start the same: its cap is its baseline %d MB + %s. "
                "Raise WORKER_MAX_MEMORY_MB above what a warmed process holds, or leave it empty.",
                os.getpid(), _mb(rss_kib), when, self.ceiling_mb, _mb(rss_kib), self.growth_text,
            )  # fmt: skip
            self.ceiling_kib = 0
        cap = self.cap_kib()
        logger.info("worker process %d (%s): baseline %d MB %s; %s", os.getpid(), process_role,
                    _mb(rss_kib), when, f"replaced after a task above {_mb(cap)} MB ({self._caps_text()})" if cap
                    else "no memory cap")  # fmt: skip

    def after_task(self, rss_kib: int, process_role: str = "cpu") -> bool:
        """A task has ended and the child holds rss_kib. True: replace the child now."""
        if self.baseline_kib is None:  # no warm-up: its first task loaded what it runs
            self.warmed_up(rss_kib, process_role, when="after its first task")
            return False
        cap = self.cap_kib()
        if cap is None or rss_kib <= cap:
            self.settled = True
            return False
        if not self.settled:  # its first task after the warm-up: a setting too low, not a leak
            above_ceiling = self.ceiling_kib > 0 and rss_kib > self.ceiling_kib
            logger.warning(
                "worker process %d holds %d MB after its first task since its warm-up, above its cap of %d MB "
                "(baseline %d MB; %s). It is not replaced for that, since a new process would do the same: its "
                "baseline is now %d MB. Raise %s.",
                os.getpid(), _mb(rss_kib), _mb(cap), _mb(self.baseline_kib), self._caps_text(), _mb(rss_kib),
                "WORKER_MAX_MEMORY_MB" if above_ceiling else "WORKER_MAX_MEMORY_GROWTH_MB",
            )  # fmt: skip
            if above_ceiling:
                self.ceiling_kib = 0
            self.baseline_kib, self.settled = rss_kib, True
            return False
        logger.warning(
            "worker process %d holds %d MB, above its cap of %d MB (baseline %d MB; %s): replaced after this task",
            os.getpid(), _mb(rss_kib), _mb(cap), _mb(self.baseline_kib), self._caps_text(),
        )  # fmt: skip
        return True

    def _caps_text(self) -> str:
        caps = [self.growth_text] if self.growth_kib > 0 else []
        if self.ceiling_kib > 0:
            caps.append(f"WORKER_MAX_MEMORY_MB={_mb(self.ceiling_kib)}")
        return ", ".join(caps)


def install(*, warmed_up: bool) -> MemoryCap | None:
    """In a prefork child, at worker_process_init after its warm-up, before billiard's task loop starts:
    the child's MemoryCap, with billiard's check after every task set to apply it. None outside a prefork
    child, and when no cap is set. Never stops the child from starting."""
    try:
        return _install(warmed_up=warmed_up)
    except Exception as exc:  # a child that fails here would be replaced by one failing the same way
        logger.warning("worker process %d has no memory cap: %s", os.getpid(), exc)
        return None


def _install(*, warmed_up: bool) -> MemoryCap | None:
    worker = getattr(billiard_process.current_process(), "_target", None)
    if not isinstance(worker, billiard.pool.Worker):
        return None  # the threads or solo pool, or no pool at all: no process to replace
    cap = MemoryCap.from_settings()
    if not cap.may_apply():
        return None
    rss = resident_kib()
    if warmed_up:
        cap.warmed_up(rss, role())
    else:
        logger.info("worker process %d: %d MB, no warm-up; its memory baseline is taken after its first task",
                    os.getpid(), _mb(rss))  # fmt: skip
    # billiard reads the limit once, when its loop starts: the cap now, or with no baseline yet any positive
    # figure. _reading keeps billiard's comparison true to the rule after that.
    limit = cap.cap_kib() or rss + _MIB
    worker.max_memory_per_child = limit

    def _reading() -> int:
        rss_now = resident_kib()
        try:
            replace = cap.after_task(rss_now, role())
        except Exception:  # raised inside billiard's loop, it would end the process, and the next one alike
            logger.exception("worker process %d: memory check failed; the process is kept", os.getpid())
            replace = False
        return max(rss_now, limit + 1) if replace else max(1, min(rss_now, limit))

    billiard.pool.mem_rss = _reading
    return cap
