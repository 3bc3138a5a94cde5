"""The drift dashboard: a page inside the Django admin (wrapped by admin_view: staff only), for users with
the view permission on drift reports; "run now" needs the change permission (services.drift_requests)."""

from __future__ import annotations

from datetime import timedelta

from django.conf import settings
from django.contrib import admin, messages
from django.core.exceptions import PermissionDenied
from django.http import FileResponse, Http404
from django.shortcuts import get_object_or_404, redirect
from django.template.response import TemplateResponse
from django.urls import path
from django.utils import timezone
from django.utils.safestring import mark_safe
from django.views.decorators.http import require_POST

from .models import DriftReport, MonitoringAlert, UploadFeatures
from .services import drift_plots, drift_requests, monitoring, quality_monitoring, subgroup_monitoring
from .services.registry import active_model_version

TIMELINE_REPORTS = 60


def dashboard(request):
    drift_requests.require_view(request.user)
    reports = DriftReport.objects.select_related("model_version")
    selected_id = request.GET.get("report")
    report = None
    if selected_id:
        if not (selected_id.isascii() and selected_id.isdigit()):
            raise Http404("No such report.")
        report = get_object_or_404(reports, pk=selected_id)
    else:
        report = reports.first()
    features = report.features if report else []
    recent = list(reports[:TIMELINE_REPORTS])
    charts = drift_plots.dashboard_plots(report, recent)  # SVG drawn by matplotlib from numbers: safe to inline
    model_version = active_model_version()
    context = {
        **admin.site.each_context(request),
        "title": "Drift dashboard",
        "report": report,
        "reports": recent[:20],
        "groups": _grouped(features),
        "embedding_features": [f for f in features if f["group"] == "embedding"],
        "histograms_svg": mark_safe(charts.histograms_svg),
        "prediction_svg": mark_safe(charts.prediction_svg),
        "timeline_svg": mark_safe(charts.timeline_svg),
        "open_alerts": MonitoringAlert.objects.filter(closed_at__isnull=True),
        "recent_alerts": MonitoringAlert.objects.select_related("report")[:10],
        "performance": monitoring.live_performance(model_version),
        "model_version": model_version,
        "settings": {
            "window": monitoring.window_bounds(timezone.now())[2],
            "min_uploads": settings.DRIFT_MIN_UPLOADS, "alpha": settings.DRIFT_ALPHA,
            "interval_hours": settings.DRIFT_REPORT_INTERVAL_SECONDS / 3600,
        },
        "can_run": request.user.has_perm(drift_requests.RUN_PERMISSION),
        "recent_outliers": UploadFeatures.objects.exclude(outlier_features=[]).select_related("image")
        .order_by("-computed_at")[:10],
        **_quality_context(report),
        **_subgroup_context(report, model_version),
    }  # fmt: skip
    return TemplateResponse(request, "admin/monitoring/dashboard.html", context)


def _window(report: DriftReport | None):
    """The dashboard's window: (start, end, description); for a window of the last N uploads, the shown
    report's span."""
    now = timezone.now()
    start, end, description = monitoring.window_bounds(now)
    if start is None:
        start = report.window_start if report else now - timedelta(days=settings.DRIFT_WINDOW_DAYS)
        description = f"since {start:%Y-%m-%d %H:%M}"
    return start, end, description


def _subgroup_context(report: DriftReport | None, model_version) -> dict:
    """Live performance per subgroup on confirmed outcomes, and the skin-tone mix of the window's uploads
    against the active model's training images. The SVGs hold only numbers and band names: safe to inline."""
    start, end, description = _window(report)
    found = subgroup_monitoring.dashboard(model_version, start, end)
    return {
        "subgroups": found, "mix_window": description,
        "subgroup_svg": mark_safe(found["plot_svg"]), "mix_svg": mark_safe(found["mix_svg"]),
    }  # fmt: skip


def _quality_context(report: DriftReport | None) -> dict:
    """The photo-quality gate over the dashboard's window (for a window of the last N uploads: the shown
    report's span), and its calibration against clinicians' feedback."""
    start, end, description = _window(report)
    summary = quality_monitoring.summary(start, end)
    return {
        "quality": summary,
        "quality_window": description,
        "quality_tables": [("Clinic", summary.clinics), ("Camera", summary.cameras), ("Day", summary.days)],
        "quality_svg": mark_safe(drift_plots.quality_series_svg(summary.days)),  # numbers and dates only
        "quality_alert": {
            "hours": settings.QUALITY_ALERT_WINDOW_HOURS,
            "rate": settings.QUALITY_ALERT_RATE,
            "margin": settings.QUALITY_ALERT_MARGIN,
            "min_photos": settings.QUALITY_ALERT_MIN_PHOTOS,
            "baseline_days": settings.QUALITY_ALERT_BASELINE_DAYS,
        },
        "calibration": quality_monitoring.calibration_report(),
        "calibration_days": settings.QUALITY_CALIBRATION_DAYS,
    }


def _grouped(features: list[dict]) -> list[tuple[str, list[dict]]]:
    names = {"image": "Image", "file": "File and camera", "prediction": "Prediction", "embedding": "Embedding"}
    return [(label, [f for f in features if f["group"] == key]) for key, label in names.items()
            if any(f["group"] == key for f in features)]  # fmt: skip


@require_POST
def run_now(request):
    try:
        drift_requests.request_report(request.user)
    except drift_requests.TooSoon as exc:
        messages.warning(request, str(exc))
    except PermissionDenied:
        raise
    except Exception as exc:  # the broker is down: say so instead of a 500
        messages.error(request, f"The report could not be queued ({exc}). Is the broker running?")
    else:
        messages.success(request, "A drift report was queued; it appears here when the worker has computed it.")
    return redirect("drift-dashboard")


def evidently_html(request, pk: int):
    drift_requests.require_view(request.user)
    report = get_object_or_404(DriftReport, pk=pk)
    if not report.html:
        raise Http404("This report has no Evidently HTML (too few uploads, or it failed).")
    try:
        handle = report.html.open("rb")
    except FileNotFoundError:
        raise Http404("The stored Evidently report is missing.") from None
    response = FileResponse(handle, content_type="text/html; charset=utf-8")
    # Evidently's page runs its own scripts: give it a sandbox (an opaque origin, no admin cookies).
    response["Content-Security-Policy"] = "sandbox allow-scripts"
    response["Cache-Control"] = "private, no-store"
    response["X-Content-Type-Options"] = "nosniff"
    return response


def urls() -> list:
    return [
        path("admin/monitoring/drift/", admin.site.admin_view(dashboard), name="drift-dashboard"),
        path("admin/monitoring/drift/run/", admin.site.admin_view(run_now), name="drift-run"),
        path("admin/monitoring/drift/<int:pk>/evidently/", admin.site.admin_view(evidently_html),
             name="drift-evidently"),
    ]  # fmt: skip
