"""The demo model's training in the background (`manage.py train_demo`, which `make run` starts after the
web server answers): its progress, kept in a small JSON file under var/ that the portal reads to show a
notice on every page while the model trains.

The file (var/demo-training.json) holds the state (preparing, training, registering, then registered,
stopped or failed), the epochs done out of how many, an estimate of the seconds left when it was written,
when training started and the training process's id. A notice is shown only while that process is alive,
so a training killed without a word (SIGKILL, a power cut) leaves no notice behind. The epochs are read
from training's own log lines (mlcore.train: "epoch 2/4  loss ...  val AUC ..."), so training needs no
hook of its own.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from django.conf import settings
from django.utils import timezone

from ..models import ModelVersion, TrainingRun
from .demo import DemoTraining, ensure_demo_model

STATUS_FILE = "demo-training.json"
ACTIVE_STATES = ("preparing", "training", "registering")
# mlcore.train's summary after each epoch (when it trains without a progress bar), and the data summary
# services.training logs just before the first epoch starts.
EPOCH_LINE = re.compile(r"^epoch (\d+)/(\d+)\s")
DATA_LINE = "Data: "
# After the last epoch: calibration, the test set's evaluation, the plots, the drift reference and the
# registration's smoke test. Measured on the demo resnet18 (1,200 + 300 images at 128 px, 2 CPU cores):
# 14 s after epochs of 25 s on a quiet machine, 33 s after epochs of 52 s on a busy one.
FINISHING_EPOCHS = 0.6


class TrainingStopped(BaseException):
    """The demo training was asked to stop (SIGTERM or SIGINT). Not a KeyboardInterrupt: training answers
    that by evaluating the best epoch so far, which would only delay the stop."""


def status_path() -> Path:
    return Path(settings.VAR_DIR) / STATUS_FILE


def read_status() -> dict | None:
    """The status file's content; None when there is none or it cannot be read."""
    try:
        status = json.loads(status_path().read_text())
    except (OSError, ValueError):
        return None
    return status if isinstance(status, dict) else None


def write_status(status: dict) -> None:
    """Replace the status file in one step, so that a reader never sees half of it."""
    path = status_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    temporary.write_text(json.dumps(status))
    os.replace(temporary, path)


def process_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def training_running(status: dict | None = None) -> bool:
    """Whether a demo training process is at work now (its status says so and its process is alive)."""
    status = read_status() if status is None else status
    return bool(status) and status.get("state") in ACTIVE_STATES and process_alive(status.get("pid"))


def clear_stale_status() -> dict | None:
    """Remove the status file unless a live training process owns it (a run stopped by SIGKILL leaves one
    that still says "training"). Returns what was removed, or None."""
    status = read_status()
    if status is None or training_running(status):
        return None
    status_path().unlink(missing_ok=True)
    return status


def training_notice(status: dict | None = None, *, now: float | None = None) -> str | None:
    """The portal's notice while the demo model trains, e.g. "Demo model training: epoch 2 of 4, about 90 s
    left. ..."; None when no training runs."""
    status = read_status() if status is None else status
    if not training_running(status):
        return None
    epochs, done = int(status.get("epochs") or 0), int(status.get("epoch") or 0)
    left = status.get("seconds_left")
    if isinstance(left, (int, float)):
        elapsed = (now if now is not None else time.time()) - float(status.get("updated_at") or 0)
        about = f"about {_duration(max(5.0, left - max(0.0, elapsed)))} left"
    else:
        about = "the time left is known after the first epoch"
    if status["state"] == "preparing":
        where = f"preparing the synthetic images ({epochs} epochs to train)"
    elif status["state"] == "registering" or done >= epochs:
        where = f"evaluating and registering, {about}"
    else:
        where = f"epoch {done + 1} of {epochs}, {about}"
    return (
        f"Demo model training: {where}. Uploads are accepted meanwhile; they are scored automatically once the "
        "model is registered."
    )


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{round(seconds / 5) * 5:.0f} s"
    return f"{round(seconds / 60):.0f} min"


class TrainingProgress:
    """A log for services.training: each line goes to `write_line` (the training log) and moves the status
    file on: the data summary starts the epochs' clock, each epoch's summary updates the epochs done and the
    time left (the epochs so far give the time per epoch)."""

    def __init__(self, *, epochs: int, write_line: Callable[[str], None], clock: Callable[[], float] = time.monotonic):
        self.write_line = write_line
        self.clock = clock
        self.epochs_started: float | None = None
        self.status = {
            "state": "preparing", "epoch": 0, "epochs": epochs, "seconds_left": None,
            "started_at": timezone.now().isoformat(), "updated_at": time.time(), "pid": os.getpid(),
        }  # fmt: skip
        write_status(self.status)

    def __call__(self, line: str) -> None:
        self.write_line(line)
        if line.startswith(DATA_LINE) and self.epochs_started is None:
            self.epochs_started = self.clock()
            self._update(state="training")
            return
        found = EPOCH_LINE.match(line)
        if found is None or self.epochs_started is None:
            return
        done, epochs = int(found.group(1)), int(found.group(2))
        elapsed = self.clock() - self.epochs_started
        left = elapsed / max(1, done) * (epochs - done + FINISHING_EPOCHS)
        self._update(state="training" if done < epochs else "registering", epoch=done, epochs=epochs,
                     seconds_left=round(left, 1), epochs_seconds=round(elapsed, 1))  # fmt: skip

    def finish(self, state: str, **fields) -> None:
        """The last word: registered, stopped or failed (with `error`). `finished_seconds`: from the first
        epoch's start to now, which with `epochs_seconds` (to the last epoch's end) shows what FINISHING_EPOCHS
        stands for."""
        if self.epochs_started is not None:
            fields["finished_seconds"] = round(self.clock() - self.epochs_started, 1)
        self._update(state=state, seconds_left=None, **fields)

    def _update(self, **fields) -> None:
        self.status.update(fields, updated_at=time.time())
        write_status(self.status)


def mark_stopped_runs(*, since) -> int:
    """Training runs of a training that was stopped (TrainingStopped skips the bookkeeping of an interrupt)
    and still say "running": marked interrupted. Returns how many."""
    return TrainingRun.objects.filter(status=TrainingRun.Status.RUNNING, started_at__gte=since).update(
        status=TrainingRun.Status.INTERRUPTED, error="The demo training was stopped.", finished_at=timezone.now()
    )


def train_demo_model(training: DemoTraining, *, write_line: Callable[[str], None]) -> ModelVersion:
    """Train, register and activate the demo model (services.demo.ensure_demo_model) with its progress in
    the status file; the last state says how it ended. TrainingStopped (raised by the caller's signal
    handler) leaves no model registered: registration is one transaction, and a model registered but not
    yet activated is activated by the next run."""
    progress = TrainingProgress(epochs=training.epochs, write_line=write_line)
    started = timezone.now()
    try:
        model_version, _ = ensure_demo_model(training=training, progress=False, log=progress)
    except TrainingStopped:
        mark_stopped_runs(since=started)
        progress.finish("stopped")
        raise
    except Exception as exc:
        progress.finish("failed", error=str(exc))
        raise
    progress.finish("registered", version=model_version.version)
    return model_version
