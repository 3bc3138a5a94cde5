"""Monitoring of the photo-quality gate (issue 20, item 6): the not-assessable and uncertain rates per clinic,
per camera and per day, the checks that refused most, the alert when a camera's or a clinic's rate rises,
the calibration report against clinicians' photo feedback (service, dashboard and command), the API's photo
feedback, and the same queries on SQLite (the embedded default).

Photos and their results are planted through the ORM with known decisions and quality reports, so every
count is certain; the gate itself is tested in tests/mlcore/test_gate.py and tests/test_quality_gate.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import uuid
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import call_command
from django.utils import timezone

from diagnosis.models import DriftReport, Feedback, ImageState, LesionImage, ModelVersion, MonitoringAlert, Prediction
from diagnosis.services import quality_monitoring as qm
from diagnosis.services.feedback import record_photo_feedback
from diagnosis.services.monitoring import run_drift_report
from mlcore.gate import OOD_ADVICE
from mlcore.quality import ADVICE, BOUNDS
from tests.conftest import ROOT
from tests.factories import ClinicFactory, grant

DASHBOARD = "/admin/monitoring/drift/"
ACCEPTED = ("below_threshold", "above_threshold")


def model_version(version: str = "") -> ModelVersion:
    return ModelVersion.objects.create(
        version=version or f"qm-{uuid.uuid4().hex[:8]}", arch="resnet_tiny", input_size=64,
        class_names=["benign", "malignant"], threshold=0.5, weights="models/qm.pt", weights_sha256="3" * 64,
    )  # fmt: skip


def quality_report(*refused, warned=()) -> dict:
    """A prediction's quality report whose failed checks are `refused` (("focus", "low"), ... or "ood") and
    `warned` (failed, but only a warning: a lenient gate)."""
    checks = [
        {"name": name, "direction": direction, "value": 0.1, "threshold": 0.5,
         "passed": (name, direction) not in refused and (name, direction) not in warned,
         "advice": ADVICE[(name, direction)] if (name, direction) in (*refused, *warned) else ""}
        for name, direction in (*BOUNDS, ("resolution", "low"))
    ]  # fmt: skip
    reasons = [ADVICE[key] for key in refused if key != "ood"] + ([OOD_ADVICE] if "ood" in refused else [])
    ood = {"score": 9.0 if "ood" in refused else 1.0, "threshold": 5.0, "passed": "ood" not in refused}
    return {"checks": checks, "reasons": reasons, "warnings": [ADVICE[key] for key in warned], "ood": ood}


def photos(count: int, *, clinic, version: ModelVersion, decision: str, camera: str = "", at=None,
           refused=(), warned=(), state=ImageState.DONE) -> list[Prediction]:  # fmt: skip
    """`count` done photos uploaded at `at` (default: an hour ago), each with one prediction."""
    at = at or timezone.now() - timedelta(hours=1)
    images = LesionImage.objects.bulk_create(
        LesionImage(clinic=clinic, file=f"uploads/{uuid.uuid4().hex}.jpg", content_type="image/jpeg",
                    sha256="0" * 64, width=400, height=400, file_size=1000, camera=camera, state=state,
                    created_at=at, processed_at=at + timedelta(seconds=2))
        for _ in range(count)
    )  # fmt: skip
    gated = decision != ""
    return Prediction.objects.bulk_create(
        Prediction(image=image, model_version=version, probability_malignant=0.3, label="benign", threshold=0.5,
                   decision=decision, assessable=(decision != "not_assessable") if gated else None,
                   quality=quality_report(*refused, warned=warned) if gated else {}, created_at=at)
        for image in images
    )  # fmt: skip


@pytest.fixture
def ops_user(db, django_user_model):
    user = django_user_model.objects.create_user(
        "qm-ops", email="ops@example.org", password="correct-horse-battery", is_staff=True
    )
    return grant(user, "view_driftreport", "change_driftreport")


@pytest.fixture
def alert_settings(settings):
    settings.ALERT_EMAILS = ["ops@example.org"]
    settings.ALERT_WEBHOOK_URL = ""
    settings.ALERT_COOLDOWN_MINUTES = 0
    settings.QUALITY_ALERT_WINDOW_HOURS = 24.0
    settings.QUALITY_ALERT_BASELINE_DAYS = 14.0
    settings.QUALITY_ALERT_MIN_PHOTOS = 20
    settings.QUALITY_ALERT_RATE = 0.15
    settings.QUALITY_ALERT_MARGIN = 0.10
    settings.QUALITY_CALIBRATION_DAYS = 30.0
    settings.DRIFT_WINDOW_DAYS = 7.0
    settings.DRIFT_WINDOW_UPLOADS = 0
    return settings


# --- the rates -------------------------------------------------------------------------------------


@pytest.fixture
def planted(db, clinic):
    """Two clinics, two cameras (and photos without one), over two days; plus photos that must not count."""
    north = ClinicFactory(name="North")
    version = model_version()
    day1 = (timezone.now() - timedelta(days=2)).replace(hour=12, minute=0, second=0, microsecond=0)
    day2 = day1 + timedelta(days=1)
    # Day 1, Clinic A, Acme X1: 6 photos, 3 not assessable (2 out of focus, 1 out of focus and too dark),
    # 1 uncertain.
    photos(2, clinic=clinic, version=version, decision="below_threshold", camera="Acme X1", at=day1)
    photos(2, clinic=clinic, version=version, decision="not_assessable", camera="Acme X1", at=day1,
           refused=[("focus", "low")])  # fmt: skip
    photos(1, clinic=clinic, version=version, decision="not_assessable", camera="Acme X1", at=day1,
           refused=[("focus", "low"), ("brightness", "low")])  # fmt: skip
    photos(1, clinic=clinic, version=version, decision="uncertain", camera="Acme X1", at=day1)
    # Day 2, North, no camera: 4 photos, 1 not assessable (OOD; a lenient gate's glare only a warning), 2 uncertain.
    photos(1, clinic=north, version=version, decision="above_threshold", at=day2)
    photos(1, clinic=north, version=version, decision="not_assessable", at=day2, refused=["ood"],
           warned=[("clipped", "high")])  # fmt: skip
    photos(2, clinic=north, version=version, decision="uncertain", at=day2)
    # Not counted: a photo scored before the gate, a failed one, one uploaded before the window.
    photos(1, clinic=north, version=version, decision="", at=day2)
    photos(1, clinic=north, version=version, decision="not_assessable", at=day2, refused=[("skin", "low")],
           state=ImageState.FAILED)  # fmt: skip
    photos(1, clinic=north, version=version, decision="not_assessable", at=day1 - timedelta(days=20),
           refused=[("skin", "low")])  # fmt: skip
    # Scored again by a newer model, which accepted it: counted once, by its newest result.
    (rescored,) = photos(1, clinic=north, version=version, decision="not_assessable", at=day2,
                         refused=[("resolution", "low")])  # fmt: skip
    Prediction.objects.create(image=rescored.image, model_version=model_version(), probability_malignant=0.2,
                              label="benign", threshold=0.5, decision="below_threshold", assessable=True,
                              created_at=day2 + timedelta(hours=1))  # fmt: skip
    return {"start": day1 - timedelta(days=1), "end": timezone.now(), "day1": timezone.localdate(day1),
            "day2": timezone.localdate(day2)}  # fmt: skip


def rates(items) -> dict:
    return {r.label: (r.photos, r.not_assessable, r.uncertain) for r in items}


def test_rates_per_clinic_camera_and_day(planted):
    summary = qm.summary(planted["start"], planted["end"])
    assert (summary.overall.photos, summary.overall.not_assessable, summary.overall.uncertain) == (11, 4, 3)
    assert summary.overall.not_assessable_share == pytest.approx(4 / 11)
    assert rates(summary.clinics) == {"Clinic A": (6, 3, 1), "North": (5, 1, 2)}
    assert rates(summary.cameras) == {"Acme X1": (6, 3, 1), "unknown camera": (5, 1, 2)}
    assert rates(summary.days) == {planted["day1"].isoformat(): (6, 3, 1), planted["day2"].isoformat(): (5, 1, 2)}
    # Which checks refused: a photo failing two checks counts under each; a lenient warning does not count.
    assert [(r["check"], r["label"], r["count"]) for r in summary.reasons] == [
        ("focus:low", "out of focus", 3), ("brightness:low", "too dark", 1), ("ood", "unlike the training photos", 1),
    ]  # fmt: skip


def test_the_drift_report_keeps_the_rates_in_its_operations(planted, alert_settings):
    report = run_drift_report(triggered_by="tests")  # no active model: operations only
    assert report.status == DriftReport.Status.INSUFFICIENT
    quality = report.operations["quality"]
    assert (quality["photos"], quality["not_assessable"], quality["uncertain"]) == (11, 4, 3)
    assert quality["not_assessable_share"] == pytest.approx(4 / 11)
    assert {c["label"]: c["not_assessable"] for c in quality["clinics"]} == {"Clinic A": 3, "North": 1}
    assert {c["label"]: c["photos"] for c in quality["cameras"]} == {"Acme X1": 6, "unknown camera": 5}
    assert quality["refusals"][0] == {"check": "focus:low", "label": "out of focus", "count": 3}
    # A window without gated photos keeps the operations as they were.
    assert qm.operations_quality(timezone.now() - timedelta(hours=1), timezone.now()) == {}


# --- the alert -------------------------------------------------------------------------------------


def test_alert_opens_when_a_cameras_rate_jumps_and_closes_when_it_falls(db, clinic, alert_settings, mailoutbox):
    version = model_version()
    now = timezone.now()
    before = now - timedelta(days=10)
    # The baseline: both cameras refuse 2 of 40 (5%).
    for camera in ("Acme X1", "Phone Z"):
        photos(38, clinic=clinic, version=version, decision="below_threshold", camera=camera, at=before)
        photos(2, clinic=clinic, version=version, decision="not_assessable", camera=camera, at=before,
               refused=[("focus", "low")])  # fmt: skip
    # The last day: Acme X1 refuses 10 of 25 (40%); Phone Z none of 60, so the clinic stays at 10 of 85.
    recent = now - timedelta(hours=3)
    photos(15, clinic=clinic, version=version, decision="below_threshold", camera="Acme X1", at=recent)
    refused = photos(10, clinic=clinic, version=version, decision="not_assessable", camera="Acme X1", at=recent,
                     refused=[("focus", "low")])  # fmt: skip
    photos(60, clinic=clinic, version=version, decision="below_threshold", camera="Phone Z", at=recent)

    run_drift_report(now=now)
    alert = MonitoringAlert.objects.get(kind=MonitoringAlert.Kind.QUALITY)
    assert alert.closed_at is None
    assert "camera Acme X1: 10 of 25 photos (40%) not assessable, against 5% before" in alert.message
    assert "Phone Z" not in alert.message and "clinic Clinic A" not in alert.message  # 10 of 85: normal
    assert [mail.subject for mail in mailoutbox] == ["[Lesion triage] Share of photos not assessable alert"]
    assert alert.message in mailoutbox[0].body

    run_drift_report(now=now)  # still high: kept open, nobody told again
    alert.refresh_from_db()
    assert alert.closed_at is None and alert.reports_seen == 2 and len(mailoutbox) == 1

    # The camera is fixed: its retakes pass, 1 of 25 (4%) is refused now.
    Prediction.objects.filter(pk__in=[p.pk for p in refused[1:]]).update(decision="below_threshold", assessable=True)
    run_drift_report(now=now)
    alert.refresh_from_db()
    assert alert.closed_at is not None
    assert not MonitoringAlert.objects.filter(closed_at__isnull=True).exists() and len(mailoutbox) == 1


def test_a_new_camera_is_compared_with_everyone_and_small_groups_are_not_judged(db, clinic, alert_settings):
    version = model_version()
    now = timezone.now()
    photos(95, clinic=clinic, version=version, decision="below_threshold", camera="Old", at=now - timedelta(days=5))
    photos(5, clinic=clinic, version=version, decision="not_assessable", camera="Old", at=now - timedelta(days=5),
           refused=[("focus", "low")])  # fmt: skip
    assert qm.alert_condition(now) is None  # nothing in the last day: nothing judged, an open alert stays
    # A new phone with no history: 8 of 20 refused, against everyone's 5% before.
    photos(12, clinic=clinic, version=version, decision="below_threshold", camera="New", at=now - timedelta(hours=2))
    photos(8, clinic=clinic, version=version, decision="not_assessable", camera="New", at=now - timedelta(hours=2),
           refused=[("brightness", "low")])  # fmt: skip
    judged, found = qm.rises(now)
    assert judged == 2  # the camera and its clinic (20 photos each); "Old" had none in the last day
    assert [(rise.scope, rise.recent.label, rise.baseline) for rise in found] == [
        ("clinic", "Clinic A", pytest.approx(0.05)), ("camera", "New", pytest.approx(0.05)),
    ]  # fmt: skip
    alert_settings.QUALITY_ALERT_MIN_PHOTOS = 21
    assert qm.alert_condition(now) is None
    alert_settings.QUALITY_ALERT_MIN_PHOTOS = 20
    alert_settings.QUALITY_ALERT_RATE = 0.5  # 40% is under the floor: judged, and normal
    present, message = qm.alert_condition(now)
    assert present is False and "No clinic or camera" in message


# --- calibration -----------------------------------------------------------------------------------


@pytest.fixture
def calibration(db, clinic, clinician):
    """Version A: 4 photos refused out of focus (2 marked fine, 1 marked rightly refused, 1 not reviewed),
    2 by the OOD check (1 marked fine), 1 out of focus and too dark (marked fine); 5 accepted (1 marked poor,
    1 marked fine). Version B: 1 refused, not a photo of skin, not reviewed."""
    a, b = model_version("calib-a"), model_version("calib-b")
    focus = photos(4, clinic=clinic, version=a, decision="not_assessable", refused=[("focus", "low")])
    ood = photos(2, clinic=clinic, version=a, decision="not_assessable", refused=["ood"])
    both = photos(
        1, clinic=clinic, version=a, decision="not_assessable", refused=[("focus", "low"), ("brightness", "low")]
    )
    accepted = photos(5, clinic=clinic, version=a, decision="below_threshold")
    photos(1, clinic=clinic, version=b, decision="not_assessable", refused=[("skin", "low")])

    def say(prediction, fine: bool):
        record_photo_feedback(image=prediction.image, photo_was_fine=fine, recorded_by=clinician, via="tests")

    say(focus[0], True)
    say(focus[1], False)  # first called fine, then corrected: the newest word counts
    say(focus[1], True)
    say(focus[2], False)
    say(ood[0], True)
    say(both[0], True)
    say(accepted[0], False)
    say(accepted[1], True)
    return a, b


def test_calibration_report_counts_refusals_and_clinicians_word_per_check(calibration):
    report = {version.model_version: version for version in qm.calibration_report(days=30)}
    a, b = report["calib-a"], report["calib-b"]
    assert (a.photos, a.refused, a.refused_reviewed, a.refused_fine) == (12, 7, 5, 4)
    assert (a.accepted, a.accepted_reviewed, a.accepted_poor) == (5, 2, 1)
    checks = {c.check: (c.refused, c.reviewed, c.marked_fine) for c in a.checks}
    assert checks == {"focus:low": (5, 4, 3), "ood": (2, 1, 1), "brightness:low": (1, 1, 1)}
    assert next(c for c in a.checks if c.check == "focus:low").false_refusal_share == pytest.approx(3 / 4)
    assert (b.photos, b.refused, b.refused_reviewed) == (1, 1, 0)
    assert [(c.check, c.false_refusal_share) for c in b.checks] == [("skin:low", None)]
    assert Feedback.objects.filter(kind=Feedback.Kind.PHOTO, agrees=False).count() == 5
    assert qm.calibration_report(days=30, now=timezone.now() - timedelta(days=31)) == []


def test_quality_report_command_prints_the_table_and_json(calibration):
    out = StringIO()
    call_command("quality_report", "--days", "7", stdout=out)
    text = out.getvalue()
    assert "Quality-gate calibration, predictions of the last 7 days" in text
    assert "calib-a: 12 photos; 7 refused (5 reviewed, 4 marked fine); 5 accepted (2 reviewed, 1 marked poor)" in text
    lines = [line.split() for line in text.splitlines()]
    assert ["focus:low", "5", "4", "3", "75%"] in lines and ["skin:low", "1", "0", "0", "–"] in lines

    out = StringIO()
    call_command("quality_report", "--json", stdout=out)
    data = json.loads(out.getvalue())
    assert data["days"] == 30.0
    versions = {v["model_version"]: v for v in data["model_versions"]}
    assert versions["calib-a"]["refused_fine"] == 4 and versions["calib-a"]["accepted_poor"] == 1
    focus = next(c for c in versions["calib-a"]["checks"] if c["check"] == "focus:low")
    assert focus == {"check": "focus:low", "label": "out of focus", "refused": 5, "reviewed": 4, "marked_fine": 3,
                     "false_refusal_share": 0.75}  # fmt: skip


def test_quality_report_command_with_nothing_to_report(db):
    out = StringIO()
    call_command("quality_report", stdout=out)
    assert "No photo was judged by the quality gate in the last 30 days." in out.getvalue()


# --- the dashboard ---------------------------------------------------------------------------------


def test_dashboard_shows_the_rates_reasons_and_calibration_to_staff(client, ops_user, planted, calibration,
                                                                    alert_settings):  # fmt: skip
    client.force_login(ops_user)
    response = client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    assert '<section id="quality-gate">' in html and "Photo-quality gate" in html
    # 11 planted photos and the 13 of the calibration fixture (an hour ago, Clinic A, no camera).
    assert "24 photos, 12 not assessable (50.0%), 3 uncertain (12.5%)" in html
    assert '<tr><td>Clinic A</td><td class="num">19</td><td class="num">11 (57.9%)</td>' in html
    assert '<tr><td>North</td><td class="num">5</td><td class="num">1 (20.0%)</td>' in html
    assert '<tr><td>Acme X1</td><td class="num">6</td><td class="num">3 (50.0%)</td>' in html
    assert '<tr><td>unknown camera</td><td class="num">18</td>' in html
    assert f"<tr><td>{planted['day1'].isoformat()}</td>" in html
    assert '<tr><td>focus:low</td><td>out of focus</td><td class="num">8</td></tr>' in html
    assert "<svg" in html
    assert '<section id="quality-calibration">' in html and "Quality-gate calibration" in html
    assert "<strong>calib-a</strong>: 12 photos;" in html
    assert ("<tr><td>focus:low</td><td>out of focus</td><td class=\"num\">5</td><td class=\"num\">4</td>"
            "<td class=\"num\">3</td><td class=\"num\">75%</td></tr>") in html  # fmt: skip


def test_dashboard_without_gated_photos_and_for_non_staff(client, ops_user, clinician, alert_settings):
    client.force_login(clinician)
    assert client.get(DASHBOARD).status_code == 302  # a clinician is not staff
    client.force_login(ops_user)
    html = client.get(DASHBOARD).content.decode()
    assert "No photo of the window went through the gate yet." in html
    assert "No photo was judged by the gate in this period." in html


# --- the API ---------------------------------------------------------------------------------------


@pytest.fixture
def refused_photo(clinic):
    (prediction,) = photos(1, clinic=clinic, version=model_version(), decision="not_assessable",
                           refused=[("focus", "low")])  # fmt: skip
    return prediction.image


def test_api_photo_feedback_is_recorded(api_client, clinician, refused_photo):
    url = f"/api/v1/images/{refused_photo.pk}/feedback/"
    response = api_client.post(url, {"kind": "photo", "photo_was_fine": True, "note": "sharp enough"}, format="json")
    assert response.status_code == 201, response.content
    body = response.json()
    assert (body["kind"], body["agrees"], body["note"]) == ("photo", False, "sharp enough")  # the gate was wrong
    assert "photo_was_fine" not in body
    record = Feedback.objects.get(image=refused_photo)
    assert (record.kind, record.agrees, record.recorded_by) == ("photo", False, clinician)
    assert record.prediction == refused_photo.predictions.get()
    second = api_client.post(url, {"kind": "photo", "photo_was_fine": False}, format="json")
    assert second.status_code == 201 and second.json()["agrees"] is True
    assert [item["kind"] for item in api_client.get(url).json()] == ["photo", "photo"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"kind": "photo"}, "photo_was_fine"),
        ({"kind": "photo", "photo_was_fine": "maybe"}, "photo_was_fine"),
        ({"kind": "photo", "photo_was_fine": None}, "photo_was_fine"),
        ({"kind": "photo", "agrees": True}, "agrees"),
        ({"kind": "photo", "photo_was_fine": True, "agrees": False}, "agrees"),
        ({"kind": "assessment", "agrees": True, "photo_was_fine": True}, "photo_was_fine"),
    ],
)
def test_api_bad_photo_feedback_is_a_400_naming_the_field(api_client, refused_photo, body, field):
    response = api_client.post(f"/api/v1/images/{refused_photo.pk}/feedback/", body, format="json")
    assert response.status_code == 400, response.content
    assert field in response.json()["errors"]
    assert not Feedback.objects.exists()


def test_api_photo_feedback_before_the_photo_is_done_is_a_409(api_client, clinic):
    (prediction,) = photos(1, clinic=clinic, version=model_version(), decision="below_threshold",
                           state=ImageState.PROCESSING)  # fmt: skip
    response = api_client.post(f"/api/v1/images/{prediction.image_id}/feedback/",
                               {"kind": "photo", "photo_was_fine": True}, format="json")  # fmt: skip
    assert response.status_code == 409
    assert not Feedback.objects.exists()


# --- SQLite, the embedded default -------------------------------------------------------------------

SQLITE_SCRIPT = textwrap.dedent(
    """
    import django, json
    django.setup()
    from django.core.management import call_command
    call_command("migrate", verbosity=0)
    from tests.test_quality_monitoring import calibration_rows_for_sqlite
    print("RESULT " + json.dumps(calibration_rows_for_sqlite()))
    """
)


def calibration_rows_for_sqlite() -> dict:
    """Plant a few photos and read every figure back (run in a subprocess on SQLite)."""
    from django.contrib.auth import get_user_model

    clinic = ClinicFactory(name="Lite")
    user = get_user_model().objects.create_user("lite")
    version = model_version("lite-model")
    refused = photos(3, clinic=clinic, version=version, decision="not_assessable", camera="Cam",
                     refused=[("focus", "low"), "ood"])  # fmt: skip
    photos(17, clinic=clinic, version=version, decision="uncertain", camera="Cam")
    record_photo_feedback(image=refused[0].image, photo_was_fine=True, recorded_by=user)
    summary = qm.summary(timezone.now() - timedelta(days=1), timezone.now())
    (calibration,) = qm.calibration_report(days=1)
    return {
        "clinics": rates(summary.clinics), "cameras": rates(summary.cameras),
        "days": list(rates(summary.days).values()), "reasons": {r["check"]: r["count"] for r in summary.reasons},
        "calibration": calibration.as_dict(), "alert": qm.alert_condition(),
    }  # fmt: skip


def test_the_same_queries_run_on_sqlite(tmp_path):
    env = {key: value for key, value in os.environ.items() if key not in ("DATABASE_URL", "CELERY_BROKER_URL")}
    env.update({"DJANGO_SETTINGS_MODULE": "webapp.settings.dev", "VAR_DIR": str(tmp_path / "var"),
                "QUALITY_ALERT_MIN_PHOTOS": "20"})  # fmt: skip
    result = subprocess.run([sys.executable, "-c", SQLITE_SCRIPT], cwd=ROOT, env=env, capture_output=True, text=True,
                            timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "var" / "db.sqlite3").exists()
    data = json.loads(next(line for line in result.stdout.splitlines() if line.startswith("RESULT "))[7:])
    assert data["clinics"] == {"Lite": [20, 3, 17]} and data["cameras"] == {"Cam": [20, 3, 17]}
    assert data["days"] == [[20, 3, 17]]
    assert data["reasons"] == {"focus:low": 3, "ood": 3}
    calibration = data["calibration"]
    assert (calibration["refused"], calibration["refused_reviewed"], calibration["refused_fine"]) == (3, 1, 1)
    assert {c["check"]: c["marked_fine"] for c in calibration["checks"]} == {"focus:low": 1, "ood": 1}
    assert data["alert"][0] is False  # no baseline: 15% is at the floor (15%), not above it
