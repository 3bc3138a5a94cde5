"""GET /api/v1/images/{id}/events/: an upload's state as server-sent events, the same JSON as the
status endpoint, first at once and then on each change, ending with `end` (or `timeout`)."""

from __future__ import annotations

import json
import threading
import time
import uuid

import pytest

from diagnosis.models import AuditEvent
from diagnosis.services.predictions import process_image
from tests.conftest import lesion_jpeg, upload_file

SSE = "text/event-stream"


def post_image(client) -> str:
    response = client.post("/api/v1/images/", {"image": upload_file(lesion_jpeg())}, format="multipart")
    assert response.status_code == 202, response.content
    return response.json()["id"]


def post_unannounced(client, monkeypatch) -> str:
    """An upload no worker is told about: it stays queued until the test itself processes it (a worker
    the session started must not take it)."""
    monkeypatch.setattr("diagnosis.services.images.announce_upload", lambda image_id, **_: None)
    return post_image(client)


def events(response, *, ids: dict | None = None) -> list[tuple[str, dict]]:
    """The (event, data) pairs of a whole stream, comments (`: ping`) left out; `ids` collects each
    event's id, where it has one."""
    text = b"".join(response.streaming_content).decode()
    parsed = []
    for block in text.strip().split("\n\n"):
        fields = dict(line.split(": ", 1) for line in block.splitlines() if not line.startswith(":"))
        if fields:
            parsed.append((fields["event"], json.loads(fields["data"])))
            if ids is not None and "id" in fields:
                ids[fields["event"]] = fields["id"]
    return parsed


def stream_while(client, image_id: str, action, *, delay: float = 0.3, **headers) -> tuple[list, object]:
    """The events of one stream, while another thread (its own database connection, as a worker has)
    runs `action` after `delay` seconds; and what the action returned."""
    outcome = []

    def run():
        from django.db import connection

        time.sleep(delay)
        try:
            outcome.append(action())
        finally:
            connection.close()

    thread = threading.Thread(target=run)
    thread.start()
    stream = events(client.get(f"/api/v1/images/{image_id}/events/", **headers))
    thread.join()
    return stream, outcome[0] if outcome else None


def test_a_finished_upload_streams_its_status_then_end(api_client, active_model, settings):
    settings.AUTO_EXPLAIN_METHODS = []
    image_id = post_image(api_client)
    assert process_image(image_id=image_id, worker_id="w") == "done"
    response = api_client.get(f"/api/v1/images/{image_id}/events/", HTTP_ACCEPT=SSE)
    assert response.status_code == 200 and response["Content-Type"].startswith(SSE)
    assert response["Cache-Control"] == "no-store" and response["X-Accel-Buffering"] == "no"
    ids = {}
    stream = events(response, ids=ids)
    assert [name for name, _ in stream] == ["status", "end"] and ids == {"end": "end"}
    status = api_client.get(f"/api/v1/images/{image_id}/status/").json()
    assert stream[0][1] == status  # the status endpoint's JSON, prediction included
    assert stream[0][1]["prediction"]["model_version"] == active_model.version
    assert stream[1][1] == {"state": "done"}
    # The stream's read of the result is audited once, like a status read.
    assert AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_IMAGE, object_id=image_id).count() == 2
    # EventSource reconnects after the stream closes, sending the last id: 204 stops it, unaudited.
    again = api_client.get(f"/api/v1/images/{image_id}/events/", HTTP_ACCEPT=SSE, HTTP_LAST_EVENT_ID="end")
    assert again.status_code == 204 and again.content == b""
    assert AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_IMAGE, object_id=image_id).count() == 2


def test_a_stream_without_a_final_state_times_out(api_client, settings):
    settings.STATUS_STREAM_SECONDS = 0.2
    image_id = post_image(api_client)  # no worker here: it stays queued
    started = time.monotonic()
    stream = events(api_client.get(f"/api/v1/images/{image_id}/events/"))
    assert [name for name, _ in stream] == ["status", "timeout"]
    assert stream[0][1]["state"] == "queued" and stream[0][1]["prediction"] is None
    assert stream[1][1] == {"state": "queued"}
    assert time.monotonic() - started >= 0.2


@pytest.mark.django_db(transaction=True)
def test_the_stream_reports_the_change_when_a_worker_finishes(api_client, active_model, settings, monkeypatch):
    settings.AUTO_EXPLAIN_METHODS = []
    settings.STATUS_STREAM_SECONDS = 30
    # The upload commits here: no message may reach a worker the session started, so that this test's
    # thread is the one that processes it, once the stream has seen it queued.
    image_id = post_unannounced(api_client, monkeypatch)
    stream, outcome = stream_while(api_client, image_id, lambda: process_image(image_id=image_id, worker_id="w"),
                                   HTTP_ACCEPT=SSE)  # fmt: skip
    assert outcome == "done"
    names = [name for name, _ in stream]
    assert names[0] == "status" and names[-2:] == ["status", "end"]
    states = [data["state"] for name, data in stream if name == "status"]
    assert states[0] == "queued" and states[-1] == "done"
    assert len(states) == len(set(states))  # one event per change, none repeated
    assert stream[-2][1]["prediction"]["label"] in ("benign", "malignant")


def test_another_clinics_image_and_a_bad_id_are_refused_before_any_stream(api_client, other_api_client):
    image_id = post_image(api_client)
    refused = other_api_client.get(f"/api/v1/images/{image_id}/events/")
    assert refused.status_code == 404 and refused["Content-Type"] == "application/json"
    assert "detail" in refused.json()
    # Whatever the client asked for, a refusal is the API's usual JSON (an EventSource sees an error).
    for asked in ({"HTTP_ACCEPT": SSE}, {"data": {"format": "event-stream"}}):
        again = other_api_client.get(f"/api/v1/images/{image_id}/events/", **asked)
        assert again.status_code == 404 and again["Content-Type"] == "application/json"
        assert again.json()["code"] == "not_found"
    assert api_client.get("/api/v1/images/not-a-uuid/events/").status_code in (400, 404)


@pytest.mark.django_db(transaction=True)  # closing a response closes the connection, as a server does
def test_streams_per_process_are_capped_and_given_back(api_client, settings, monkeypatch):
    from diagnosis.services import events as event_services

    settings.STATUS_STREAM_SECONDS = 5
    image_id = post_unannounced(api_client, monkeypatch)
    url = f"/api/v1/images/{image_id}/events/"
    held = []
    while event_services._STREAMS.acquire(blocking=False):  # every slot but the one the test uses
        held.append(True)
    event_services._STREAMS.release()
    held.pop()
    try:
        first = api_client.get(url)  # holds the last slot until it is closed
        refused = api_client.get(url)
        assert refused.status_code == 429 and refused["Retry-After"] == "5"
        assert "status" in refused.json()["detail"]
        first.close()  # the client went away: the slot is free again
        second = api_client.get(url)
        assert second.status_code == 200, second.content
        second.close()
    finally:
        for _ in held:
            event_services._STREAMS.release()
    settings.STATUS_STREAM_MAX = 0  # streams turned off
    assert api_client.get(url).status_code == 429


def test_a_quiet_stream_sends_keep_alive_comments(api_client, settings, monkeypatch):
    from diagnosis.services import events as event_services

    monkeypatch.setattr(event_services, "STREAM_PING_SECONDS", 0.1)
    settings.STATUS_STREAM_SECONDS = 0.5
    image_id = post_image(api_client)
    text = b"".join(api_client.get(f"/api/v1/images/{image_id}/events/").streaming_content).decode()
    assert text.count(": ping\n\n") >= 2 and text.rstrip().endswith('data: {"state": "queued"}')


@pytest.mark.django_db(transaction=True)
def test_an_image_deleted_during_the_stream_ends_it_with_an_error_event(api_client, settings, monkeypatch):
    from diagnosis.models import LesionImage

    settings.STATUS_STREAM_SECONDS = 30
    image_id = post_unannounced(api_client, monkeypatch)

    # Retention, or a patient's erasure, deletes the image while a client follows it.
    stream, deleted = stream_while(api_client, image_id, lambda: LesionImage.objects.filter(pk=image_id).delete())
    assert deleted[0] >= 1
    assert [name for name, _ in stream] == ["status", "error"]
    assert stream[1][1]["code"] == "not_found"


@pytest.mark.django_db(transaction=True)
def test_a_refused_stream_reads_and_audits_nothing(api_client, active_model, settings, monkeypatch):
    settings.AUTO_EXPLAIN_METHODS = []
    settings.STATUS_STREAM_MAX = 0
    image_id = post_unannounced(api_client, monkeypatch)
    assert process_image(image_id=image_id, worker_id="w") == "done"
    assert api_client.get(f"/api/v1/images/{image_id}/events/").status_code == 429
    assert not AuditEvent.objects.filter(action=AuditEvent.Action.VIEW_IMAGE, object_id=image_id).exists()


def test_one_user_cannot_take_every_stream_of_the_process(api_client, clinician, settings, monkeypatch):
    from diagnosis.services import events as event_services

    settings.STATUS_STREAM_MAX_PER_USER = 1
    assert event_services._STREAMS._value >= 2  # two slots free: a refusal below is the user's share

    def queued():
        return {"state": "queued"}

    def open_stream(user_id):
        return event_services.open_status_stream(image_id=uuid.uuid4(), read=queued, user_id=user_id)

    held = open_stream(clinician.pk)  # a stream of this user
    try:
        image_id = post_unannounced(api_client, monkeypatch)
        refused = api_client.get(f"/api/v1/images/{image_id}/events/")
        assert refused.status_code == 429 and refused["Retry-After"] == "5"
        other = open_stream(clinician.pk + 1000)  # another user: served
        other.close()
    finally:
        held.close()
    again = open_stream(clinician.pk)  # the share came back
    again.close()
    settings.STATUS_STREAM_MAX_PER_USER = 2
    both = [open_stream(user_id=clinician.pk) for _ in range(2)]
    for stream in both:
        stream.close()
