"""Metrics and structured logs (docs/observability.md).

The end-to-end part runs the real thing once for the module: a private redis-server, the web tier as a
real gunicorn (two processes, multiprocess metrics, LOG_FORMAT=json, METRICS_TOKEN set) and a real
Celery worker (LOG_FORMAT=json, WORKER_METRICS_PORT). One upload goes through the API; the tests then
read what it left in both /metrics endpoints and in both logs. The rest runs in this process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import uuid
from pathlib import Path
from types import SimpleNamespace

import httpx
import pytest
from django.test import Client
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import ROOT, lesion_jpeg, reachable, start_worker, stop_worker, wait_for, wait_until_serving

PREDICT = "diagnosis.tasks.predict_image_task"
RENDER = "diagnosis.tasks.render_explanation_task"
# Words that must never reach a log: unique, so a match is certainly a leak.
PATIENT_REFERENCE = f"PT-OBS-{uuid.uuid4().hex[:8].upper()}"
CLIENT_FILE_NAME = f"obs-client-name-{uuid.uuid4().hex[:8]}.jpg"
METRICS_TOKEN = secrets.token_urlsafe(24)


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels): value} of a Prometheus text exposition."""
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def value(metrics: dict, name: str, **labels: str) -> float | None:
    return metrics.get((name, frozenset(labels.items())))


def json_lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(errors="replace").splitlines() if line.strip()]


def stop_group(process: subprocess.Popen) -> None:
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# --- the processes ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def stack(worker_env, tmp_path_factory):
    folder = tmp_path_factory.mktemp("observability")
    started: list[subprocess.Popen] = []
    worker = None
    try:
        redis_port = free_port()
        with open(folder / "redis.log", "wb") as log:
            started.append(subprocess.Popen(
                ["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1", "--save", "", "--appendonly",
                 "no"], stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            ))  # fmt: skip
        wait_for(lambda: reachable("127.0.0.1", redis_port, 0.2), 10, message="the private redis-server")
        # A broker of its own: the session's shared worker never takes this module's tasks.
        env = {
            **worker_env,
            "CELERY_BROKER_URL": f"redis://127.0.0.1:{redis_port}/0",
            "LOG_FORMAT": "json",
            "AUTO_EXPLAIN_METHODS": "none",
            "GRADCAM_PICTURES": "eager",
        }  # fmt: skip  (a render task to count)
        web_port = free_port()
        web_log = folder / "web.log"
        with open(web_log, "wb") as log:
            web = subprocess.Popen(
                [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py",
                 "-b", f"127.0.0.1:{web_port}", "-w", "2"],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                env={**env, "METRICS_TOKEN": METRICS_TOKEN, "PROMETHEUS_MULTIPROC_DIR": str(folder / "web-metrics")},
            )  # fmt: skip
        started.append(web)
        worker_port = free_port()
        worker = start_worker(
            env={**env, "WORKER_METRICS_PORT": str(worker_port), "WORKER_METRICS_ADDR": "127.0.0.1"},
            log_path=folder / "worker.log", queues="inference,default", name=f"obs-{uuid.uuid4().hex[:6]}@%h",
        )  # fmt: skip
        web_url = f"http://127.0.0.1:{web_port}"

        wait_until_serving(web_url, web, web_log)
        yield SimpleNamespace(
            web_url=web_url, web_log=web_log, worker=worker, worker_metrics_url=f"http://127.0.0.1:{worker_port}/metrics",
            broker_url=env["CELERY_BROKER_URL"],
        )  # fmt: skip
    finally:
        if worker is not None:
            stop_worker(worker)
        for process in reversed(started):
            stop_group(process)


@pytest.fixture(scope="module")
def upload(stack, django_db_blocker, tiny_checkpoint):
    """One upload through the API of the real gunicorn, processed by the real worker (prediction and its
    Grad-CAM picture). Its rows are committed, so they are flushed at the end of the module."""
    from django.core.management import call_command

    from diagnosis.models import Explanation, ImageState, LesionImage, Prediction
    from diagnosis.services.registry import register_model
    from diagnosis.services.tokens import create_api_token
    from tests.factories import ClinicFactory, ClinicianFactory

    with django_db_blocker.unblock():
        clinic = ClinicFactory(name=f"Observability {uuid.uuid4().hex[:6]}")
        _, token = create_api_token(user=ClinicianFactory(membership__clinic=clinic), name="observability")
        model_version = register_model(checkpoint=tiny_checkpoint, version=f"obs-{uuid.uuid4().hex[:8]}",
                                       activate=True)  # fmt: skip
        try:
            api = httpx.Client(base_url=f"{stack.web_url}/api/v1", headers={"Authorization": f"Token {token}"},
                               timeout=30)  # fmt: skip
            patient = api.post("/patients/", json={"reference": PATIENT_REFERENCE})
            assert patient.status_code == 201, patient.text
            found = api.get("/patients/", params={"reference": PATIENT_REFERENCE}).json()["results"]
            assert [item["id"] for item in found] == [patient.json()["id"]]
            lesion = api.post("/lesions/", json={"patient": patient.json()["id"], "body_site": "back"})
            assert lesion.status_code == 201, lesion.text
            request_id = str(uuid.uuid4())
            response = api.post(
                "/images/", data={"lesion": lesion.json()["id"]},
                files={"image": (CLIENT_FILE_NAME, lesion_jpeg(seed=31, size=96), "image/jpeg")},
                headers={"X-Request-ID": request_id},
            )  # fmt: skip
            assert response.status_code == 202, response.text
            assert response.headers["X-Request-ID"] == request_id
            image_id = response.json()["id"]
            finished = LesionImage.objects.filter(pk=image_id, state__in=[ImageState.DONE, ImageState.FAILED])
            drawn = Explanation.objects.filter(image_id=image_id, method="gradcam", state="done")
            try:
                wait_for(lambda: finished.exists() and drawn.exists(), 60, message="the upload and its Grad-CAM")
            except AssertionError as exc:
                raise AssertionError(f"{exc}\n--- worker log ---\n{stack.worker.log()[-3000:]}") from None
            prediction = Prediction.objects.get(image_id=image_id)
            assert LesionImage.objects.get(pk=image_id).state == ImageState.DONE
            yield SimpleNamespace(image_id=image_id, request_id=request_id, token=token, label=prediction.label,
                                  model_version=model_version.version)  # fmt: skip
        finally:
            call_command("flush", interactive=False, verbosity=0)


# --- metrics ------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_web_metrics_refuse_requests_without_the_token(stack):
    url = f"{stack.web_url}/metrics"
    assert httpx.get(url).status_code == 403
    assert httpx.get(url, headers={"Authorization": "Bearer not-the-token"}).status_code == 403
    assert httpx.get(url, headers={"Authorization": f"Token {METRICS_TOKEN}"}).status_code == 403
    answer = httpx.get(url, headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
    assert answer.status_code == 200 and "django_http_" in answer.text


@pytest.mark.e2e
def test_web_metrics_count_the_upload_and_add_up_every_gunicorn_process(stack, upload):
    def scrape() -> dict:
        answer = httpx.get(f"{stack.web_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"})
        assert answer.status_code == 200
        return samples(answer.text)

    metrics = scrape()
    uploads = {"method": "POST", "view": "api:image-list"}
    assert value(metrics, "django_http_responses_total_by_status_view_method_total", status="202", **uploads) == 1
    assert value(metrics, "django_http_requests_latency_seconds_by_view_method_count", **uploads) == 1
    assert value(metrics, "django_http_requests_latency_seconds_by_view_method_bucket", le="+Inf", **uploads) == 1
    assert value(metrics, "django_http_responses_total_by_status_total", status="201") >= 2  # patient, lesion

    # Each request on a new connection, to whichever of the two processes takes it: all are counted.
    health = {"status": "200", "view": "healthz", "method": "GET"}
    before = value(metrics, "django_http_responses_total_by_status_view_method_total", **health) or 0
    for _ in range(12):
        assert httpx.get(f"{stack.web_url}/healthz").status_code == 200
    after = value(scrape(), "django_http_responses_total_by_status_view_method_total", **health)
    assert after - before == 12


@pytest.mark.e2e
def test_worker_metrics_show_tasks_queues_predictions_and_explanations(stack, upload):
    from diagnosis.tasks import explain_image_task
    from webapp.celery import app

    # Two messages on a queue this worker does not consume: the depth is read from Redis at scrape time.
    with app.connection_for_write(stack.broker_url) as connection:
        for _ in range(2):
            explain_image_task.apply_async(args=[str(uuid.uuid4())], connection=connection)
    answer = httpx.get(stack.worker_metrics_url, timeout=10)
    assert answer.status_code == 200
    metrics = samples(answer.text)

    assert value(metrics, "celery_tasks_total", task=PREDICT, state="succeeded") >= 1
    assert value(metrics, "celery_tasks_total", task=RENDER, state="succeeded") >= 1
    assert value(metrics, "celery_tasks_total", task=PREDICT, state="failed") is None
    count = value(metrics, "celery_task_duration_seconds_count", task=PREDICT)
    assert count >= 1 and value(metrics, "celery_task_duration_seconds_bucket", task=PREDICT, le="+Inf") == count
    assert value(metrics, "celery_task_duration_seconds_sum", task=PREDICT) > 0
    assert value(metrics, "celery_queue_depth", queue="inference") == 0
    assert value(metrics, "celery_queue_depth", queue="explain") == 2
    assert value(metrics, "celery_broker_up") == 1
    assert value(metrics, "triage_predictions_total", label=upload.label, model_version=upload.model_version) == 1
    decided = [value(metrics, "triage_decisions_total", decision=decision, model_version=upload.model_version) or 0
               for decision in ("above_threshold", "below_threshold", "uncertain", "not_assessable")]  # fmt: skip
    assert sum(decided) == 1
    assert value(metrics, "triage_explanation_duration_seconds_count", method="gradcam") >= 1


@pytest.mark.e2e
def test_grafana_dashboard_queries_only_series_that_exist(stack, upload):
    dashboard = json.loads((ROOT / "docs" / "grafana-dashboard.json").read_text())
    panels = [panel for panel in dashboard["panels"] if panel["type"] != "row"]
    titles = " | ".join(panel["title"] for panel in panels).lower()
    for topic in ("request rate", "p95 latency", "5xx", "tasks by state", "queue depth", "predictions by label",
                  "p95 explanation"):  # fmt: skip
        assert topic in titles
    queried = {name for panel in panels for target in panel["targets"]
               for name in re.findall(r"([a-z_][a-z0-9_]*)\{", target["expr"])}  # fmt: skip
    web = httpx.get(f"{stack.web_url}/metrics", headers={"Authorization": f"Bearer {METRICS_TOKEN}"}).text
    worker = httpx.get(stack.worker_metrics_url).text
    exposed = {name for name, _ in samples(web)} | {name for name, _ in samples(worker)}
    assert len(queried) >= 7 and queried <= exposed, queried - exposed


# --- logs ---------------------------------------------------------------------------------------------


@pytest.mark.e2e
def test_one_upload_is_followed_by_its_request_id_through_web_and_worker_json_logs(stack, upload):
    worker_log = stack.worker.log_path.read_text(errors="replace")
    web_log = stack.web_log.read_text(errors="replace")
    worker_lines = json_lines(stack.worker.log_path)  # every line of the worker's output is a JSON object
    web_lines = json_lines(stack.web_log)  # gunicorn's own lines too
    for line in worker_lines + web_lines:
        assert {"time", "level", "logger", "message"} <= set(line), line

    # The web request that accepted the upload: its access line carries the request id and the image.
    accepted = [line for line in web_lines if line.get("request_id") == upload.request_id]
    assert any(line.get("image_id") == upload.image_id and line.get("status") == 202 for line in accepted), accepted
    # The worker's lines of that upload: the prediction task and the Grad-CAM drawing it enqueued.
    followed = [line for line in worker_lines if line.get("request_id") == upload.request_id]
    tasks = {line.get("task_name") for line in followed if line.get("image_id") == upload.image_id}
    assert {PREDICT, RENDER} <= tasks, followed
    assert all(line.get("task_id") for line in followed)

    for log in (web_log, worker_log):
        for secret in (PATIENT_REFERENCE, CLIENT_FILE_NAME, upload.token, upload.token[4:15], METRICS_TOKEN):
            assert secret not in log


# --- in this process ----------------------------------------------------------------------------------


def test_metrics_without_a_token_are_served_to_local_clients_only(db, settings):
    settings.METRICS_TOKEN = ""
    answer = Client().get("/metrics")
    assert answer.status_code == 200 and b"django_http_requests_total_by_method" in answer.content
    assert Client(REMOTE_ADDR="203.0.113.9").get("/metrics").status_code == 403
    assert Client().get("/metrics", HTTP_X_FORWARDED_FOR="203.0.113.9").status_code == 403  # a local proxy


def test_metrics_with_a_token_need_it_as_a_bearer_token(db, settings):
    settings.METRICS_TOKEN = "local-test-metrics-token"
    assert Client().get("/metrics").status_code == 403  # loopback is not enough once a token is set
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer local-test-metrics-tokem").status_code == 403
    assert Client().get("/metrics", HTTP_AUTHORIZATION="Bearer local-test-metrics-token").status_code == 200


def test_request_id_is_echoed_when_sane_and_replaced_otherwise(db):
    for given in ("3f0c2b8e9a1d4e5f", str(uuid.uuid4()), "0123456789abcdef" * 4):  # nginx's $request_id, a UUID
        assert Client().get("/healthz", HTTP_X_REQUEST_ID=given)["X-Request-ID"] == given
    for bad in ("PT-0042", "x" * 200, "id with spaces and a name", "", "jane.doe.1970-01-01", "jane-doe-19700101"):
        echoed = Client().get("/healthz", HTTP_X_REQUEST_ID=bad)["X-Request-ID"]
        assert echoed != bad and uuid.UUID(echoed).version == 4


def test_json_log_lines_carry_the_context_and_redact_credentials():
    from webapp import request_id as log_context
    from webapp.structured_logging import JsonFormatter, RedactSecretsFilter

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RedactSecretsFilter())
    test_logger = logging.getLogger("tests.observability")
    test_logger.addHandler(handler)
    test_logger.propagate = False
    token = "mlt_" + secrets.token_hex(32)
    bound = log_context.bind(request_id="0123456789abcdef", task_id="task-1", task_name="a.task")
    try:
        log_context.set_image_id("image-1")
        test_logger.warning("header was Authorization: Token %s", token, extra={"status": 401})
        try:
            raise ValueError(f"Bearer {token} and ?token={token}")
        except ValueError:
            test_logger.exception("failed")
    finally:
        log_context.unbind(bound)
        test_logger.removeHandler(handler)
    log_context.set_image_id("image-2")  # outside a request or a task: nothing to tag
    assert log_context.current() == {}

    text = stream.getvalue()
    assert token not in text and token[4:15] not in text
    first, second = (json.loads(line) for line in text.splitlines())
    assert first["message"] == "header was Authorization: Token [redacted]"
    assert (first["level"], first["logger"], first["status"]) == ("WARNING", "tests.observability", 401)
    assert (first["request_id"], first["image_id"], first["task_id"], first["task_name"]) == (
        "0123456789abcdef", "image-1", "task-1", "a.task",
    )  # fmt: skip
    assert "ValueError: Bearer [redacted]" in second["exception"] and "token=[redacted]" in second["exception"]
