"""Prometheus metrics of the workers: tasks by outcome and their durations (webapp.celery_signals
records them), predictions by label and model version, explanation durations by method (the services
record them), and the depth of each queue, read from the broker at scrape time.

A worker with WORKER_METRICS_PORT set serves them over HTTP from its main process. Its prefork children
record into files in PROMETHEUS_MULTIPROC_DIR (prometheus_client's multiprocess mode) and the main
process adds them up at each scrape. See docs/observability.md for the names and how to scrape them.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path

from django.conf import settings
from prometheus_client import CollectorRegistry, Counter, Histogram, multiprocess, start_http_server, values
from prometheus_client.core import GaugeMetricFamily

logger = logging.getLogger(__name__)

# Every metric here has labels: a labelled metric creates its value store at first use, in the process
# that uses it, which is what lets a worker switch to multiprocess mode after these are defined.
DURATION_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)  # seconds: a batch to a long IG
TASKS = Counter(
    "celery_tasks", "Celery tasks by task name and outcome (succeeded, failed, retried).", ["task", "state"]
)
TASK_DURATION = Histogram(
    "celery_task_duration_seconds",
    "How long a task ran in the worker (each attempt), by task name.",
    ["task"],
    buckets=DURATION_BUCKETS,
)
PREDICTIONS = Counter(
    "triage_predictions", "Predictions recorded, by predicted label and model version.", ["label", "model_version"]
)
DECISIONS = Counter(
    "triage_decisions",
    "Photos decided, by decision (above_threshold, below_threshold, uncertain, not_assessable) and model version.",
    ["decision", "model_version"],
)
EXPLANATION_DURATION = Histogram(
    "triage_explanation_duration_seconds",
    "Time to compute an explanation (Grad-CAM: its share of the prediction pass plus drawing), by method.",
    ["method"],
    buckets=DURATION_BUCKETS,
)


def count_task(*, task: str, state: str) -> None:
    TASKS.labels(task=task, state=state).inc()


def observe_task(*, task: str, seconds: float) -> None:
    TASK_DURATION.labels(task=task).observe(seconds)


def record_prediction(*, label: str, model_version: str) -> None:
    PREDICTIONS.labels(label=label, model_version=model_version).inc()


def record_decision(*, decision: str, model_version: str) -> None:
    DECISIONS.labels(decision=decision, model_version=model_version).inc()


def observe_explanation(*, method: str, seconds: float) -> None:
    EXPLANATION_DURATION.labels(method=method).observe(seconds)


def known_queues() -> list[str]:
    routed = {route["queue"] for route in settings.CELERY_TASK_ROUTES.values() if "queue" in route}
    return sorted(routed | {settings.CELERY_TASK_DEFAULT_QUEUE})


class QueueDepthCollector:
    """celery_queue_depth{queue}: messages waiting in each known queue, asked of the broker at each
    scrape (LLEN for Redis, summed over its priority lists); celery_broker_up says whether it answered."""

    def __init__(self, app, queues: list[str]):
        self.app, self.queues = app, queues

    def describe(self):  # registering must not reach out to the broker
        return [self._depth(), self._up()]

    @staticmethod
    def _depth() -> GaugeMetricFamily:
        return GaugeMetricFamily("celery_queue_depth", "Messages waiting in the queue (read at scrape time).",
                                 labels=["queue"])  # fmt: skip

    @staticmethod
    def _up() -> GaugeMetricFamily:
        return GaugeMetricFamily("celery_broker_up", "1 if the broker answered this scrape's queue-depth query.")

    def collect(self):
        depth, up = self._depth(), self._up()
        try:
            with self.app.connection_for_read() as connection:
                connection.ensure_connection(max_retries=1, timeout=2)
                channel = connection.default_channel
                sizes = {queue: channel._size(queue) for queue in self.queues}  # kombu's virtual transports
        except Exception as exc:
            logger.warning("queue depth unavailable: the broker did not answer (%s)", type(exc).__name__)
            up.add_metric([], 0)
        else:
            for queue, size in sizes.items():
                depth.add_metric([queue], size)
            up.add_metric([], 1)
        yield depth
        yield up


_own_multiprocess_dir: Path | None = None


def use_multiprocess_dir() -> Path:
    """Called in a worker's main process before it forks its children: they (and it) record into
    PROMETHEUS_MULTIPROC_DIR (a fresh temporary folder when unset). Leftovers of an earlier run are
    removed, so one folder must belong to one worker process tree."""
    global _own_multiprocess_dir
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        _own_multiprocess_dir = Path(tempfile.mkdtemp(prefix="prometheus-worker-"))
    path = _own_multiprocess_dir or Path(os.environ["PROMETHEUS_MULTIPROC_DIR"])
    path.mkdir(parents=True, exist_ok=True)
    for leftover in path.glob("*.db"):
        leftover.unlink()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(path)
    # prometheus_client picks its value store when it is first imported; pick again now that the folder is set.
    values.ValueClass = values.get_value_class()
    return path


def remove_own_multiprocess_dir() -> None:
    """At the worker's shutdown (main process): the temporary folder use_multiprocess_dir() made, if any."""
    if _own_multiprocess_dir is not None:
        shutil.rmtree(_own_multiprocess_dir, ignore_errors=True)


def start_metrics_server(*, app, port: int, addr: str) -> None:
    """Serve the sum over every process of this worker, plus the queue depths, on addr:port."""

    registry = CollectorRegistry()
    multiprocess.MultiProcessCollector(registry)
    registry.register(QueueDepthCollector(app, known_queues()))
    start_http_server(port, addr=addr, registry=registry)
    logger.info("worker metrics on http://%s:%d/metrics", addr, port)
