"""Performance by subgroup on confirmed outcomes, the skin-tone mix of uploads against training, and the
subgroup alert (issue 21, items 4 and 5, the live side).

Each processed upload stores its skin tone with its drift features: `skin_ita` in UploadFeatures.values, the
individual typology angle of the skin around the lesion (mlcore.skintone), measured on the same feature
thumbnail as the drift features. The training pipeline stores the same for each reference image, so the mix
of uploads can be set against the mix the model learnt from.

Live performance per subgroup is computed on the confirmed cases of one model version: the photos with a
histopathology outcome (the newest per photo; an "other" diagnosis has no label) that the version scored and
did not refuse as not assessable. The groups known live are the skin-tone band, the lesion's body site, the
clinic and the camera. Patients are pseudonymous: no sex or age is stored, so nothing is grouped by sex or age
band here (evaluation reports them where a data set's metadata has them).

The statistics are mlcore.subgroups' (no Django). This module gathers the cases, keeps the report with each
drift report (in its `operations`), judges the alert that monitoring.evaluate_alerts opens and closes, and
draws the dashboard's pictures.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from django.conf import settings

from mlcore.plots import inline_svg, plt  # pyplot, after mlcore.plots chose the Agg backend
from mlcore.skintone import BAND_LABELS, BAND_SLUGS, BANDS, band_of, measure_skin_tone
from mlcore.subgroups import UNKNOWN, sensitivity_gaps, subgroup_plot_svg, subgroup_report

from ..models import BodySite, Feedback, ModelVersion, Prediction, ReferenceFeature, RiskDecision, UploadFeatures
from .registry import VersionCache, active_model_version

logger = logging.getLogger(__name__)

ATTRIBUTE_LABELS = {"skin_tone": "Skin tone", "site": "Body site", "clinic": "Clinic", "camera": "Camera"}
PLOT_ATTRIBUTE = "skin_tone"
NOT_RECORDED = (
    "Patients are pseudonymous: no sex or age is stored, so live performance is not shown by sex or age band "
    "(evaluation reports them where a data set's metadata has them)."
)
BOOTSTRAP = 1000  # resamples for each group's AUC interval
NOT_ASSESSABLE = RiskDecision.NOT_ASSESSABLE.value
SKIN_ITA = "skin_ita"


# --- per upload ------------------------------------------------------------------------------------------


def skin_tone_values(thumbnail) -> dict[str, float]:
    """{"skin_ita": degrees} of a photo's feature thumbnail (mlcore.drift.feature_thumbnail), to be stored with
    its drift features; {} when too little of the photo is skin to measure. Never raises: a monitoring
    measure must not fail an upload, so a failure is logged and the tone left out."""
    try:
        measured = measure_skin_tone(thumbnail)
    except Exception:
        logger.exception("the skin tone could not be measured")
        return {}
    return {} if measured is None else {SKIN_ITA: float(measured["ita"])}


def _band(ita) -> str | None:
    """The band of a stored angle; None for a missing or unreadable one."""
    try:
        value = float(ita)
    except (TypeError, ValueError):
        return None
    return band_of(value) if math.isfinite(value) else None


# --- confirmed cases ---------------------------------------------------------------------------------------


def confirmed_outcomes() -> dict:
    """Image id -> True for malignant, False for benign: each image's newest histopathology outcome ('other'
    diagnoses have no label and are left out). The ground truth of every live performance figure."""
    outcomes = {}
    for image_id, truth in (
        Feedback.objects.filter(kind=Feedback.Kind.HISTOPATHOLOGY).order_by("recorded_at", "id")
        .values_list("image_id", "ground_truth")
    ):  # fmt: skip
        outcomes[image_id] = truth  # the newest wins
    return {image_id: truth == "malignant" for image_id, truth in outcomes.items() if truth}


@dataclass(frozen=True)
class Case:
    """One confirmed case of a model version, with the groups it belongs to (None: unknown)."""

    malignant: bool
    probability: float
    skin_tone: str | None
    site: str | None
    clinic: str
    camera: str | None


def confirmed_cases(model_version: ModelVersion) -> list[Case]:
    """The images with a confirmed outcome that `model_version` scored and judged assessable (a prediction
    stored before the quality gate counts: it had no such verdict), with their skin-tone band (from the
    upload's stored skin_ita), body site, clinic and camera."""
    outcomes = confirmed_outcomes()
    rows = (
        Prediction.objects.filter(model_version=model_version, image_id__in=list(outcomes))
        .exclude(decision=NOT_ASSESSABLE)
        .values_list("image_id", "probability_malignant", f"image__drift_features__values__{SKIN_ITA}",
                     "image__lesion__body_site", "image__clinic__name", "image__camera")
    )  # fmt: skip
    sites = dict(BodySite.choices)
    return [
        Case(outcomes[image_id], float(probability), _band(ita), sites.get(site, site), clinic, camera or None)
        for image_id, probability, ita, site, clinic, camera in rows
    ]


def live_subgroup_report(model_version: ModelVersion | None = None, *, bootstrap: int = BOOTSTRAP) -> dict | None:
    """mlcore.subgroups.subgroup_report over the confirmed cases of `model_version` (the active one by
    default), at its operating threshold, grouped by skin tone, body site, clinic and camera; with
    "model_version" added. None without a model or without a confirmed case."""
    model_version = model_version or active_model_version()
    if model_version is None:
        return None
    cases = confirmed_cases(model_version)
    if not cases:
        return None
    groups = {attribute: [getattr(case, attribute) for case in cases] for attribute in ATTRIBUTE_LABELS}
    report = subgroup_report([case.malignant for case in cases], [case.probability for case in cases],
                             model_version.threshold, groups, bootstrap=bootstrap)  # fmt: skip
    return {"model_version": model_version.version, **report}


# --- the alert ---------------------------------------------------------------------------------------------


def group_label(attribute: str, group: str) -> str:
    if group == UNKNOWN:
        return "not measured" if attribute == "skin_tone" else "unknown"
    return BAND_LABELS.get(group, group) if attribute == "skin_tone" else group


def _percent(value: float, interval: list[float] | None) -> str:
    if interval is None:
        return f"{value:.0%}"
    return f"{value:.0%} (95% CI {interval[0]:.0%}–{interval[1]:.0%})"


def gaps(report: dict | None) -> list[dict]:
    """The subgroups whose sensitivity falls short of the overall by more than SUBGROUP_ALERT_MARGIN, among
    those with at least SUBGROUP_ALERT_MIN_POSITIVES confirmed malignant cases (mlcore.subgroups)."""
    if not report:
        return []
    return sensitivity_gaps(report, margin=settings.SUBGROUP_ALERT_MARGIN,
                            min_positives=settings.SUBGROUP_ALERT_MIN_POSITIVES)  # fmt: skip


def alert_condition(report: dict | None) -> tuple[bool, str] | None:
    """(is a subgroup's sensitivity short of the overall, message) for monitoring.evaluate_alerts, from the
    live subgroup report kept with a drift report; None when no subgroup has enough confirmed malignant cases
    to be judged (an open alert then stays as it is)."""
    minimum = settings.SUBGROUP_ALERT_MIN_POSITIVES
    if not report or report["overall"]["sensitivity"] is None:
        return None
    judged = [row for rows in report["attributes"].values() for row in rows
              if row["n_positive"] >= minimum and row["sensitivity"] is not None]  # fmt: skip
    if not judged:
        return None
    overall = report["overall"]
    sensitivity = _percent(overall["sensitivity"], overall["sensitivity_ci"])
    against = (f"the overall sensitivity of {report['model_version']}, {sensitivity} on {overall['n']} confirmed "
               f"cases ({overall['n_positive']} malignant)")  # fmt: skip
    rule = (f"the alert opens when a subgroup with at least {minimum} confirmed malignant cases is more than "
            f"{100 * settings.SUBGROUP_ALERT_MARGIN:g} percentage points below the overall sensitivity")  # fmt: skip
    found = gaps(report)
    if not found:
        return False, f"No subgroup's sensitivity falls short of {against}; {rule}."
    listed = "; ".join(_describe(gap) for gap in found)
    return True, (f"Melanomas and other malignant lesions are missed more often in a subgroup: {listed}; against "
                  f"{against}. Check these photos and consider retraining with more of them; {rule}.")  # fmt: skip


def _describe(gap: dict) -> str:
    """'skin tone Dark: sensitivity 50% (95% CI 30%–70%) on 40 confirmed cases (20 malignant)'."""
    attribute = ATTRIBUTE_LABELS.get(gap["attribute"], gap["attribute"]).lower()
    return (f"{attribute} {group_label(gap['attribute'], gap['group'])}: sensitivity "
            f"{_percent(gap['sensitivity'], gap['sensitivity_ci'])} on {gap['n']} confirmed cases "
            f"({gap['n_positive']} malignant)")  # fmt: skip


# --- the skin-tone mix -------------------------------------------------------------------------------------


def _band_counts(values) -> tuple[dict[str, int], int, int]:
    """Per band, how many of `values` (stored angles, None where not measured) fall in it; and how many were
    measured, of how many."""
    counts = dict.fromkeys(BAND_SLUGS, 0)
    total = measured = 0
    for value in values:
        total += 1
        band = _band(value)
        if band is not None:
            counts[band] += 1
            measured += 1
    return counts, measured, total


_training_counts = VersionCache(
    lambda model_version: _band_counts(
        ReferenceFeature.objects.filter(model_version=model_version, split="train").values_list(
            f"values__{SKIN_ITA}", flat=True
        )
    )
)


def skin_tone_mix(model_version: ModelVersion | None, start, end) -> dict:
    """The share of uploads (created in [start, end]; start None: from the first) per skin-tone band, against
    the share among the images `model_version` was trained on (its reference set's training split). Shares are
    of the measured photos; the counts of photos whose skin could not be measured are kept beside them."""
    uploads = UploadFeatures.objects.filter(image__created_at__lte=end)
    if start is not None:
        uploads = uploads.filter(image__created_at__gte=start)
    upload_counts, uploads_measured, uploads_total = _band_counts(uploads.values_list(f"values__{SKIN_ITA}", flat=True))
    training_counts, training_measured, training_total = (
        _training_counts.get(model_version) if model_version is not None else ({}, 0, 0)
    )
    ranges = {band.slug: _ita_range(index) for index, band in enumerate(BANDS)}
    bands = []
    for slug in BAND_SLUGS:
        training, upload = training_counts.get(slug, 0), upload_counts[slug]
        bands.append({
            "band": slug, "label": BAND_LABELS[slug], "ita": ranges[slug],
            "training": training, "training_share": training / training_measured if training_measured else None,
            "uploads": upload, "uploads_share": upload / uploads_measured if uploads_measured else None,
        })  # fmt: skip
    return {"model_version": model_version.version if model_version else None, "bands": bands,
            "training_measured": training_measured, "training_total": training_total,
            "uploads_measured": uploads_measured, "uploads_total": uploads_total}  # fmt: skip


def _ita_range(index: int) -> str:
    lower, upper = BANDS[index].above, BANDS[index - 1].above if index else None
    if upper is None:
        return f"above {lower:g}°"
    return f"{upper:g}° and below" if math.isinf(lower) else f"{lower:g}° to {upper:g}°"


def skin_tone_mix_svg(mix: dict) -> str:
    """Bars per band: the share of training images and of uploads, in percent. "" when neither was measured."""
    if not (mix["training_measured"] or mix["uploads_measured"]):
        return ""
    figure, axis = plt.subplots(figsize=(7, 2.6))
    positions = list(range(len(mix["bands"])))
    for offset, key, colour, name in ((-0.2, "training", "#95a5a6", "training"), (0.2, "uploads", "#c0392b",
                                                                                    "uploads")):  # fmt: skip
        shares = [100 * (band[f"{key}_share"] or 0.0) for band in mix["bands"]]
        axis.bar([p + offset for p in positions], shares, width=0.4, color=colour,
                 label=f"{name} ({mix[f'{key}_measured']} measured)")  # fmt: skip
    axis.set_xticks(positions, [band["label"] for band in mix["bands"]])
    axis.set_ylabel("% of measured photos", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7, loc="upper right")
    return inline_svg(figure)


# --- the drift report and the dashboard --------------------------------------------------------------------


def operations_subgroups(start, end, model_version: ModelVersion | None) -> dict:
    """What a drift report's `operations` keeps: "skin_tone_mix" over its window when any photo's tone was
    measured, and "subgroups" (the live subgroup report of `model_version`, which the alert is judged on) when
    it has confirmed cases. Never raises: a report must not fail for its monitoring extras."""
    found = {}
    try:
        mix = skin_tone_mix(model_version, start, end)
        if mix["training_measured"] or mix["uploads_measured"]:
            found["skin_tone_mix"] = mix
        report = live_subgroup_report(model_version) if model_version is not None else None
        if report is not None:
            found["subgroups"] = report
    except Exception:
        logger.exception("the subgroup report or the skin-tone mix could not be computed")
    return found


def _with_ci(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "–"
    return f"{value:.3f}" if interval is None else f"{value:.3f} [{interval[0]:.3f}–{interval[1]:.3f}]"


def table_rows(report: dict | None) -> list[dict]:
    """The report as the dashboard's rows: overall first, then each attribute's groups; each with its labels,
    counts, the three figures with their intervals as text, the too-few flag, and whether the alert names it."""
    if not report:
        return []
    flagged = {(gap["attribute"], gap["group"]) for gap in gaps(report)}
    entries = [("Overall", "all confirmed cases", report["overall"], False)]
    entries += [(ATTRIBUTE_LABELS.get(attribute, attribute), group_label(attribute, row["group"]), row,
                 (attribute, row["group"]) in flagged)
                for attribute, rows in report["attributes"].items() for row in rows]  # fmt: skip
    return [
        {"attribute": attribute, "group": group, "n": row["n"], "n_positive": row["n_positive"],
         "auc": _with_ci(row["auc"], row["auc_ci"]), "sensitivity": _with_ci(row["sensitivity"], row["sensitivity_ci"]),
         "specificity": _with_ci(row["specificity"], row["specificity_ci"]), "too_small": row["too_small"], "gap": gap}
        for attribute, group, row, gap in entries
    ]  # fmt: skip


def dashboard(model_version: ModelVersion | None, start, end) -> dict:
    """The dashboard's two sections: the live subgroup report of `model_version` (table rows and the skin-tone
    plot; the SVG holds only numbers and band names, so the admin may mark it safe), and the skin-tone mix of
    the uploads in [start, end] against its training images."""
    report = live_subgroup_report(model_version) if model_version is not None else None
    mix = skin_tone_mix(model_version, start, end)
    return {
        "report": report,
        "rows": table_rows(report),
        "plot_svg": subgroup_plot_svg(report, PLOT_ATTRIBUTE) if report else "",
        "not_recorded": NOT_RECORDED,
        "margin": settings.SUBGROUP_ALERT_MARGIN,
        "min_positives": settings.SUBGROUP_ALERT_MIN_POSITIVES,
        "mix": mix,
        "mix_svg": skin_tone_mix_svg(mix),
    }
