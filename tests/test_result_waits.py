"""Results without polling: `?wait=N` and `Prefer: wait=N` on uploads and GETs, woken by the worker's
notification through each transport (Redis, PostgreSQL LISTEN/NOTIFY, the embedded default's local
sockets); the caps that keep waits from taking the upload threads; a client that hangs up; a worker
killed while clients wait.

The in-process tests publish from a second thread of this process, as a worker process would: the
message goes through the real transport (Redis pub/sub, PostgreSQL, a Unix socket) and back to this
process's listener thread. The gunicorn and fault tests use real processes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import threading
import time
import uuid

import httpx
import pytest
from django.db import connection

from diagnosis.models import ImageState, LesionImage
from diagnosis.services import notify, waiting
from diagnosis.services.predictions import process_image, process_images
from tests.conftest import lesion_jpeg, upload_file, wait_for, wait_until_serving
from tests.test_faults import SWEEPER_ENV, Processes, free_port, tail, wait_ready, wait_showing_log

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture(params=["redis", "postgres", "local"])
def transport(request, settings, tmp_path):
    settings.RESULT_NOTIFY = request.param
    settings.VAR_DIR = tmp_path  # the local transport's sockets
    settings.AUTO_EXPLAIN_METHODS = []
    yield request.param
    notify.stop_listeners()  # the PostgreSQL listener's connection would keep the test database open


@pytest.fixture
def unannounced(monkeypatch):
    """Uploads no worker is told about: they stay queued until the test processes them."""
    monkeypatch.setattr("diagnosis.services.images.announce_upload", lambda image_id, **_: None)
    monkeypatch.setattr("diagnosis.services.images.announce_batch", lambda image_ids, **_: None)


def later(action, delay: float = 0.5) -> threading.Thread:
    """Run `action` on another thread (with its own database connection, as a worker has) after `delay`."""

    def run():
        time.sleep(delay)
        try:
            action()
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    return thread


def process_next_queued(count: int = 1):
    """What a worker does with the next queued uploads, oldest first."""
    ids = [str(pk) for pk in LesionImage.objects.filter(state=ImageState.QUEUED).order_by("enqueued_at")
           .values_list("pk", flat=True)[:count]]  # fmt: skip
    assert len(ids) == count, ids
    process_images(image_ids=ids, worker_id=f"test-{uuid.uuid4().hex[:6]}")


# --- the wait option, through each transport -----------------------------------------------------------------


def test_an_upload_that_waits_gets_201_with_its_prediction(api_client, active_model, transport, unannounced):
    delivered = notify.delivered()
    worker = later(process_next_queued)
    response = api_client.post("/api/v1/images/?wait=20", {"image": upload_file(lesion_jpeg())}, format="multipart")
    worker.join()
    assert response.status_code == 201, response.content
    body = response.json()
    assert body["state"] == "done" and response["Location"] == body["status_url"]
    assert body["prediction"]["model_version"] == active_model.version
    assert "Preference-Applied" not in response  # asked with the parameter, not the header
    assert "Prefer" in response["Vary"]
    # Woken by the transport's message (the listener delivered it), not by the read at the deadline.
    assert notify.listening() and notify.delivered() > delivered
    assert waiting.waiting_now() == 0


def test_a_status_read_that_waits_is_woken_by_the_worker(api_client, active_model, transport, unannounced):
    image_id = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart").json()[
        "id"
    ]
    worker = later(lambda: process_image(image_id=image_id, worker_id="w"))
    response = api_client.get(f"/api/v1/images/{image_id}/status/", HTTP_PREFER="respond-async, wait=20")
    worker.join()
    assert response.status_code == 200, response.content
    assert response.json()["state"] == "done" and response.json()["prediction"]["probability_malignant"] >= 0
    assert response["Preference-Applied"] == "wait=20"
    # The full record waits the same way; already final, it answers at once.
    record = api_client.get(f"/api/v1/images/{image_id}/?wait=5")
    assert record.status_code == 200 and record.json()["prediction"] is not None


def test_a_wait_that_ends_first_answers_202_and_stores_the_upload(api_client, settings, unannounced):
    settings.RESULT_WAIT_MAX_SECONDS = 1
    started = time.monotonic()
    response = api_client.post(
        "/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart", HTTP_PREFER="wait=600"
    )
    assert response.status_code == 202 and response.json()["state"] == "queued"
    assert response["Preference-Applied"] == "wait=1"  # lowered to the server's maximum
    assert time.monotonic() - started >= 1  # it did wait
    image_id = response.json()["id"]
    assert LesionImage.objects.filter(pk=image_id, state=ImageState.QUEUED).exists()
    for url in (f"/api/v1/images/{image_id}/status/?wait=1", f"/api/v1/images/{image_id}/?wait=1"):
        later_answer = api_client.get(url)
        assert later_answer.status_code == 202 and later_answer.json()["state"] == "queued", url
    assert api_client.get(f"/api/v1/images/{image_id}/status/").status_code == 200  # no wait: as before


@pytest.mark.parametrize(
    ("query", "header", "field"),
    [("?wait=abc", None, "wait"), ("?wait=-1", None, "wait"), ("?wait=1.5", None, "wait"), ("?wait=", None, "wait"),
     ("?wait=31", None, "wait"), ("", "wait=soon", "Prefer"), ("", "wait=-3", "Prefer")],
)  # fmt: skip
def test_invalid_waits_are_400_and_store_nothing(api_client, settings, query, header, field):
    settings.RESULT_WAIT_MAX_SECONDS = 30
    extra = {"HTTP_PREFER": header} if header else {}
    before = LesionImage.objects.count()
    response = api_client.post(f"/api/v1/images/{query}", {"image": upload_file(lesion_jpeg())}, format="multipart",
                               **extra)  # fmt: skip
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"] and response.json()["errors"][field][0].startswith("wait ")
    assert LesionImage.objects.count() == before
    batch = api_client.post(f"/api/v1/images/batch/{query}", {"images": [upload_file(lesion_jpeg())]},
                            format="multipart", **extra)  # fmt: skip
    assert batch.status_code == 400 and LesionImage.objects.count() == before
    image = LesionImage.objects.first()
    if image is not None:
        assert api_client.get(f"/api/v1/images/{image.pk}/status/{query}", **extra).status_code == 400


def test_a_batch_that_waits_gets_every_prediction(api_client, active_model, settings, unannounced):
    settings.AUTO_EXPLAIN_METHODS = []
    worker = later(lambda: process_next_queued(2))
    files = [upload_file(lesion_jpeg(seed=1)), upload_file(b"not a photo", "x.jpg"), upload_file(lesion_jpeg(seed=2))]
    response = api_client.post("/api/v1/images/batch/?wait=20", {"images": files}, format="multipart")
    worker.join()
    assert response.status_code == 201, response.content
    body = response.json()
    assert [item["position"] for item in body["accepted"]] == [0, 2] and body["rejected"][0]["position"] == 1
    for item in body["accepted"]:
        assert item["state"] == "done" and item["prediction"]["model_version"] == active_model.version
    progress = api_client.get(f"{body['status_url']}?wait=5")
    assert progress.status_code == 200 and progress.json()["finished"]
    assert {image["id"]: image["prediction"]["probability_malignant"] for image in progress.json()["images"]} == {
        item["id"]: item["prediction"]["probability_malignant"] for item in body["accepted"]
    }


def test_a_batch_read_that_ends_first_answers_202(api_client, settings, unannounced):
    response = api_client.post("/api/v1/images/batch/", {"images": [upload_file(lesion_jpeg())]}, format="multipart")
    assert response.status_code == 202
    progress = api_client.get(response.json()["status_url"], HTTP_PREFER="wait=1")
    assert progress.status_code == 202 and not progress.json()["finished"]
    assert progress.json()["images"][0]["prediction"] is None


def test_waits_beyond_the_caps_are_answered_at_once(api_client, other_api_client, settings, unannounced):
    image_id = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart").json()[
        "id"
    ]
    settings.RESULT_WAIT_MAX_PER_PROCESS, settings.RESULT_WAIT_MAX_PER_USER = 2, 1
    release = threading.Event()
    user_id = LesionImage.objects.get(pk=image_id).uploaded_by_id
    holder = threading.Thread(
        target=waiting.wait_for, args=(release.is_set,),
        kwargs={"ids": [image_id], "seconds": 20, "ready": bool, "user_id": user_id},
    )  # fmt: skip
    holder.start()
    try:
        wait_for(lambda: waiting.waiting_now() == 1, 5, interval=0.02, message="the first wait")
        # This user's share is taken: answered at once, as without the option (no Preference-Applied).
        mine = api_client.get(f"/api/v1/images/{image_id}/status/", HTTP_PREFER="wait=10")
        assert mine.status_code == 202 and "Preference-Applied" not in mine
        settings.RESULT_WAIT_MAX_PER_PROCESS = 1  # and now the process's too, for anyone
        theirs = other_api_client.get(f"/api/v1/images/{image_id}/status/", HTTP_PREFER="wait=10")
        assert theirs.status_code == 404  # another clinic's image: the 404 comes first, whatever the wait
    finally:
        release.set()
        notify.wake_all()
        holder.join()
    assert waiting.waiting_now() == 0
    settings.RESULT_WAIT_MAX_PER_PROCESS = 0  # waits off
    assert "Preference-Applied" not in api_client.get(f"/api/v1/images/{image_id}/status/", HTTP_PREFER="wait=5")


def test_a_lost_listener_connection_wakes_the_waiters_to_read_again(api_client, active_model, transport, unannounced):
    """A message published while the listener reconnects is not lost for good: every waiter reads once
    when the listener is back."""
    image_id = api_client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart").json()[
        "id"
    ]
    with notify.watching([image_id]) as watch:
        wait_for(notify.listening, 10, interval=0.05, message="the listener")
        watch.wait(0)  # forget the wake-up of the first connection
        notify.wake_all()  # what a reconnection does
        assert watch.wait(2)
        assert notify.deliver(json.dumps({"s": "processing", "ids": [image_id]})) == 0  # final states only
        assert notify.deliver(json.dumps({"s": "done", "ids": [image_id]})) == 1
        assert notify.deliver("not json") == 0


# --- the schema -------------------------------------------------------------------------------------------------


def test_the_schema_documents_the_wait_option_and_both_answers(db):
    from drf_spectacular.generators import SchemaGenerator

    schema = SchemaGenerator().get_schema(request=None, public=True)
    for path, method, answers in [
        ("/api/v1/images/", "post", {"201", "202"}),
        ("/api/v1/images/batch/", "post", {"201", "202"}),
        ("/api/v1/images/{id}/", "get", {"200", "202"}),
        ("/api/v1/images/{id}/status/", "get", {"200", "202"}),
        ("/api/v1/batches/{id}/", "get", {"200", "202"}),
    ]:
        operation = schema["paths"][path][method]
        parameters = {(p["in"], p["name"]) for p in operation["parameters"]}
        assert {("query", "wait"), ("header", "Prefer")} <= parameters, (path, method)
        assert answers <= set(operation["responses"]), (path, method)
        assert "wait" in operation["description"], (path, method)


# --- real processes ---------------------------------------------------------------------------------------------


def gunicorn(processes: Processes, env: dict[str, str]) -> str:
    port = free_port()
    process, log_path = processes.popen(
        [sys.executable, "-m", "gunicorn", "webapp.wsgi", "-c", "webapp/gunicorn.conf.py", "-b", f"127.0.0.1:{port}"],
        env={**env, "PROMETHEUS_MULTIPROC_DIR": str(processes.folder / f"metrics-{port}")}, log_name=f"web-{port}.log",
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    wait_until_serving(url, process, log_path)
    return url


@pytest.mark.e2e
def test_gunicorn_frees_the_thread_of_a_client_that_hangs_up_and_wakes_the_others(
    worker_env, faults_setup, tmp_path, settings
):  # fmt: skip
    """One gunicorn process with one waiting slot. A client that hangs up gives the slot back within
    seconds (not at its 30 s deadline); a waiting client is woken when this process, as a worker would,
    stores the prediction and publishes on Redis."""
    token, _ = faults_setup
    with Processes(tmp_path) as processes:
        redis = processes.redis()  # a broker nobody consumes: uploads stay queued
        env = {**worker_env, "CELERY_BROKER_URL": redis.url, "GUNICORN_WORKERS": "1", "GUNICORN_THREADS": "4",
               "RESULT_WAIT_MAX_PER_PROCESS": "1", "AUTO_EXPLAIN_METHODS": "none"}  # fmt: skip
        url = gunicorn(processes, env)
        headers = {"Authorization": f"Token {token}"}
        with httpx.Client(base_url=url, headers=headers, timeout=60) as client:
            image_id = client.post("/api/v1/images/", files={"image": ("a.jpg", lesion_jpeg(), "image/jpeg")}).json()[
                "id"
            ]
            path = f"/api/v1/images/{image_id}/status/"
            hung_up = socket.create_connection(("127.0.0.1", int(url.rsplit(":", 1)[1])))
            hung_up.sendall(f"GET {path}?wait=30 HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Token {token}\r\n\r\n"
                            .encode())  # fmt: skip

            def slot_taken():
                answer = client.get(path, headers={"Prefer": "wait=1"})
                return "Preference-Applied" not in answer.headers

            hung_up.settimeout(1.5)  # not answered at once: it holds the only slot and waits
            with pytest.raises(TimeoutError):
                hung_up.recv(3000)
            assert slot_taken()
            hung_up.close()
            # Freed when the server sees the closed socket: long before the 30 s deadline.
            wait_for(lambda: not slot_taken(), 10, interval=0.2, message="the hung-up client's slot to be freed")

            settings.RESULT_NOTIFY = "redis"  # publish as the worker would: Redis pub/sub is server-wide
            settings.RESULT_NOTIFY_REDIS_URL = redis.url
            worker = later(lambda: process_image(image_id=image_id, worker_id="w"), delay=1.0)
            answer = client.get(path, params={"wait": 25})
            worker.join()
            assert answer.status_code == 200 and answer.json()["state"] == "done", answer.text


@pytest.mark.e2e
def test_clients_waiting_when_their_worker_is_killed_get_202_and_the_upload_still_completes(
    worker_env, faults_setup, tmp_path
):  # fmt: skip
    token, _ = faults_setup
    with Processes(tmp_path) as processes:
        redis = processes.redis()
        env = {**worker_env, **SWEEPER_ENV, "CELERY_BROKER_URL": redis.url}
        web = processes.web(env).wait_ready()
        with web.client(token) as client:
            ids = [client.post("/api/v1/images/", files={"image": ("a.jpg", lesion_jpeg(seed=seed), "image/jpeg")})
                   .json()["id"] for seed in range(40)]  # fmt: skip
        first = wait_ready(processes.worker(env))
        answers = {}

        def wait_on(image_id):
            with web.client(token) as waiting_client:
                answers[image_id] = waiting_client.get(f"/api/v1/images/{image_id}/status/?wait=15")

        # Clients wait for the last uploads (the worker takes the oldest first), then the worker is killed
        # in the middle of a batch, while they wait.
        clients = [threading.Thread(target=wait_on, args=(image_id,)) for image_id in ids[-3:]]
        for thread in clients:
            thread.start()

        def mid_batch():
            return (LesionImage.objects.filter(pk__in=ids, state=ImageState.DONE).count() >= 2
                    and LesionImage.objects.filter(pk__in=ids, state=ImageState.PROCESSING).exists())  # fmt: skip

        wait_showing_log(mid_batch, 60, "the worker to be mid-batch", first, interval=0.002)
        os.killpg(first.process.pid, signal.SIGKILL)
        first.process.wait(timeout=10)
        assert all(thread.is_alive() for thread in clients), "a client stopped waiting before the kill"
        for thread in clients:
            thread.join()
        unfinished = [image_id for image_id, answer in answers.items()
                      if answer.json()["state"] not in ("done", "failed")]  # fmt: skip
        assert unfinished, "the worker finished the waited-for uploads before the kill: the test tested nothing"
        for image_id in unfinished:
            assert answers[image_id].status_code == 202, (answers[image_id].status_code, tail(web.log_path))
        second = wait_ready(processes.worker(env, beat=True))
        with web.client(token) as client:
            for image_id in unfinished:

                def done(image_id=image_id):
                    answer = client.get(f"/api/v1/images/{image_id}/status/?wait=6")
                    return answer if answer.status_code == 200 else None

                answer = wait_showing_log(done, 90, f"{image_id} to complete after the kill", second, interval=0)
                assert answer.json()["state"] == "done", answer.text


@pytest.mark.parametrize("name", ["RESULT_NOTIFY", "GRADCAM_PICTURES"])
def test_a_mistyped_choice_is_a_system_check_error(settings, name):
    from django.core.checks import run_checks

    assert not [error for error in run_checks() if error.id == "diagnosis.E002"]
    setattr(settings, name, "redsi")
    errors = [error for error in run_checks() if error.id == "diagnosis.E002"]
    assert len(errors) == 1 and name in errors[0].msg
