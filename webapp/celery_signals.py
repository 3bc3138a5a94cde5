"""Celery signal handlers (imported by webapp/celery.py): the request id travels with each task, the
worker's logs are JSON when LOG_FORMAT=json, and tasks are counted and timed for Prometheus
(diagnosis.metrics, served on WORKER_METRICS_PORT). See docs/observability.md."""

from __future__ import annotations

import logging
import logging.config
import os
import time

from celery import signals

from webapp import request_id as log_context

logger = logging.getLogger(__name__)

REQUEST_ID_HEADER = "request_id"  # a custom message header: task.request.request_id on the worker

_running: dict[str, tuple[object, float]] = {}  # task id -> (context token, start)
_metrics_server_started = False


# --- the request id across the broker -----------------------------------------------------------------


@signals.before_task_publish.connect(dispatch_uid="triage-carry-request-id")
def _carry_request_id(headers=None, **_) -> None:
    """Enqueued during a request or a task: the message carries that request id."""
    request_id = log_context.current_request_id()
    if request_id and headers is not None:
        headers.setdefault(REQUEST_ID_HEADER, request_id)


@signals.task_prerun.connect(dispatch_uid="triage-task-started")
def _task_started(task_id=None, task=None, **_) -> None:
    request_id = log_context.sane_request_id(getattr(task.request, REQUEST_ID_HEADER, None))
    token = log_context.bind(request_id=request_id, task_id=task_id, task_name=task.name)
    _running[task_id] = (token, time.perf_counter())


@signals.task_postrun.connect(dispatch_uid="triage-task-finished")
def _task_finished(task_id=None, task=None, **_) -> None:
    # Celery's own "succeeded" / "raised" / "retry" line of the task is logged before this, in its context.
    from diagnosis import metrics

    token, started = _running.pop(task_id, (None, None))
    if started is not None:
        metrics.observe_task(task=task.name, seconds=time.perf_counter() - started)
    if token is not None:
        log_context.unbind(token)


# --- task outcomes ------------------------------------------------------------------------------------


@signals.task_success.connect(dispatch_uid="triage-task-succeeded")
def _task_succeeded(sender=None, **_) -> None:
    from diagnosis import metrics

    metrics.count_task(task=sender.name, state="succeeded")


@signals.task_failure.connect(dispatch_uid="triage-task-failed")
def _task_failed(sender=None, **_) -> None:
    from diagnosis import metrics

    metrics.count_task(task=getattr(sender, "name", str(sender)), state="failed")


@signals.task_retry.connect(dispatch_uid="triage-task-retried")
def _task_retried(sender=None, **_) -> None:
    from diagnosis import metrics

    metrics.count_task(task=getattr(sender, "name", str(sender)), state="retried")


# --- the worker's metrics server ------------------------------------------------------------------------


@signals.worker_init.connect(dispatch_uid="triage-metrics-multiprocess")
def _prepare_metrics(sender=None, **_) -> None:
    """In the main process, before the pool forks: children record into the multiprocess folder."""
    from django.conf import settings

    if settings.WORKER_METRICS_PORT > 0:
        from diagnosis import metrics

        metrics.use_multiprocess_dir()


@signals.worker_shutdown.connect(dispatch_uid="triage-metrics-cleanup")
def _forget_metrics(**_) -> None:
    from diagnosis import metrics

    metrics.remove_own_multiprocess_dir()


@signals.worker_process_shutdown.connect(dispatch_uid="triage-metrics-child-exit")
def _child_exited(pid=None, **_) -> None:
    # A recycled prefork child's gauge files go with it (its counters stay summed in by prometheus_client).
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(pid or os.getpid())


@signals.worker_ready.connect(dispatch_uid="triage-metrics-server")
def _serve_metrics(sender=None, **_) -> None:
    global _metrics_server_started
    from django.conf import settings

    if settings.WORKER_METRICS_PORT <= 0 or _metrics_server_started:
        return
    from diagnosis import metrics

    try:
        metrics.start_metrics_server(app=sender.app, port=settings.WORKER_METRICS_PORT,
                                     addr=settings.WORKER_METRICS_ADDR)  # fmt: skip
    except OSError as exc:  # a port taken must not stop the worker from working
        logger.error("worker metrics not served on port %s: %s", settings.WORKER_METRICS_PORT, exc)
    else:
        _metrics_server_started = True


# --- logs -----------------------------------------------------------------------------------------------


def _json_logs() -> bool:
    from django.conf import settings

    return settings.LOG_FORMAT == "json"


def _use_django_logging(loglevel=None, **_) -> None:
    """LOG_FORMAT=json, in a worker or beat: Django's LOGGING (JSON lines on stderr) instead of Celery's
    own format. Being a receiver of setup_logging is what tells Celery to leave logging alone."""
    from django.conf import settings

    logging.config.dictConfig(settings.LOGGING)
    logging.captureWarnings(True)
    if loglevel:
        logging.getLogger().setLevel(loglevel)


# Decided when this module is imported, before Django's settings can be read; the settings read the
# same variable (webapp/settings/base.py, LOG_FORMAT).
if os.environ.get("LOG_FORMAT", "").strip().lower() == "json":
    signals.setup_logging.connect(_use_django_logging, weak=False, dispatch_uid="triage-json-logs")


@signals.celeryd_init.connect(dispatch_uid="triage-json-logs-early")
def _use_json_logs_early(**_) -> None:
    """A worker sets up its logging late: in JSON mode, the warnings it gives before that (running as
    root, say) are JSON lines too."""
    if _json_logs():
        _use_django_logging()


@signals.celeryd_after_setup.connect(dispatch_uid="triage-json-banner")
def _no_text_banner(sender=None, instance=None, **_) -> None:
    """The start-up banner is plain text on stdout; in JSON mode one log line says the same."""
    if not _json_logs():
        return
    instance.quiet = True
    queues = sorted(instance.app.amqp.queues.consume_from or instance.app.amqp.queues)
    logger.info("worker %s starting: queues %s, pool %s, concurrency %s", sender, ",".join(queues),
                getattr(instance.pool_cls, "__module__", instance.pool_cls), instance.concurrency)  # fmt: skip


@signals.after_setup_logger.connect(dispatch_uid="triage-plain-log-filters")
@signals.after_setup_task_logger.connect(dispatch_uid="triage-plain-task-log-filters")
def _filter_celery_handlers(logger=None, **_) -> None:
    """Plain mode keeps Celery's format; its handlers still redact secrets."""
    from webapp.structured_logging import ContextFilter, RedactSecretsFilter

    for handler in logger.handlers if logger is not None else []:
        if not any(isinstance(existing, RedactSecretsFilter) for existing in handler.filters):
            handler.addFilter(ContextFilter())
            handler.addFilter(RedactSecretsFilter())
