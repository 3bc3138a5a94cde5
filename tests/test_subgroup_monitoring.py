"""Skin tone per upload and live performance by subgroup (issue 21, items 4 and 5, the live side): the skin tone
the real worker stores with each upload's drift features, the subgroup report on confirmed outcomes (a planted
gap on dark skin is found, a group with too few malignant cases is not alerted), the subgroup alert opening and
closing through the drift report, the skin-tone mix against training, and the dashboard's two sections.

Confirmed cases are planted through the ORM with known probabilities, outcomes and skin tones, so every figure
is certain; the statistics themselves are tested in tests/mlcore/test_subgroups.py and the ITA in
tests/mlcore/test_skintone.py."""

from __future__ import annotations

import io
import logging
import uuid
from datetime import timedelta

import numpy as np
import pytest
from django.utils import timezone
from PIL import Image

from diagnosis.models import (
    BodySite,
    Feedback,
    ImageState,
    LesionImage,
    ModelVersion,
    MonitoringAlert,
    Prediction,
    ReferenceFeature,
    UploadFeatures,
)
from diagnosis.services import subgroup_monitoring as sm
from diagnosis.services.feedback import ground_truth_for
from diagnosis.services.images import submit_image
from diagnosis.services.monitoring import live_performance, record_upload_features, run_drift_report
from diagnosis.services.predictions import process_image, process_images
from mlcore import drift
from mlcore.data import generate_lesion
from mlcore.skintone import band_of
from mlcore.subgroups import wilson_interval
from tests.conftest import upload_file
from tests.factories import ClinicFactory, LesionFactory, PatientFactory, grant

DASHBOARD = "/admin/monitoring/drift/"
DARK, LIGHT, BROWN = -45.0, 45.0, 0.0


def model_version(*, active: bool = True) -> ModelVersion:
    return ModelVersion.objects.create(
        version=f"sg-{uuid.uuid4().hex[:8]}", arch="resnet_tiny", input_size=64, class_names=["benign", "malignant"],
        threshold=0.5, weights="models/sg.pt", weights_sha256="5" * 64, is_active=active,
    )  # fmt: skip


@pytest.fixture
def alert_settings(settings):
    settings.ALERT_EMAILS = ["ops@example.org"]
    settings.ALERT_WEBHOOK_URL = ""
    settings.ALERT_COOLDOWN_MINUTES = 0
    settings.SUBGROUP_ALERT_MARGIN = 0.10
    settings.SUBGROUP_ALERT_MIN_POSITIVES = 20
    settings.QUALITY_ALERT_MIN_PHOTOS = 10**6  # the planted refusals must not open the quality alert
    settings.DRIFT_WINDOW_DAYS = 7.0
    settings.DRIFT_WINDOW_UPLOADS = 0
    settings.AUTO_EXPLAIN_METHODS = []
    return settings


@pytest.fixture
def ops_user(db, django_user_model):
    user = django_user_model.objects.create_user(
        "sg-ops", email="ops@example.org", password="correct-horse-battery", is_staff=True
    )
    return grant(user, "view_driftreport", "change_driftreport")


def plant(version, *, clinic, count: int, ita: float | None, malignant: bool, called: int, decision: str = "",
          diagnosis: str = "", features: bool = True, at=None) -> list[LesionImage]:  # fmt: skip
    """`count` done photos of `clinic`, scored by `version` and confirmed by histopathology: the first
    `called` at 0.9 (above the 0.5 threshold), the rest at 0.3 (malignant: missed) or 0.1 (benign). The lesion
    alternates back and face, the camera "Acme X1" and none in pairs; `ita` is the stored skin tone (None: the
    skin could not be measured)."""
    at = at or timezone.now() - timedelta(hours=1)
    patient = PatientFactory(clinic=clinic)
    lesions = [LesionFactory(patient=patient, body_site=BodySite.BACK),
               LesionFactory(patient=patient, body_site=BodySite.FACE)]  # fmt: skip
    images = LesionImage.objects.bulk_create(
        LesionImage(clinic=clinic, lesion=lesions[index % 2], file=f"uploads/{uuid.uuid4().hex}.jpg",
                    content_type="image/jpeg", sha256="0" * 64, width=400, height=400, file_size=1000,
                    camera=("Acme X1", "")[(index // 2) % 2], state=ImageState.DONE, created_at=at,
                    processed_at=at + timedelta(seconds=2))
        for index in range(count)
    )  # fmt: skip
    missed = 0.3 if malignant else 0.1
    Prediction.objects.bulk_create(
        Prediction(image=image, model_version=version, probability_malignant=0.9 if index < called else missed,
                   label="x", threshold=0.5, decision=decision, created_at=at)
        for index, image in enumerate(images)
    )  # fmt: skip
    if features:
        UploadFeatures.objects.bulk_create(
            UploadFeatures(image=image, model_version=version, values={} if ita is None else {"skin_ita": ita})
            for image in images
        )
    diagnosis = diagnosis or ("melanoma" if malignant else "benign_naevus")
    Feedback.objects.bulk_create(
        Feedback(image=image, kind=Feedback.Kind.HISTOPATHOLOGY, diagnosis=diagnosis,
                 ground_truth=ground_truth_for(diagnosis))
        for image in images
    )  # fmt: skip
    return images


@pytest.fixture
def planted_gap(db, clinic, alert_settings):
    """Confirmed cases of the active version: light skin 27 of 30 melanomas found, dark skin 10 of 20, brown
    skin 0 of 5 (too few to judge), one melanoma whose skin could not be measured (found, at another clinic).
    Left out: 30 dark-skin melanomas the gate refused (they would hide the gap), an 'other' diagnosis, and
    cases scored by another version only."""
    version = model_version()
    north = ClinicFactory(name="North")
    plant(version, clinic=clinic, count=30, ita=LIGHT, malignant=True, called=27)
    plant(version, clinic=clinic, count=30, ita=LIGHT, malignant=False, called=3)
    dark_missed = plant(version, clinic=clinic, count=20, ita=DARK, malignant=True, called=10)[10:]
    plant(version, clinic=clinic, count=20, ita=DARK, malignant=False, called=2)
    plant(version, clinic=clinic, count=5, ita=BROWN, malignant=True, called=0)
    plant(version, clinic=clinic, count=5, ita=BROWN, malignant=False, called=0)
    plant(version, clinic=north, count=1, ita=None, malignant=True, called=1)
    plant(version, clinic=north, count=1, ita=None, malignant=False, called=0, features=False)
    # Not counted.
    plant(version, clinic=clinic, count=30, ita=DARK, malignant=True, called=30, decision="not_assessable")
    plant(version, clinic=clinic, count=1, ita=DARK, malignant=True, called=0, diagnosis="other")
    plant(model_version(active=False), clinic=clinic, count=5, ita=DARK, malignant=True, called=0)
    return {"version": version, "dark_missed": dark_missed}


def groups(report: dict, attribute: str) -> dict:
    return {row["group"]: (row["n"], row["n_positive"], row["sensitivity"]) for row in report["attributes"][attribute]}


# --- the skin tone of each upload --------------------------------------------------------------------------


def skin_jpeg(ita: float, seed: int) -> bytes:
    image = generate_lesion(np.random.default_rng(seed), malignant=True, size=96, skin_ita=ita).image
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=92)
    return buffer.getvalue()


def test_the_worker_stores_each_uploads_skin_tone_with_its_drift_features(
    active_model, clinician, clinic, django_capture_on_commit_callbacks, alert_settings
):
    blue = io.BytesIO()
    Image.new("RGB", (96, 96), (20, 40, 200)).save(blue, format="JPEG")  # no skin: no tone, never a wrong one
    with django_capture_on_commit_callbacks():
        lone = submit_image(uploader=clinician, clinic=clinic, upload=upload_file(skin_jpeg(DARK, seed=1)))
        pair = [submit_image(uploader=clinician, clinic=clinic, upload=upload_file(data))
                for data in (skin_jpeg(48.0, seed=2), blue.getvalue())]  # fmt: skip
    # A lone photo: measured after its prediction is stored; a batch: in the decode threads.
    assert process_image(image_id=str(lone.pk), worker_id="sg-1") == "done"
    assert process_images(image_ids=[str(image.pk) for image in pair], worker_id="sg-2") == {
        str(image.pk): "done" for image in pair
    }
    stored = {image.pk: UploadFeatures.objects.get(image=image).values for image in (lone, *pair)}
    for values in stored.values():
        assert set(drift.IMAGE_FEATURES) <= set(values) and "probability_malignant" in values
    assert stored[lone.pk]["skin_ita"] == pytest.approx(DARK, abs=3) and band_of(stored[lone.pk]["skin_ita"]) == "dark"
    assert stored[pair[0].pk]["skin_ita"] == pytest.approx(48.0, abs=3)
    assert band_of(stored[pair[0].pk]["skin_ita"]) == "light"
    assert "skin_ita" not in stored[pair[1].pk]
    assert "skin_ita" not in drift.FEATURE_NAMES  # the drift check never tests it


def test_a_failing_skin_measure_never_fails_the_upload(db, clinic, alert_settings, monkeypatch, caplog):
    version = model_version()
    (image,) = plant(version, clinic=clinic, count=1, ita=None, malignant=True, called=1, features=False)

    def broken(_):
        raise RuntimeError("planted failure")

    monkeypatch.setattr(sm, "measure_skin_tone", broken)
    photo = generate_lesion(np.random.default_rng(3), malignant=True, size=64, skin_ita=DARK).image
    with caplog.at_level(logging.ERROR, logger=sm.__name__):
        features = record_upload_features(image=image, model_version=version, decoded_image=photo, probability=0.7)
    features.refresh_from_db()
    assert "skin_ita" not in features.values and features.values["probability_malignant"] == 0.7
    assert set(drift.IMAGE_FEATURES) <= set(features.values)
    assert "the skin tone could not be measured" in caplog.text


# --- the live subgroup report ------------------------------------------------------------------------------


def test_live_subgroup_report_finds_the_gap_on_dark_skin(planted_gap):
    version = planted_gap["version"]
    report = sm.live_subgroup_report()  # the active version
    assert report["model_version"] == version.version and report["threshold"] == 0.5
    overall = report["overall"]
    assert (overall["n"], overall["n_positive"], overall["sensitivity"]) == (112, 56, pytest.approx(38 / 56))
    assert groups(report, "skin_tone") == {
        "light": (60, 30, 0.9), "brown": (10, 5, 0.0), "dark": (40, 20, 0.5), "unknown": (2, 1, 1.0),
    }  # fmt: skip
    assert list(groups(report, "skin_tone")) == ["light", "brown", "dark", "unknown"]  # lightest first
    assert groups(report, "clinic") == {"Clinic A": (110, 55, pytest.approx(37 / 55)), "North": (2, 1, 1.0)}
    assert set(groups(report, "site")) == {"Back", "Face"} and set(groups(report, "camera")) == {"Acme X1", "unknown"}
    assert set(report["attributes"]) == {"skin_tone", "site", "clinic", "camera"}  # no sex, no age: not stored

    found = sm.gaps(report)
    assert [(gap["attribute"], gap["group"]) for gap in found] == [("skin_tone", "dark")]
    assert found[0]["sensitivity_ci"] == pytest.approx(wilson_interval(10, 20))
    # Brown skin misses all 5 melanomas, but 5 is too few to judge.
    present, message = sm.alert_condition(report)
    assert present is True
    assert "skin tone Dark: sensitivity 50% (95% CI 30%–70%) on 40 confirmed cases (20 malignant)" in message
    assert f"the overall sensitivity of {version.version}, 68% (95% CI" in message
    assert "on 112 confirmed cases (56 malignant)" in message and "Brown" not in message

    # The same outcomes give the overall live performance (one source of confirmed outcomes), refused photos included.
    performance = live_performance(version)
    assert (performance.cases, performance.malignant, performance.true_positive) == (142, 86, 68)


def test_a_subgroup_with_too_few_malignant_cases_is_not_alerted(planted_gap, alert_settings):
    report = sm.live_subgroup_report()
    alert_settings.SUBGROUP_ALERT_MIN_POSITIVES = 21  # dark skin has 20: no longer judged
    assert sm.gaps(report) == []
    present, message = sm.alert_condition(report)  # light skin (30) and the sites are still judged
    assert present is False and message.startswith("No subgroup's sensitivity falls short of")
    alert_settings.SUBGROUP_ALERT_MIN_POSITIVES = 1000  # nothing judged: an open alert stays as it is
    assert sm.alert_condition(report) is None
    alert_settings.SUBGROUP_ALERT_MIN_POSITIVES = 20
    alert_settings.SUBGROUP_ALERT_MARGIN = 0.20  # dark skin is 18 points below: within the margin
    assert sm.gaps(report) == [] and sm.alert_condition(report)[0] is False
    assert sm.alert_condition(None) is None


def test_without_a_model_or_confirmed_cases_there_is_no_report(db, alert_settings):
    assert sm.live_subgroup_report() is None  # no active model
    version = model_version()
    assert sm.live_subgroup_report(version) is None  # no confirmed case
    assert sm.operations_subgroups(None, timezone.now(), version) == {}


# --- the alert ---------------------------------------------------------------------------------------------


def test_the_subgroup_alert_opens_with_the_drift_report_and_closes_when_the_gap_is_gone(
    planted_gap, alert_settings, mailoutbox
):
    report = run_drift_report(triggered_by="tests")
    kept = report.operations["subgroups"]  # the JSON report keeps the subgroup figures
    assert kept["model_version"] == planted_gap["version"].version
    assert groups(kept, "skin_tone")["dark"] == (40, 20, 0.5)
    alert = MonitoringAlert.objects.get(kind=MonitoringAlert.Kind.SUBGROUP)
    assert alert.closed_at is None and alert.report == report
    assert "skin tone Dark: sensitivity 50% (95% CI 30%–70%)" in alert.message
    assert [mail.subject for mail in mailoutbox] == ["[Lesion triage] Sensitivity gap in a subgroup alert"]
    assert alert.message in mailoutbox[0].body
    assert set(MonitoringAlert.objects.values_list("kind", flat=True)) == {"subgroup"}

    run_drift_report(triggered_by="tests")  # still there: kept open, nobody told again
    alert.refresh_from_db()
    assert alert.closed_at is None and alert.reports_seen == 2 and len(mailoutbox) == 1

    # The missed dark-skin melanomas are scored again and found: no gap any more.
    Prediction.objects.filter(image__in=planted_gap["dark_missed"]).update(probability_malignant=0.9)
    run_drift_report(triggered_by="tests")
    alert.refresh_from_db()
    assert alert.closed_at is not None and len(mailoutbox) == 1
    assert not MonitoringAlert.objects.filter(closed_at__isnull=True).exists()


# --- the skin-tone mix -------------------------------------------------------------------------------------


@pytest.fixture
def mix_data(db, clinic, alert_settings):
    """Training: 6 very light, 3 light, 1 dark and 2 unmeasured images. Uploads in the window: 2 dark, 2 brown,
    1 unmeasured; one very light upload older than the window."""
    version = model_version()
    training = [60.0] * 6 + [45.0] * 3 + [-40.0] + [None] * 2
    held_out = [-45.0] * 3  # validation and test photos: not what the model was trained on, not counted
    ReferenceFeature.objects.bulk_create(
        ReferenceFeature(model_version=version, split=split, label="benign", path=f"ref/{split}/{index}.jpg",
                         values={"brightness": 120.0, **({} if ita is None else {"skin_ita": ita})})
        for split, values in (("train", training), ("validation", held_out[:2]), ("test", held_out[2:]))
        for index, ita in enumerate(values)
    )  # fmt: skip
    for ita in (-40.0, -35.0, 0.0, 5.0, None):
        plant(version, clinic=clinic, count=1, ita=ita, malignant=False, called=0)
    plant(version, clinic=clinic, count=1, ita=60.0, malignant=False, called=0, at=timezone.now() - timedelta(days=10))
    return version


def test_skin_tone_mix_of_uploads_against_training(mix_data, alert_settings):
    now = timezone.now()
    mix = sm.skin_tone_mix(mix_data, now - timedelta(days=7), now)
    assert (mix["training_measured"], mix["training_total"]) == (10, 12)
    assert (mix["uploads_measured"], mix["uploads_total"]) == (4, 5)
    shares = {band["band"]: (band["training_share"], band["uploads_share"]) for band in mix["bands"]}
    assert shares == {
        "very_light": (0.6, 0.0), "light": (0.3, 0.0), "intermediate": (0.0, 0.0), "tan": (0.0, 0.0),
        "brown": (0.0, 0.5), "dark": (0.1, 0.5),
    }  # fmt: skip
    assert [band["ita"] for band in mix["bands"]] == [
        "above 55°", "41° to 55°", "28° to 41°", "10° to 28°", "-30° to 10°", "-30° and below",
    ]  # fmt: skip
    assert sm.skin_tone_mix(mix_data, None, now)["uploads_measured"] == 5  # from the first upload
    assert sm.skin_tone_mix(None, None, now)["training_measured"] == 0  # no model: uploads alone
    assert sm.skin_tone_mix_svg(mix).startswith("<svg")

    report = run_drift_report(triggered_by="tests")  # the JSON report keeps the mix of its window
    kept = report.operations["skin_tone_mix"]
    assert kept["uploads_measured"] == 4 and kept["bands"][-1]["uploads_share"] == 0.5
    assert "subgroups" in report.operations and not MonitoringAlert.objects.exists()  # 6 benign cases only


# --- the dashboard -----------------------------------------------------------------------------------------


def test_dashboard_shows_the_subgroup_table_plot_and_skin_tone_mix_to_staff(client, ops_user, planted_gap):
    client.force_login(ops_user)
    response = client.get(DASHBOARD)
    assert response.status_code == 200
    html = response.content.decode()
    section = html[html.index('<section id="subgroups">') : html.index('<section id="skin-tone-mix">')]
    assert "Performance by subgroup (confirmed outcomes)" in section
    assert "112 confirmed cases scored by" in section
    assert ('<tr><td>Overall</td><td>all confirmed cases</td><td class="num">112</td><td class="num">56</td>'
            in section)  # fmt: skip
    low, high = wilson_interval(10, 20)
    assert ('<tr><td>Skin tone</td><td><span class="drifted">Dark</span></td><td class="num">40</td>'
            '<td class="num">20</td>') in section  # fmt: skip
    assert f'<span class="drifted">0.500 [{low:.3f}–{high:.3f}]</span>' in section
    brown = section[section.index("<td>Brown</td>") :]
    assert brown[: brown.index("</tr>")].endswith("<td>too few</td>")  # 10 cases
    assert "<td>Clinic</td><td>North</td>" in section and "<td>Body site</td><td>Back</td>" in section
    assert "<td>Skin tone</td><td>not measured</td>" in section
    assert "<svg" in section and "Sensitivity by skin_tone" in section
    assert "no sex or age is stored" in section

    mix = html[html.index('<section id="skin-tone-mix">') :]
    assert "Skin-tone mix" in mix
    # Every planted upload with features is in the window: 146 measured (60 light; 40 + 30 refused + 1 'other'
    # + 5 of another version dark; 10 brown) and 1 not; the active version has no training tones stored.
    assert "146 of 147 uploads" in mix
    assert '<tr><td>Dark</td><td>-30° and below</td><td class="num">–</td><td class="num">52% (76)</td></tr>' in mix
    assert '<tr><td>Light</td><td>41° to 55°</td><td class="num">–</td><td class="num">41% (60)</td></tr>' in mix


def test_dashboard_sections_without_outcomes_and_for_non_staff(client, ops_user, clinician, alert_settings):
    client.force_login(clinician)
    response = client.get(DASHBOARD)
    assert response.status_code == 302 and response["Location"].startswith("/admin/login/")  # not staff
    client.force_login(ops_user)
    html = client.get(DASHBOARD).content.decode()
    assert "No histopathology outcome recorded yet for assessable photos scored by the active model." in html
    assert '<section id="skin-tone-mix">' in html and "0 of 0 uploads" in html
