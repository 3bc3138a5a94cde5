"""Drift and performance monitoring with the database: per-upload features stored by the real
process_image, drift reports with their Evidently files, alerts (e-mail through Django's locmem backend,
the webhook through a real local HTTP server), live performance on confirmed outcomes, the staff-only
dashboard in the admin, and "run now" through the real broker and a real worker.

The drift reports here compare planted feature values (a few features, drawn from known distributions)
so each verdict is certain; tests/mlcore/test_drift.py checks the statistics on real photos."""

from __future__ import annotations

import io
import json
import socket
import threading
import uuid
from datetime import timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from unittest import mock

import numpy as np
import pytest
from django.core.files.storage import default_storage
from django.test import Client
from django.utils import timezone
from PIL import Image
from scipy.stats import ks_2samp

from diagnosis.models import (
    DriftReport,
    Feedback,
    ImageState,
    LesionImage,
    ModelVersion,
    MonitoringAlert,
    Prediction,
    ReferenceFeature,
    UploadFeatures,
)
from diagnosis.services.feedback import record_assessment, record_outcome
from diagnosis.services.images import submit_image
from diagnosis.services.monitoring import live_performance, record_upload_features, reference_rows, run_drift_report
from diagnosis.services.registry import register_model
from mlcore import drift
from tests.conftest import lesion_jpeg, upload_file, wait_for
from tests.factories import UserFactory, grant

DASHBOARD = "/admin/monitoring/drift/"
RUN_NOW = "/admin/monitoring/drift/run/"
PLANTED = ("brightness", "contrast", "probability_malignant", "embedding_1")
REFERENCE_HELD_OUT = 80
REFERENCE_TRAIN = 40
WINDOW = 30


def planted_rows(count: int, *, seed: int, shift: float = 0.0) -> list[dict[str, float]]:
    """Feature rows from fixed distributions; `shift` moves brightness and the first embedding
    component by that many standard deviations."""
    rng = np.random.default_rng(seed)
    return [
        {
            "brightness": float(120 + 10 * shift + rng.normal(0, 10)),
            "contrast": float(40 + rng.normal(0, 5)),
            "probability_malignant": float(rng.beta(2, 5)),
            "embedding_1": float(shift + rng.normal(0, 1)),
        }
        for _ in range(count)
    ]


def reference_set() -> list[dict]:
    """Held-out rows (validation and test) like the uploads, and training rows that are not (the model
    is over-confident on its training images): only the held-out rows may be the reference."""
    held_out = [
        {"split": "validation" if index % 2 else "test", "label": "benign", "path": f"ref/{index}.jpg",
         "features": values}
        for index, values in enumerate(planted_rows(REFERENCE_HELD_OUT, seed=1))
    ]  # fmt: skip
    train = [
        {"split": "train", "label": "malignant", "path": f"train/{index}.jpg",
         "features": {**values, "brightness": values["brightness"] + 100}}
        for index, values in enumerate(planted_rows(REFERENCE_TRAIN, seed=2))
    ]  # fmt: skip
    return held_out + train


@pytest.fixture
def drift_settings(settings):
    settings.DRIFT_MIN_UPLOADS = 25
    settings.DRIFT_MIN_REFERENCE = 60
    settings.DRIFT_ALPHA = 0.05
    settings.DRIFT_WINDOW_DAYS = 7.0
    settings.DRIFT_WINDOW_UPLOADS = 0
    settings.ALERT_EMAILS = []
    settings.ALERT_WEBHOOK_URL = ""
    settings.ALERT_MIN_UPLOADS = 20
    settings.ALERT_FAILED_SHARE = 0.10
    settings.ALERT_LATENCY_P95_SECONDS = 120.0
    settings.ALERT_COOLDOWN_MINUTES = 0  # each episode on its own, unless a test sets a cooldown
    settings.AUTO_EXPLAIN_METHODS = []
    return settings


@pytest.fixture
def monitored_model(db, tiny_checkpoint, drift_settings) -> ModelVersion:
    """The active model, registered with a planted reference set."""
    return register_model(
        checkpoint=tiny_checkpoint, version=f"monitored-{uuid.uuid4().hex[:8]}", activate=True,
        reference_features=reference_set(),
    )  # fmt: skip


@pytest.fixture
def ops_user(db, django_user_model):
    """The staff member who receives alerts (active staff with an e-mail address)."""
    user = django_user_model.objects.create_user(
        "ops", email="ops@example.org", password="correct-horse-battery", is_staff=True
    )
    return grant(user, "view_driftreport", "change_driftreport")


def upload_images(count: int, *, clinician, clinic, capture, start=None, state=ImageState.DONE, wait_s: float = 2.0):
    """`count` real uploads through submit_image (their enqueue callbacks are captured, never run),
    created one second apart from `start`, then moved to `state`."""
    start = start or timezone.now() - timedelta(hours=1)
    images = []
    with capture() as callbacks:
        for index in range(count):
            images.append(
                submit_image(uploader=clinician, clinic=clinic, upload=upload_file(lesion_jpeg(seed=index, size=40)))
            )
    assert len(callbacks) == count  # one enqueue per upload, captured and not run
    for index, image in enumerate(images):
        created = start + timedelta(seconds=index)
        processed = created + timedelta(seconds=wait_s) if state == ImageState.DONE else None
        LesionImage.objects.filter(pk=image.pk).update(created_at=created, state=state, processed_at=processed)
        image.refresh_from_db()
    return images


def upload_window(rows, *, model_version, clinician, clinic, capture, start=None) -> list[LesionImage]:
    """Scored uploads whose stored drift features are `rows`."""
    images = upload_images(len(rows), clinician=clinician, clinic=clinic, capture=capture, start=start)
    UploadFeatures.objects.bulk_create(
        [UploadFeatures(image=image, model_version=model_version, values=values) for image, values in zip(
            images, rows, strict=True)]
    )  # fmt: skip
    return images


# --- the reference set ---------------------------------------------------------------------------


def test_reference_is_the_held_out_images_unless_there_are_too_few(monitored_model, drift_settings):
    rows = reference_rows(monitored_model)
    assert len(rows) == REFERENCE_HELD_OUT
    assert max(row["brightness"] for row in rows) < 200  # no training row (those are +100)

    drift_settings.DRIFT_MIN_REFERENCE = REFERENCE_HELD_OUT + 1
    assert len(reference_rows(monitored_model)) == REFERENCE_HELD_OUT + REFERENCE_TRAIN
    assert ReferenceFeature.objects.filter(model_version=monitored_model, split="train").count() == REFERENCE_TRAIN


# --- reports -------------------------------------------------------------------------------------


def test_too_few_uploads_is_insufficient_data_and_says_how_many_are_needed(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox
):
    upload_window(planted_rows(10, seed=5, shift=3.0), model_version=monitored_model, clinician=clinician,
                  clinic=clinic, capture=django_capture_on_commit_callbacks)  # fmt: skip

    report = run_drift_report(triggered_by="tests")
    assert report.status == DriftReport.Status.INSUFFICIENT
    assert report.message == "Too few uploads to judge: 10 in this window, at least 25 are needed."
    assert (report.current_count, report.reference_count) == (10, REFERENCE_HELD_OUT)
    assert report.features == [] and report.drifted_features == [] and not report.snapshot and not report.html
    assert report.triggered_by == "tests" and report.model_version == monitored_model
    assert report.operations["uploads"] == 10
    assert not MonitoringAlert.objects.exists() and mailoutbox == []  # too little to judge: no alert


def test_without_an_active_model_the_report_says_so(db, drift_settings):
    report = run_drift_report()
    assert report.status == DriftReport.Status.INSUFFICIENT and report.model_version is None
    assert report.message == "No model is active, so there is no reference set to compare with."
    assert report.triggered_by == "schedule"


def test_drift_report_stores_verdict_features_operations_and_evidently_files(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, ops_user
):
    current = planted_rows(WINDOW, seed=7, shift=2.5)
    images = upload_window(current, model_version=monitored_model, clinician=clinician, clinic=clinic,
                           capture=django_capture_on_commit_callbacks)  # fmt: skip
    # Scored by another model version, or older than the window: not part of this report.
    retired = ModelVersion.objects.create(version="retired", arch="resnet_tiny", input_size=64,
                                          class_names=["benign", "malignant"], threshold=0.5, weights="models/x.pt",
                                          weights_sha256="0" * 64)  # fmt: skip
    upload_window(planted_rows(5, seed=8, shift=9.0), model_version=retired, clinician=clinician, clinic=clinic,
                  capture=django_capture_on_commit_callbacks)  # fmt: skip
    upload_window(planted_rows(5, seed=9, shift=9.0), model_version=monitored_model, clinician=clinician,
                  clinic=clinic, capture=django_capture_on_commit_callbacks,
                  start=timezone.now() - timedelta(days=8))  # fmt: skip

    report = run_drift_report(triggered_by="tests")
    report.refresh_from_db()

    assert report.status == DriftReport.Status.DRIFT
    assert (report.current_count, report.reference_count) == (WINDOW, REFERENCE_HELD_OUT)
    assert report.window_description == "last 7 days"
    assert report.window_end - report.window_start == timedelta(days=7)
    assert all(report.window_start <= image.created_at <= report.window_end for image in images)
    assert report.alpha == 0.05 and report.method == "ks" and report.duration_ms > 0
    assert [f["feature"] for f in report.features] == list(PLANTED)
    assert set(report.drifted_features) >= {"brightness", "embedding_1"}
    assert "contrast" not in report.drifted_features  # drawn from the reference distribution
    assert report.embedding_drifted is True
    assert report.message.startswith(f"Drift in {len(report.drifted_features)} of 4 features")

    reference = drift.columns(reference_rows(monitored_model), PLANTED)
    window = drift.columns(current, PLANTED)
    thresholds, rejected = drift.holm([ks_2samp(reference[n], window[n]).pvalue for n in PLANTED], 0.05)
    for feature, threshold, drifted in zip(report.features, thresholds, rejected, strict=True):
        name = feature["feature"]
        assert feature["p_value"] == pytest.approx(ks_2samp(reference[name], window[name]).pvalue, rel=1e-9), name
        assert feature["threshold"] == pytest.approx(threshold) and feature["drifted"] is drifted
        assert feature["label"] == drift.FEATURE_LABELS[name] and feature["group"] == drift.FEATURE_GROUPS[name]
        assert (feature["reference_n"], feature["current_n"]) == (REFERENCE_HELD_OUT, WINDOW)
        assert feature["current_median"] == pytest.approx(np.median(window[name]))
        assert sum(feature["histogram"]["current"]) == WINDOW

    # Every upload of the window (the retired model's and the old ones included) is counted once.
    assert report.operations == {"uploads": WINDOW + 5, "failed": 0, "failed_share": 0.0, "latency_p50_s": 2.0,
                                 "latency_p95_s": 2.0}  # fmt: skip

    # Evidently's snapshot and HTML, in storage under the report's folder.
    assert report.snapshot.name == f"monitoring/drift/{report.pk}/snapshot.json"
    assert report.html.name == f"monitoring/drift/{report.pk}/report.html"
    assert default_storage.exists(report.snapshot.name) and default_storage.exists(report.html.name)
    with default_storage.open(report.snapshot.name, "rb") as handle:
        snapshot = json.load(handle)
    p_values = {m["config"]["column"]: m["value"] for m in snapshot["metrics"] if "column" in m["config"]}
    assert p_values == pytest.approx({f["feature"]: f["p_value"] for f in report.features}, rel=1e-9)

    # The drift alert opened with this report, and one e-mail went out.
    alert = MonitoringAlert.objects.get()
    assert (alert.kind, alert.report, alert.closed_at) == (MonitoringAlert.Kind.DRIFT, report, None)
    assert len(mailoutbox) == 1


def test_stored_evidently_html_is_the_rendered_report(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, client, ops_user
):
    """The HTML file behind the dashboard's "Open the full Evidently report" link holds the report."""
    upload_window(planted_rows(WINDOW, seed=7, shift=2.5), model_version=monitored_model, clinician=clinician,
                  clinic=clinic, capture=django_capture_on_commit_callbacks)  # fmt: skip
    report = run_drift_report()
    with default_storage.open(report.html.name, "rb") as handle:
        stored = handle.read()
    client.force_login(ops_user)
    response = client.get(f"/admin/monitoring/drift/{report.pk}/evidently/")
    assert b"".join(response.streaming_content) == stored
    assert len(stored) > 10_000, f"the stored Evidently HTML is {len(stored)} bytes"
    assert b"<html" in stored.lower()


def test_a_drift_check_that_raises_is_stored_as_failed(monitored_model, clinician, clinic,
                                                       django_capture_on_commit_callbacks):  # fmt: skip
    upload_window(planted_rows(WINDOW, seed=7), model_version=monitored_model, clinician=clinician, clinic=clinic,
                  capture=django_capture_on_commit_callbacks)  # fmt: skip
    ReferenceFeature.objects.create(model_version=monitored_model, split="test", label="benign", path="bad",
                                    values=[1, 2, 3])  # a corrupt row: a list, not a feature mapping  # fmt: skip

    report = run_drift_report()  # never raises
    assert report.status == DriftReport.Status.FAILED
    assert report.message.startswith("The drift check failed:")
    assert report.current_count == WINDOW and report.operations["uploads"] == WINDOW


# --- alerts --------------------------------------------------------------------------------------


class Webhook:
    """A real HTTP server on 127.0.0.1 that records each POST and answers `status`."""

    def __init__(self, status: int = 204):
        self.received: list[dict] = []
        self.status = status
        hook = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = self.rfile.read(int(self.headers["Content-Length"]))
                hook.received.append(
                    {"path": self.path, "content_type": self.headers["Content-Type"], "body": json.loads(body)}
                )
                self.send_response(hook.status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, format, *args):  # quiet
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/alerts"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def webhook():
    server = Webhook()
    yield server
    server.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_alerts_are_deduplicated_closed_and_reopened(
    monitored_model,
    clinician,
    clinic,
    django_capture_on_commit_callbacks,
    mailoutbox,
    webhook,
    drift_settings,
    ops_user,
    django_user_model,
):
    drift_settings.DRIFT_WINDOW_UPLOADS = WINDOW  # each report judges the newest 30 uploads
    drift_settings.ALERT_WEBHOOK_URL = webhook.url
    # Not recipients: inactive staff, staff without an address, a clinician who is not staff.
    django_user_model.objects.create_user("gone", email="gone@example.org", is_staff=True, is_active=False)
    django_user_model.objects.create_user("nomail", email="", is_staff=True)
    clinician.email = "clinician@example.org"
    clinician.save()
    now = timezone.now()

    def window(shift: float, seed: int, hours_ago: int):
        upload_window(planted_rows(WINDOW, seed=seed, shift=shift), model_version=monitored_model,
                      clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks,
                      start=now - timedelta(hours=hours_ago))  # fmt: skip

    window(shift=2.5, seed=11, hours_ago=3)
    first, second = run_drift_report(), run_drift_report()
    assert (first.status, second.status) == ("drift", "drift")
    alert = MonitoringAlert.objects.get()  # ONE alert for two drifted reports
    assert alert.kind == MonitoringAlert.Kind.DRIFT and alert.report == first and alert.closed_at is None
    assert alert.reports_seen == 2 and alert.last_seen_at >= alert.opened_at
    assert alert.message.startswith(
        f"Uploads in the window (last {WINDOW} uploads) no longer look like the training data "
        f"of {monitored_model.version}. Drift in"
    )
    assert alert.emailed_to == ["ops@example.org"] and alert.email_error == ""
    assert alert.webhook_status == "HTTP 204"
    assert len(mailoutbox) == 1  # ONE e-mail
    mail = mailoutbox[0]
    assert mail.subject == "[Lesion triage] Data drift alert" and mail.to == ["ops@example.org"]
    assert alert.message in mail.body and "drift dashboard" in mail.body
    assert len(webhook.received) == 1
    posted = webhook.received[0]
    assert posted["path"] == "/hooks/alerts" and posted["content_type"] == "application/json"
    assert posted["body"] == {"kind": "drift", "message": alert.message, "opened_at": alert.opened_at.isoformat(),
                              "report_id": first.pk}  # fmt: skip

    window(shift=0.0, seed=12, hours_ago=2)  # the newest 30 look like the reference again
    third = run_drift_report()
    assert third.status == "no_drift", third.message
    alert.refresh_from_db()
    assert alert.closed_at is not None and alert.reports_seen == 2
    assert len(mailoutbox) == 1 and len(webhook.received) == 1  # closing notifies nobody

    window(shift=-2.5, seed=13, hours_ago=1)
    fourth = run_drift_report()
    assert fourth.status == "drift"
    assert MonitoringAlert.objects.count() == 2
    reopened = MonitoringAlert.objects.get(closed_at__isnull=True)
    assert reopened.pk != alert.pk and reopened.report == fourth and reopened.reports_seen == 1
    assert len(mailoutbox) == 2
    assert [hook["body"]["report_id"] for hook in webhook.received] == [first.pk, fourth.pk]
    assert not MonitoringAlert.objects.exclude(kind=MonitoringAlert.Kind.DRIFT).exists()  # operations are fine


def test_failing_webhook_is_recorded_on_the_alert_not_raised(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, drift_settings
):
    drift_settings.ALERT_EMAILS = ["oncall@example.org", "second@example.org"]
    drift_settings.ALERT_WEBHOOK_URL = f"http://127.0.0.1:{closed_port()}/hook"  # nothing listens: refused
    upload_window(planted_rows(WINDOW, seed=7, shift=2.5), model_version=monitored_model, clinician=clinician,
                  clinic=clinic, capture=django_capture_on_commit_callbacks)  # fmt: skip

    report = run_drift_report()
    assert report.status == "drift"
    alert = MonitoringAlert.objects.get()
    assert alert.webhook_status.startswith("error: ") and "refused" in alert.webhook_status.lower()
    assert alert.emailed_to == ["oncall@example.org", "second@example.org"]  # ALERT_EMAILS wins over staff
    assert len(mailoutbox) == 1 and mailoutbox[0].to == ["oncall@example.org", "second@example.org"]


def test_webhook_http_error_status_is_recorded(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, drift_settings
):
    server = Webhook(status=500)
    try:
        drift_settings.ALERT_WEBHOOK_URL = server.url
        upload_window(planted_rows(WINDOW, seed=7, shift=2.5), model_version=monitored_model, clinician=clinician,
                      clinic=clinic, capture=django_capture_on_commit_callbacks)  # fmt: skip
        run_drift_report()
    finally:
        server.close()
    assert MonitoringAlert.objects.get().webhook_status == "HTTP 500"
    assert len(server.received) == 1


def plant_operations(*, clinician, clinic, capture, failed: int, done_waits: list[float]) -> list[LesionImage]:
    start = timezone.now() - timedelta(hours=5)
    images = upload_images(failed, clinician=clinician, clinic=clinic, capture=capture, start=start,
                           state=ImageState.FAILED)  # fmt: skip
    done = upload_images(len(done_waits), clinician=clinician, clinic=clinic, capture=capture,
                         start=start + timedelta(minutes=10))  # fmt: skip
    for image, wait in zip(done, done_waits, strict=True):
        LesionImage.objects.filter(pk=image.pk).update(processed_at=image.created_at + timedelta(seconds=wait))
    return images + done


def test_failure_share_and_latency_alerts_open_from_operations_and_close(
    active_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, drift_settings, ops_user
):
    waits = [10.0 * k for k in range(1, 21)]  # 10 s .. 200 s
    images = plant_operations(clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks,
                              failed=5, done_waits=waits)  # fmt: skip

    report = run_drift_report()
    assert report.status == "insufficient_data"  # no drift features at all: no drift verdict, no drift alert
    assert report.operations == pytest.approx({
        "uploads": 25, "failed": 5, "failed_share": 0.2,
        "latency_p50_s": float(np.percentile(waits, 50)), "latency_p95_s": float(np.percentile(waits, 95)),
    })  # fmt: skip
    alerts = {alert.kind: alert for alert in MonitoringAlert.objects.all()}
    assert set(alerts) == {MonitoringAlert.Kind.FAILURES, MonitoringAlert.Kind.LATENCY}
    assert alerts["failures"].message == (
        "5 of 25 uploads (20%) failed in the window (last 7 days); the alert threshold is 10%."
    )
    assert alerts["latency"].message == (
        "95% of uploads got their result within 190.5 s in the window (last 7 days); the alert threshold is 120 s."
    )
    assert sorted(mail.subject for mail in mailoutbox) == [
        "[Lesion triage] Processing latency alert", "[Lesion triage] Share of failed uploads alert",
    ]  # fmt: skip

    run_drift_report()  # still the same conditions: no new alert, no new e-mail
    assert MonitoringAlert.objects.count() == 2 and len(mailoutbox) == 2
    assert set(MonitoringAlert.objects.values_list("reports_seen", flat=True)) == {2}

    # The failed uploads are retried and succeed; every result now comes within 30 s.
    for image in images:
        LesionImage.objects.filter(pk=image.pk).update(
            state=ImageState.DONE, processed_at=image.created_at + timedelta(seconds=30)
        )
    healthy = run_drift_report()
    assert healthy.operations["failed"] == 0 and healthy.operations["latency_p95_s"] == pytest.approx(30.0)
    assert not MonitoringAlert.objects.filter(closed_at__isnull=True).exists()
    assert len(mailoutbox) == 2


def test_below_alert_min_uploads_operations_are_not_judged(
    active_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, drift_settings
):
    plant_operations(clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks, failed=5,
                     done_waits=[500.0] * 5)  # fmt: skip
    report = run_drift_report()
    assert report.operations["failed_share"] == 0.5 and report.operations["uploads"] == 10
    assert not MonitoringAlert.objects.exists() and mailoutbox == []


@pytest.mark.parametrize("case", ["no active model", "drift check failed"])
def test_operations_alerts_are_evaluated_whatever_the_drift_check(
    case, tiny_checkpoint, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, drift_settings, ops_user
):
    """With no active model there is no drift check (uploads then wait queued for one), but failed uploads
    must still raise the failure alert. Likewise a drift check that breaks must not silence the operations
    alerts."""
    if case == "drift check failed":
        model_version = register_model(checkpoint=tiny_checkpoint, version="corrupt-reference", activate=True)
        ReferenceFeature.objects.create(model_version=model_version, split="test", label="benign", path="bad",
                                        values=[1, 2, 3])  # fmt: skip
    plant_operations(clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks, failed=25,
                     done_waits=[])  # fmt: skip

    report = run_drift_report()
    assert report.status in ("insufficient_data", "failed")
    assert report.operations["failed_share"] == 1.0
    alert = MonitoringAlert.objects.filter(kind=MonitoringAlert.Kind.FAILURES, closed_at__isnull=True).first()
    assert alert is not None, f"no failure alert although all 25 uploads failed ({case})"
    assert len(mailoutbox) == 1


# --- live performance ----------------------------------------------------------------------------


def test_live_performance_equals_hand_computed_figures(
    active_model, clinician, clinic, django_capture_on_commit_callbacks, drift_settings
):
    images = upload_images(9, clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks)
    other_version = ModelVersion.objects.create(version="other", arch="resnet_tiny", input_size=64,
                                                class_names=["benign", "malignant"], threshold=0.5,
                                                weights="models/y.pt", weights_sha256="1" * 64)  # fmt: skip
    #            probability, threshold, model
    planted = [(0.9, 0.5, active_model),  # 0 malignant: TP
               (0.2, 0.5, active_model),  # 1 malignant: FN
               (0.1, 0.5, active_model),  # 2 benign: TN
               (0.45, 0.4, active_model),  # 3 benign: FP at its own stored threshold (0.4), TN at 0.5
               (0.3, 0.5, active_model),  # 4 benign now (an older "malignant" outcome is overridden): TN
               (0.8, 0.5, active_model),  # 5 "other" diagnosis: no label, left out
               (0.7, 0.5, active_model),  # 6 only an assessment, no outcome: left out
               (0.6, 0.5, other_version),  # 7 scored by another version only: left out
               (0.95, 0.5, active_model)]  # 8 no feedback at all  # fmt: skip
    for image, (probability, threshold, version) in zip(images, planted, strict=True):
        Prediction.objects.create(
            image=image,
            model_version=version,
            probability_malignant=probability,
            threshold=threshold,
            label="malignant" if probability >= threshold else "benign",
        )

    def outcome(index: int, diagnosis: str, days_ago: float) -> Feedback:
        feedback = record_outcome(image=images[index], diagnosis=diagnosis, recorded_by=clinician, via="tests")
        Feedback.objects.filter(pk=feedback.pk).update(recorded_at=timezone.now() - timedelta(days=days_ago))
        return feedback

    outcome(0, "melanoma", 3)
    outcome(1, "basal_cell_carcinoma", 3)
    outcome(2, "benign_naevus", 3)
    outcome(3, "seborrhoeic_keratosis", 3)
    newer = outcome(4, "dermatofibroma", 1)  # recorded first (lower id) but dated later: it is the newest
    older = outcome(4, "melanoma", 2)
    assert newer.pk < older.pk
    outcome(5, "other", 3)
    record_assessment(image=images[6], agrees=False, recorded_by=clinician)
    outcome(7, "melanoma", 3)

    performance = live_performance(active_model)
    assert performance.model_version == active_model.version
    assert (performance.cases, performance.malignant, performance.benign) == (5, 2, 3)
    assert (performance.true_positive, performance.false_negative) == (1, 1)
    assert (performance.true_negative, performance.false_positive) == (2, 1)
    # AUC: malignant 0.9 beats all three benign (0.1, 0.45, 0.3), 0.2 beats one: 4 of 6 pairs.
    assert performance.auc == pytest.approx(4 / 6)
    assert performance.sensitivity == pytest.approx(1 / 2)
    assert performance.specificity == pytest.approx(2 / 3)
    assert performance.test == (active_model.metrics or {}).get("test", {})
    assert [name for name, _, _ in performance.rows()] == ["AUC", "Sensitivity", "Specificity"]
    assert live_performance() == performance  # the active model by default


def test_live_performance_without_outcomes_or_model(db, active_model):
    empty = live_performance(active_model)
    assert empty.cases == 0 and empty.auc is None and empty.sensitivity is None and empty.specificity is None
    ModelVersion.objects.update(is_active=False)
    assert live_performance() is None


# --- per-upload features from the real worker function -------------------------------------------


def test_process_image_stores_every_drift_feature_of_the_upload(
    active_model, tiny_checkpoint, clinician, clinic, django_capture_on_commit_callbacks, drift_settings
):
    from diagnosis.services.predictions import process_image
    from mlcore.model import load_checkpoint
    from mlcore.pipeline import logits_and_embeddings
    from mlcore.preprocessing import TransformSpec, decode_image

    # The reference set and projection train_model would register, from the model's own embeddings.
    model, meta = load_checkpoint(tiny_checkpoint)
    spec = TransformSpec(meta.input_size, meta.mean, meta.std)
    photos = [lesion_jpeg(seed=500 + index, size=96, malignant=bool(index % 2)) for index in range(40)]
    decoded = [decode_image(data).image for data in photos]
    _, embeddings = logits_and_embeddings(model, [(image, 0) for image in decoded], spec)
    projection = drift.Projection.fit(embeddings)
    projected = projection.transform(embeddings)
    ReferenceFeature.objects.bulk_create([
        ReferenceFeature(model_version=active_model, split="test", label="benign", path=f"ref/{index}.jpg",
                         values={**drift.describe_image(image, file_size=len(data)), "probability_malignant": 0.4,
                                 **dict(zip(drift.EMBEDDING_FEATURES, map(float, projected[index]), strict=False))})
        for index, (image, data) in enumerate(zip(decoded, photos, strict=True))
    ])  # fmt: skip
    active_model.drift_projection = projection.to_dict()
    active_model.save(update_fields=["drift_projection"])

    camera = Image.Exif()
    camera[0x010F] = "Camera maker"  # metadata the stored file loses: the two sizes differ
    data = lesion_jpeg(seed=77, size=120, exif=camera)
    with django_capture_on_commit_callbacks():
        image = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(data))
    assert process_image(image_id=str(image.pk), worker_id="worker-1") == "done"

    image.refresh_from_db()
    features = UploadFeatures.objects.get(image=image)
    values = features.values
    assert features.model_version == active_model
    # Every image, file, prediction and embedding feature, and the skin tone (tests/test_subgroup_monitoring.py).
    assert set(values) == {*drift.FEATURE_NAMES, "skin_ita"}
    assert values["file_size"] == len(data) == image.upload_bytes  # the upload's size, not the stored file's
    assert image.file_size != len(data)
    assert (values["width"], values["height"], values["aspect_ratio"]) == (120.0, 120.0, 1.0)
    with image.file.open("rb") as handle:
        stored = decode_image(handle.read()).image
    expected = drift.describe_image(stored, file_size=len(data))
    for name in drift.IMAGE_FEATURES:
        assert values[name] == pytest.approx(expected[name]), name
    prediction = Prediction.objects.get(image=image)
    assert values["probability_malignant"] == pytest.approx(prediction.probability_malignant)
    # The serving embedding (Predictor.predict_with_gradcam) projects like the training-side one.
    _, served = logits_and_embeddings(model, [(stored, 0)], spec)
    for name, value in projection.features(served[0]).items():
        assert values[name] == pytest.approx(value, rel=1e-3, abs=1e-3), name

    placement = features.placement
    assert isinstance(placement, list)
    assert [row["feature"] for row in placement] == list(drift.FEATURE_NAMES)
    for row in placement:
        assert 0.0 <= row["percentile"] <= 100.0 and row["value"] == pytest.approx(values[row["feature"]])
    by_name = {row["feature"]: row for row in placement}
    assert by_name["width"]["percentile"] == 100.0 and by_name["width"]["outlier"] is True  # 120 px vs 96 px
    assert features.outlier_features == [row["feature"] for row in placement if row["outlier"]]


def test_record_upload_features_is_idempotent(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, drift_settings
):
    (image,) = upload_images(1, clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks)
    decoded = Image.open(io.BytesIO(lesion_jpeg(seed=3, size=40)))
    first = record_upload_features(
        image=image, model_version=monitored_model, decoded_image=decoded, probability=0.2, embedding=np.ones(8)
    )  # no projection: no embedding features
    second = record_upload_features(image=image, model_version=monitored_model, decoded_image=decoded,
                                    probability=0.99)  # fmt: skip
    assert first.pk == second.pk and UploadFeatures.objects.filter(image=image).count() == 1
    second.refresh_from_db()
    assert second.values["probability_malignant"] == 0.99
    assert not any(name.startswith("embedding_") for name in second.values)
    # Placed only where the planted reference has the feature; 0.99 is above every Beta(2, 5) draw.
    assert [row["feature"] for row in second.placement] == ["brightness", "contrast", "probability_malignant"]
    assert "probability_malignant" in second.outlier_features


# --- the dashboard -------------------------------------------------------------------------------


@pytest.fixture
def staff_client(client, ops_user):
    client.force_login(ops_user)
    return client


@pytest.fixture
def two_reports(monitored_model, clinician, clinic, django_capture_on_commit_callbacks):
    """An older report with too few uploads, then a drift report with Evidently files; and two
    confirmed outcomes, so the live-performance section has figures."""
    older = run_drift_report(triggered_by="older-run")
    images = upload_window(planted_rows(WINDOW, seed=7, shift=2.5), model_version=monitored_model,
                           clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks)  # fmt: skip
    newer = run_drift_report(triggered_by="newer-run")
    for image, probability, diagnosis in ((images[0], 0.8, "melanoma"), (images[1], 0.1, "benign_naevus")):
        Prediction.objects.create(image=image, model_version=monitored_model, probability_malignant=probability,
                                  threshold=0.5, label="x")  # fmt: skip
        record_outcome(image=image, diagnosis=diagnosis, recorded_by=clinician)
    assert (older.status, newer.status) == ("insufficient_data", "drift")
    return older, newer


def test_dashboard_needs_a_staff_login(client, clinician, db):
    for url in (DASHBOARD, "/admin/monitoring/drift/1/evidently/"):
        response = client.get(url)
        assert response.status_code == 302 and response["Location"].startswith(f"/admin/login/?next={url}"), url
    client.force_login(clinician)  # a clinician is not staff
    response = client.get(DASHBOARD)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")


def test_dashboard_shows_the_newest_report(staff_client, two_reports, monitored_model):
    _, newer = two_reports
    response = staff_client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    assert f"Active model: <strong>{monitored_model.version}</strong>" in html
    assert '<span class="status status-drift">Drift</span>' in html and newer.message in html
    assert "newer-run" in html
    # The feature table, grouped, with each p-value.
    for label in ("Brightness (mean luminance, 0-255)", "Embedding component 1",
                  "Predicted probability of malignancy"):  # fmt: skip
        assert label in html
    for group in ("<th colspan=\"7\">Image</th>", "<th colspan=\"7\">Prediction</th>",
                  "<th colspan=\"7\">Embedding</th>"):  # fmt: skip
        assert group in html
    for feature in newer.features:
        assert f"{feature['p_value']:.2g}" in html
    assert html.count('<span class="drifted">drifted</span>') == len(newer.drifted_features)
    assert "<svg" in html  # histograms and timeline, inline
    assert f'href="/admin/monitoring/drift/{newer.pk}/evidently/"' in html
    # Alerts and live performance.
    assert "Data drift since" in html
    assert "Performance on confirmed outcomes" in html
    assert "2 images with a histopathology outcome" in html and "Live, on confirmed outcomes" in html
    assert '<tr><td>AUC</td><td class="num">1.000</td>' in html  # the two confirmed cases are ranked right


def test_dashboard_selects_a_past_report(staff_client, two_reports):
    older, newer = two_reports
    html = staff_client.get(DASHBOARD, {"report": older.pk}).content.decode()
    assert '<span class="status status-insufficient_data">Too few uploads</span>' in html
    shown = html[html.index("<h2>Report") : html.index("Drift over time")]
    assert older.message in shown and newer.message not in shown
    assert "none for this report" in html  # no Evidently files for a report without a verdict
    assert f'href="?report={newer.pk}"' in html  # the list of past reports


@pytest.mark.parametrize("value", ["abc", "1.5", "-1", "²", "99999999999999999999"])
def test_dashboard_with_a_bad_report_parameter_is_404(ops_user, two_reports, value):
    client = Client(raise_request_exception=False)
    client.force_login(ops_user)
    assert client.get(DASHBOARD, {"report": value}).status_code == 404
    assert client.get(DASHBOARD, {"report": str(two_reports[1].pk + 1000)}).status_code == 404


def test_evidently_html_view(staff_client, two_reports):
    older, newer = two_reports
    response = staff_client.get(f"/admin/monitoring/drift/{newer.pk}/evidently/")
    assert response.status_code == 200
    assert response["Content-Type"] == "text/html; charset=utf-8"
    assert response["X-Content-Type-Options"] == "nosniff" and "no-store" in response["Cache-Control"]
    with default_storage.open(newer.html.name, "rb") as handle:
        assert b"".join(response.streaming_content) == handle.read()
    assert staff_client.get(f"/admin/monitoring/drift/{older.pk}/evidently/").status_code == 404  # none stored
    assert staff_client.get("/admin/monitoring/drift/999999/evidently/").status_code == 404
    default_storage.delete(newer.html.name)
    assert staff_client.get(f"/admin/monitoring/drift/{newer.pk}/evidently/").status_code == 404  # file gone


def test_admin_index_links_to_the_dashboard(staff_client):
    html = staff_client.get("/admin/").content.decode()
    assert f'<a href="{DASHBOARD}">Drift dashboard</a>' in html


def test_drift_report_changelist_redirects_to_the_dashboard(client, db, django_user_model):
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.org", "x"))
    response = client.get("/admin/diagnosis/driftreport/")
    assert response.status_code == 302 and response["Location"] == DASHBOARD


def test_lesion_image_change_page_shows_the_drift_feature_table(
    client, monitored_model, clinician, clinic, django_capture_on_commit_callbacks, django_user_model
):
    images = upload_images(2, clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks)
    features = record_upload_features(
        image=images[0],
        model_version=monitored_model,
        decoded_image=Image.new("RGB", (64, 48), (250, 240, 235)),
        probability=0.3,
    )
    client.force_login(django_user_model.objects.create_superuser("root", "root@example.org", "x"))

    response = client.get(f"/admin/diagnosis/lesionimage/{images[0].pk}/change/")
    assert response.status_code == 200
    html = response.content.decode()
    assert "drift features against the reference set" in html.lower()
    assert "<th>reference 1%</th>" in html and "<th>percentile</th>" in html
    assert f"Compared with the reference set of {monitored_model.version}." in html
    rows = {row["feature"]: row for row in features.placement}
    assert set(rows) == {"brightness", "contrast", "probability_malignant"}
    for name, row in rows.items():
        assert f"<td>{name}</td>" in html
        assert f"<td class='num'>{row['percentile']:.1f}</td>" in html
        assert f"<td class='num'>{row['reference_median']:.3f}</td>" in html
    # A near-white flat photo: brighter and flatter than every reference image.
    assert rows["brightness"]["outlier"] and rows["contrast"]["outlier"]
    assert "outlier (high)" in html and "outlier (low)" in html

    html = client.get(f"/admin/diagnosis/lesionimage/{images[1].pk}/change/").content.decode()
    assert "Not computed (the upload has not been scored yet, or failed)." in html


# --- "run now" through the real broker and worker -------------------------------------------------


def test_run_now_needs_staff_and_post(client, clinician, ops_user):
    client.force_login(clinician)
    response = client.post(RUN_NOW)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")
    client.force_login(ops_user)
    assert client.get(RUN_NOW).status_code == 405


def test_the_dashboard_needs_the_view_permission_and_run_now_the_change_permission(
    client, two_reports, django_user_model, settings
):
    """Staff alone see nothing of it (alerts name their recipients); viewers see it without the button."""
    settings.DRIFT_RUN_COOLDOWN_SECONDS = 60
    newer = two_reports[1]
    evidently = f"/admin/monitoring/drift/{newer.pk}/evidently/"
    staff = django_user_model.objects.create_user("plain-staff", is_staff=True)
    client.force_login(staff)
    assert [client.get(url).status_code for url in (DASHBOARD, evidently)] == [403, 403]
    assert client.post(RUN_NOW).status_code == 403
    viewer = grant(staff, "view_driftreport")
    client.force_login(viewer)
    html = client.get(DASHBOARD).content.decode()
    assert "Drift dashboard" in html and "Run a report now" not in html
    assert client.get(evidently).status_code == 200
    with mock.patch("diagnosis.services.dispatch.send") as send:  # the broker: the outside world here
        assert client.post(RUN_NOW).status_code == 403
        send.assert_not_called()


def test_run_now_queues_one_report_per_cooldown(client, ops_user, settings):
    from django.core.cache import cache

    settings.DRIFT_RUN_COOLDOWN_SECONDS = 60
    cache.delete("drift-run-cooldown")
    client.force_login(ops_user)
    assert "Run a report now" in client.get(DASHBOARD).content.decode()
    with mock.patch("diagnosis.services.dispatch.send") as send:
        first = client.post(RUN_NOW, follow=True).content.decode()
        second = client.post(RUN_NOW, follow=True).content.decode()
    assert send.call_count == 1
    assert "A drift report was queued;" in first
    assert "Try again in" in second and "A drift report was queued;" not in second
    cache.delete("drift-run-cooldown")


@pytest.mark.e2e
@pytest.mark.django_db(transaction=True)
def test_run_now_queues_a_report_that_a_real_worker_computes(celery_worker, redis_service, client, settings):
    settings.DRIFT_RUN_COOLDOWN_SECONDS = 0  # whatever other tests pressed the button just before
    staff = grant(UserFactory(username=f"staff-{uuid.uuid4().hex[:6]}", is_staff=True), "view_driftreport",
                  "change_driftreport")  # fmt: skip
    client.force_login(staff)

    response = client.post(RUN_NOW, follow=True)
    assert response.redirect_chain == [(DASHBOARD, 302)]
    assert "A drift report was queued" in response.content.decode()

    report = wait_for(lambda: DriftReport.objects.filter(triggered_by=staff.username).first(), 60,
                      message="the worker's drift report")  # fmt: skip
    assert report.status == DriftReport.Status.INSUFFICIENT  # no model is active in this test
    assert "drift_report_task" in celery_worker.log()
    html = client.get(DASHBOARD).content.decode()
    assert staff.username in html and report.message in html


def test_a_condition_back_within_the_cooldown_reopens_its_alert_without_a_new_message(
    monitored_model, clinician, clinic, django_capture_on_commit_callbacks, mailoutbox, drift_settings
):
    drift_settings.DRIFT_WINDOW_UPLOADS = WINDOW
    drift_settings.ALERT_EMAILS = ["ops@example.org"]
    drift_settings.ALERT_COOLDOWN_MINUTES = 60
    now = timezone.now()

    def window(shift: float, seed: int, hours_ago: int):
        upload_window(planted_rows(WINDOW, seed=seed, shift=shift), model_version=monitored_model,
                      clinician=clinician, clinic=clinic, capture=django_capture_on_commit_callbacks,
                      start=now - timedelta(hours=hours_ago))  # fmt: skip

    window(shift=2.5, seed=21, hours_ago=4)
    assert run_drift_report().status == "drift"
    alert = MonitoringAlert.objects.get()
    window(shift=0.0, seed=22, hours_ago=3)
    assert run_drift_report().status == "no_drift"
    alert.refresh_from_db()
    assert alert.closed_at is not None
    window(shift=2.5, seed=23, hours_ago=2)  # back within the hour: the same episode, no new message
    assert run_drift_report().status == "drift"
    alert.refresh_from_db()
    assert alert.closed_at is None and alert.reports_seen == 2
    assert MonitoringAlert.objects.count() == 1 and len(mailoutbox) == 1

    window(shift=0.0, seed=24, hours_ago=1)
    assert run_drift_report().status == "no_drift"
    MonitoringAlert.objects.update(closed_at=timezone.now() - timedelta(minutes=90))  # past the cooldown
    window(shift=2.5, seed=25, hours_ago=0)
    assert run_drift_report().status == "drift"
    assert MonitoringAlert.objects.count() == 2 and len(mailoutbox) == 2  # a new episode, a new message
