"""The drift dashboard's charts, drawn from stored drift reports with mlcore.plots (inline SVG), and the
photo-quality gate's daily rates (drawn here with matplotlib in the same style).

The admin asks this service for its pictures rather than importing mlcore itself: admin → services →
mlcore. The SVG comes from matplotlib and holds only numbers and feature names, so the admin may mark
it safe.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlcore import plots
from mlcore.plots import plt  # pyplot, after mlcore.plots chose the Agg backend

from ..models import DriftReport
from .quality_monitoring import Rates


@dataclass(frozen=True)
class DriftPlots:
    histograms_svg: str  # every feature of the report: reference against current ("" when none)
    prediction_svg: str  # the predicted probability alone ("" when the report has none)
    timeline_svg: str  # past reports' smallest p-value against its threshold ("" when none was judged)


def dashboard_plots(report: DriftReport | None, recent: list[DriftReport]) -> DriftPlots:
    """The charts of `report` (None: no report yet), and the timeline of `recent` reports (newest first)."""
    features = report.features if report else []
    prediction = next((f for f in features if f["feature"] == "probability_malignant"), None)
    return DriftPlots(
        histograms_svg=plots.drift_histograms_svg(features),
        prediction_svg=plots.drift_histograms_svg([prediction], columns=1) if prediction else "",
        timeline_svg=plots.drift_timeline_svg(timeline_points(recent)),
    )


def timeline_points(recent: list[DriftReport]) -> list[dict]:
    """Oldest first: each report's smallest p-value and the threshold it is held to (alpha over the number
    of features judged)."""
    points = []
    for past in reversed(recent):
        judged = [f for f in past.features if f.get("p_value") is not None]
        smallest = min(judged, key=lambda f: f["p_value"]) if judged else None
        points.append({
            "created_at": past.created_at, "status": past.status,
            "min_p": smallest["p_value"] if smallest else None,
            "threshold": past.alpha / max(len(judged), 1),
        })  # fmt: skip
    return points


def quality_series_svg(days: list[Rates]) -> str:
    """Per day (oldest first): the share of done photos not assessable and uncertain, in percent; each day's
    date and number of photos under its point. "" when no day had a photo."""
    days = [day for day in days if day.photos]
    if not days:
        return ""
    figure, axis = plt.subplots(figsize=(9, 2.4))
    positions = list(range(len(days)))
    axis.plot(positions, [100 * day.not_assessable_share for day in days], marker="o", color="#c0392b",
              linewidth=1, markersize=4, label="not assessable")  # fmt: skip
    axis.plot(positions, [100 * day.uncertain_share for day in days], marker="s", color="#e67e22", linewidth=1,
              markersize=4, label="uncertain")  # fmt: skip
    axis.set_xticks(positions, [f"{day.label[5:]}\n{day.photos}" for day in days])  # MM-DD, photos that day
    axis.set_ylim(bottom=0)
    axis.set_ylabel("% of done photos", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7, loc="upper left")
    return plots.inline_svg(figure)
