"""Drift and performance monitoring: per-upload features, drift reports, alerts, live performance.

The statistics live in mlcore.drift (tested without Django); this module chooses the window and the
reference set, stores reports and their Evidently files, and decides when to tell someone.

Long because: the upload features, the drift report, its alerts and the live performance all read the
same window and reference set; each function is short, and the module stays just over 400 lines.
"""

from __future__ import annotations

import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from datetime import timedelta

import numpy as np
from django.conf import settings
from django.contrib.auth import get_user_model
from django.core.files.base import ContentFile
from django.core.files.storage import default_storage
from django.core.mail import send_mail
from django.db import IntegrityError, transaction
from django.db.models import F
from django.utils import timezone

from mlcore import drift, metrics

from ..models import (
    DriftReport,
    ImageState,
    LesionImage,
    ModelVersion,
    MonitoringAlert,
    Prediction,
    ReferenceFeature,
    UploadFeatures,
)
from . import quality_monitoring, subgroup_monitoring
from .registry import VersionCache, active_model_version
from .transactions import savepoint_if_inside

logger = logging.getLogger(__name__)

# Splits the model never trained on: its probability and embedding there are what new photos get.
HELD_OUT_SPLITS = ("validation", "test")


# --- the reference set ------------------------------------------------------------------------------


def reference_rows(model_version: ModelVersion) -> list[dict]:
    """The reference feature rows: the images the model did not train on (validation and test),
    whose predicted probabilities and embeddings are distributed as those of new photos; training
    images (on which the model is over-confident) only when there are too few held-out ones."""
    rows = ReferenceFeature.objects.filter(model_version=model_version)
    held_out = list(rows.filter(split__in=HELD_OUT_SPLITS).values_list("values", flat=True))
    if len(held_out) >= settings.DRIFT_MIN_REFERENCE:
        return held_out
    return list(rows.values_list("values", flat=True))


_references = VersionCache(lambda model_version: drift.columns(reference_rows(model_version)))


def reference_columns(model_version: ModelVersion) -> dict[str, np.ndarray]:
    """Per process, for the version being served (reference sets never change once registered)."""
    return _references.get(model_version)


# --- per upload ---------------------------------------------------------------------------------------


def record_upload_features(
    *, image: LesionImage, model_version: ModelVersion, decoded_image, probability: float, embedding=None
) -> UploadFeatures:
    """Store an upload's drift features and where each lies in the reference set."""
    (features,) = _store_features([_upload_features(image, model_version, decoded_image, probability, embedding)])
    return features


def record_upload_features_many(items, *, model_version: ModelVersion) -> None:
    """record_upload_features for a batch of (image, decoded image, probability, embedding), with one
    INSERT for the batch. The decoded image may be its image features already (a dict: an inference
    worker measures them in its decode threads). Never raises: monitoring must not undo stored
    predictions. Each image's features are computed once; when the batch cannot be stored together,
    each row is tried on its own."""
    rows = []
    for image, decoded_image, probability, embedding in items:
        try:
            rows.append(_upload_features(image, model_version, decoded_image, probability, embedding))
        except Exception:
            logger.exception("drift features could not be computed for image %s", image.pk)
    if not rows:
        return
    try:
        with savepoint_if_inside():
            _store_features(rows)
        return
    except Exception:
        logger.warning("drift features of a batch of %d could not be stored together; one by one", len(rows))
    for row in rows:
        try:
            with savepoint_if_inside():
                _store_features([row])
        except Exception:
            logger.exception("drift features could not be stored for image %s", row.image_id)


UPLOAD_FEATURE_FIELDS = ["model_version", "values", "placement", "outlier_features", "computed_at"]


def _upload_features(image, model_version, decoded_image, probability, embedding) -> UploadFeatures:
    # The photo's own size, not the decoded copy's: the worker may decode a large JPEG at a reduced scale.
    # A decode thread measured the features (and the skin tone) already; else both from one thumbnail.
    if isinstance(decoded_image, dict):
        pixels = decoded_image
    else:
        thumbnail = drift.feature_thumbnail(decoded_image)
        pixels = {**drift.image_features(thumbnail), **subgroup_monitoring.skin_tone_values(thumbnail)}
    values = {**pixels,
              **drift.file_features(width=image.width, height=image.height, file_size=image.upload_bytes)}  # fmt: skip
    values["probability_malignant"] = float(probability)
    projection = drift.Projection.from_dict(model_version.drift_projection)
    if projection is not None and embedding is not None and len(embedding) == len(projection.mean):
        values.update(projection.features(np.asarray(embedding)))
    placement = drift.outliers(reference_columns(model_version), values)
    return UploadFeatures(
        image=image, model_version=model_version, values=values, placement=placement,
        outlier_features=[row["feature"] for row in placement if row["outlier"]], computed_at=timezone.now(),
    )  # fmt: skip


def _store_features(rows: list[UploadFeatures]) -> list[UploadFeatures]:
    # One INSERT ... ON CONFLICT: the features of a photo scored again replace the earlier ones.
    return UploadFeatures.objects.bulk_create(
        rows, update_conflicts=True, unique_fields=["image"], update_fields=UPLOAD_FEATURE_FIELDS
    )


# --- reports ------------------------------------------------------------------------------------------


def window_bounds(now):
    """The current window: the last DRIFT_WINDOW_UPLOADS scored uploads when set, else the last
    DRIFT_WINDOW_DAYS days."""
    if settings.DRIFT_WINDOW_UPLOADS:
        return None, now, f"last {settings.DRIFT_WINDOW_UPLOADS} uploads"
    days = settings.DRIFT_WINDOW_DAYS
    return now - timedelta(days=days), now, f"last {days:g} day{'s' if days != 1 else ''}"


def operations_summary(start, end, model_version: ModelVersion | None = None) -> dict:
    """Uploads, failures and processing latency (upload to result) in the window; the quality gate's
    rates (not assessable, uncertain; per clinic and camera; the checks that refused most) under "quality"
    when photos of the window went through it; and the skin-tone mix of the window's uploads against
    `model_version`'s training images, and its live subgroup report, under "skin_tone_mix" and "subgroups"
    (services.subgroup_monitoring) when there is something to show."""
    images = LesionImage.objects.filter(created_at__lte=end)
    if start is not None:
        images = images.filter(created_at__gte=start)
    total = images.count()
    failed = images.filter(state=ImageState.FAILED).count()
    waits = [
        (processed - created).total_seconds()
        for created, processed in images.filter(state=ImageState.DONE, processed_at__isnull=False).values_list(
            "created_at", "processed_at"
        )[:10000]
    ]
    return {
        "uploads": total,
        "failed": failed,
        "failed_share": failed / total if total else None,
        "latency_p50_s": float(np.percentile(waits, 50)) if waits else None,
        "latency_p95_s": float(np.percentile(waits, 95)) if waits else None,
        **quality_monitoring.operations_quality(start, end),
        **subgroup_monitoring.operations_subgroups(start, end, model_version),
    }


def run_drift_report(*, triggered_by: str = "schedule", now=None) -> DriftReport:
    """Compare the current window with the active model's reference set and store the report (with
    Evidently's snapshot and HTML), then open, refresh or close alerts. Never raises for bad data:
    a report that cannot be computed is stored as failed, with the reason."""
    started = time.perf_counter()
    now = now or timezone.now()
    start, end, description = window_bounds(now)
    model_version = active_model_version()
    config = drift.DriftConfig(alpha=settings.DRIFT_ALPHA, min_current=settings.DRIFT_MIN_UPLOADS,
                               min_reference=settings.DRIFT_MIN_REFERENCE)  # fmt: skip
    base = {"model_version": model_version, "window_end": end, "window_description": description,
            "alpha": config.alpha, "method": config.method, "triggered_by": triggered_by[:150]}  # fmt: skip
    if model_version is None:
        report = DriftReport.objects.create(
            window_start=start or end, status=DriftReport.Status.INSUFFICIENT,
            operations=operations_summary(start, end),
            message="No model is active, so there is no reference set to compare with.", **base,
        )  # fmt: skip
        evaluate_alerts(report)  # failed uploads and latency are judged whatever the drift check says
        return report
    current = UploadFeatures.objects.filter(model_version=model_version, image__created_at__lte=end)
    if start is not None:
        current = current.filter(image__created_at__gte=start)
    current = current.order_by("-image__created_at")
    if settings.DRIFT_WINDOW_UPLOADS:
        current = current[: settings.DRIFT_WINDOW_UPLOADS]
    current_rows = list(current.values_list("values", "image__created_at"))
    if start is None:
        start = min((created for _, created in current_rows), default=end)
    current_values = [values for values, _ in current_rows]
    operations = operations_summary(start, end, model_version)
    reference = reference_rows(model_version)
    try:
        check = drift.check_drift(drift.columns(reference), drift.columns(current_values), config)
    except Exception as exc:  # a report must never take the worker down
        logger.exception("drift check failed")
        report = DriftReport.objects.create(
            window_start=start, status=DriftReport.Status.FAILED, message=f"The drift check failed: {exc}",
            current_count=len(current_values), reference_count=len(reference), operations=operations, **base,
        )  # fmt: skip
        evaluate_alerts(report)
        return report
    report = DriftReport.objects.create(
        window_start=start, status=check.status, message=check.message, current_count=check.current_n,
        reference_count=check.reference_n, features=[_feature_dict(f) for f in check.features],
        drifted_features=check.drifted_features, embedding_drifted=check.embedding_drifted,
        operations=operations, **base,
    )  # fmt: skip
    if check.features:
        try:
            _store_evidently(report, reference, current_values, check)
        except Exception:  # the verdict stands without the HTML; say so in the log
            logger.exception("could not build the Evidently report for drift report %s", report.pk)
    report.duration_ms = (time.perf_counter() - started) * 1000
    report.save(update_fields=["snapshot", "html", "duration_ms"])
    evaluate_alerts(report)
    return report


def _feature_dict(feature: drift.FeatureDrift) -> dict:
    return {
        "feature": feature.feature, "label": feature.label, "group": feature.group, "test": feature.test,
        "p_value": feature.p_value, "threshold": feature.threshold, "drifted": feature.drifted,
        "reference_n": feature.reference_n, "current_n": feature.current_n,
        "reference_median": feature.reference_median, "current_median": feature.current_median,
        "histogram": feature.histogram,
    }  # fmt: skip


def _store_evidently(report: DriftReport, reference: list[dict], current: list[dict], check) -> None:
    snapshot = drift.evidently_report(reference, current, check)
    folder = f"monitoring/drift/{report.pk}"
    report.snapshot = default_storage.save(f"{folder}/snapshot.json", ContentFile(json.dumps(snapshot.dict())))
    # (save_html writes only to a path; a file object is silently ignored.)
    html = snapshot.get_html_str(as_iframe=False)
    report.html = default_storage.save(f"{folder}/report.html", ContentFile(html.encode()))


# --- alerts -------------------------------------------------------------------------------------------


def alert_conditions(report: DriftReport) -> dict[str, tuple[bool, str]]:
    """Per alert kind that this report can judge: (is the condition present, message). The quality
    gate's alert judges its own recent window against a baseline (services.quality_monitoring); the
    subgroup alert, the live subgroup report kept in the report's operations (services.subgroup_monitoring)."""
    conditions: dict[str, tuple[bool, str]] = {}
    if report.status in (DriftReport.Status.DRIFT, DriftReport.Status.NO_DRIFT):
        conditions[MonitoringAlert.Kind.DRIFT] = (
            report.status == DriftReport.Status.DRIFT,
            f"Uploads in the window ({report.window_description}) no longer look like the training data of "
            f"{report.model_version.version}. {report.message}",
        )
    ops = report.operations or {}
    if ops.get("uploads", 0) >= settings.ALERT_MIN_UPLOADS and ops.get("failed_share") is not None:
        share = ops["failed_share"]
        conditions[MonitoringAlert.Kind.FAILURES] = (
            share > settings.ALERT_FAILED_SHARE,
            f"{ops['failed']} of {ops['uploads']} uploads ({share:.0%}) failed in the window "
            f"({report.window_description}); "
            f"the alert threshold is {settings.ALERT_FAILED_SHARE:.0%}.",
        )
    if ops.get("latency_p95_s") is not None and ops.get("uploads", 0) >= settings.ALERT_MIN_UPLOADS:
        p95 = ops["latency_p95_s"]
        conditions[MonitoringAlert.Kind.LATENCY] = (
            p95 > settings.ALERT_LATENCY_P95_SECONDS,
            f"95% of uploads got their result within {p95:.1f} s in the window ({report.window_description}); "
            f"the alert threshold is {settings.ALERT_LATENCY_P95_SECONDS:g} s.",
        )
    quality = quality_monitoring.alert_condition(report.window_end)  # its own window: the last day or so
    if quality is not None:
        conditions[MonitoringAlert.Kind.QUALITY] = quality
    subgroup = subgroup_monitoring.alert_condition(ops.get("subgroups"))  # every confirmed outcome so far
    if subgroup is not None:
        conditions[MonitoringAlert.Kind.SUBGROUP] = subgroup
    return conditions


def evaluate_alerts(report: DriftReport) -> list[MonitoringAlert]:
    """Open an alert (and notify) when a condition starts, keep it open without notifying again while
    it lasts, and close it when a report finds it gone. A condition that comes back within
    ALERT_COOLDOWN_MINUTES of its episode closing reopens that episode without a new message, so a
    value hovering at its threshold does not send mail every other report. Returns the alerts opened
    (and notified) now."""
    opened = []
    now = timezone.now()
    for kind, (present, message) in alert_conditions(report).items():
        current = MonitoringAlert.objects.filter(kind=kind, closed_at__isnull=True).first()
        if present and current is None:
            recent = (
                MonitoringAlert.objects.filter(
                    kind=kind, closed_at__gte=now - timedelta(minutes=settings.ALERT_COOLDOWN_MINUTES)
                ).order_by("-closed_at").first()
            )  # fmt: skip
            if recent is not None:
                MonitoringAlert.objects.filter(pk=recent.pk).update(
                    closed_at=None, last_seen_at=now, reports_seen=F("reports_seen") + 1
                )
                continue
            try:
                with transaction.atomic():
                    alert = MonitoringAlert.objects.create(kind=kind, report=report, message=message)
            except IntegrityError:  # another report opened this episode at the same moment
                continue
            notify(alert)
            opened.append(alert)
        elif present:
            MonitoringAlert.objects.filter(pk=current.pk).update(last_seen_at=now, reports_seen=F("reports_seen") + 1)
        elif current is not None:
            MonitoringAlert.objects.filter(pk=current.pk).update(closed_at=now)
    return opened


def alert_recipients() -> list[str]:
    if settings.ALERT_EMAILS:
        return list(settings.ALERT_EMAILS)
    staff = get_user_model().objects.filter(is_staff=True, is_active=True).exclude(email="")
    return sorted(set(staff.values_list("email", flat=True)))


def notify(alert: MonitoringAlert) -> None:
    """E-mail the staff and call the webhook; failures are recorded on the alert, never raised."""
    subject = f"[Lesion triage] {alert.get_kind_display()} alert"
    body = f"{alert.message}\n\nOpened {alert.opened_at:%Y-%m-%d %H:%M %Z}. See the drift dashboard in the admin."
    recipients = alert_recipients()
    if recipients:
        try:
            send_mail(subject, body, None, recipients, fail_silently=False)
            alert.emailed_to = recipients
        except Exception as exc:
            alert.email_error = str(exc)[:2000]
            logger.warning("could not e-mail the %s alert: %s", alert.kind, exc)
    if settings.ALERT_WEBHOOK_URL:
        payload = json.dumps({"kind": alert.kind, "message": alert.message, "opened_at": alert.opened_at.isoformat(),
                              "report_id": alert.report_id}).encode()  # fmt: skip
        request = urllib.request.Request(
            settings.ALERT_WEBHOOK_URL, data=payload, method="POST", headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(request, timeout=settings.ALERT_WEBHOOK_TIMEOUT_SECONDS) as response:
                alert.webhook_status = f"HTTP {response.status}"
        except urllib.error.HTTPError as exc:
            alert.webhook_status = f"HTTP {exc.code}"
        except Exception as exc:
            alert.webhook_status = f"error: {exc}"[:200]
            logger.warning("the alert webhook failed: %s", exc)
    alert.save(update_fields=["emailed_to", "email_error", "webhook_status"])


# --- live performance on confirmed outcomes ---------------------------------------------------------


@dataclass
class LivePerformance:
    model_version: str
    cases: int
    malignant: int
    benign: int
    auc: float | None
    sensitivity: float | None
    specificity: float | None
    true_positive: int
    false_negative: int
    true_negative: int
    false_positive: int
    test: dict

    def rows(self) -> list[tuple[str, float | None, float | None]]:
        return [("AUC", self.auc, self.test.get("auc")),
                ("Sensitivity", self.sensitivity, self.test.get("sensitivity")),
                ("Specificity", self.specificity, self.test.get("specificity"))]  # fmt: skip


def live_performance(model_version: ModelVersion | None = None) -> LivePerformance | None:
    """The model's AUC, sensitivity and specificity on the images with a histopathology outcome
    (the newest outcome per image; 'other' diagnoses have no label and are left out), against its
    test-set figures."""

    model_version = model_version or active_model_version()
    if model_version is None:
        return None
    labelled = subgroup_monitoring.confirmed_outcomes()
    predictions = Prediction.objects.filter(model_version=model_version, image_id__in=labelled).values_list(
        "image_id", "probability_malignant", "threshold"
    )
    labels, scores, calls = [], [], []
    for image_id, probability, threshold in predictions:
        labels.append(labelled[image_id])
        scores.append(probability)
        calls.append(probability >= threshold)
    y, called = np.array(labels, dtype=bool), np.array(calls, dtype=bool)
    tp, fn = int((called & y).sum()), int((~called & y).sum())
    tn, fp = int((~called & ~y).sum()), int((called & ~y).sum())
    both = 0 < y.sum() < len(y)
    return LivePerformance(
        model_version=model_version.version, cases=len(y), malignant=int(y.sum()), benign=int((~y).sum()),
        auc=metrics.roc_auc(y, scores) if both else None,
        sensitivity=tp / (tp + fn) if tp + fn else None, specificity=tn / (tn + fp) if tn + fp else None,
        true_positive=tp, false_negative=fn, true_negative=tn, false_positive=fp,
        test=(model_version.metrics or {}).get("test", {}),
    )  # fmt: skip
