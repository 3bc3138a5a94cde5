"""Monitoring of the photo-quality gate (issue 20): how many done photos were not assessable or uncertain,
per clinic, per camera and per day; which checks refused them; an alert when the not-assessable share of a
clinic or a camera rises; and the calibration report that sets clinicians' word on photos ("this photo was
fine") against each check.

A photo counts once, by its newest prediction, and only once it went through the gate (a prediction stored
before the gate has no decision). Photos are placed in time by their upload. The rates are aggregate
queries; the refusal reasons live in each prediction's `quality` JSON, read in Python from the refused rows
only (newest first, at most SCAN_LIMIT), so that the same code runs on PostgreSQL and SQLite.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import Count, Exists, OuterRef, Q, QuerySet, Subquery
from django.db.models.functions import TruncDate
from django.utils import timezone

from mlcore.gate import OOD_ADVICE
from mlcore.quality import ADVICE

from ..models import Feedback, ImageState, Prediction, RiskDecision

NOT_ASSESSABLE = RiskDecision.NOT_ASSESSABLE.value
UNCERTAIN = RiskDecision.UNCERTAIN.value
UNKNOWN_CAMERA = "unknown camera"
SCAN_LIMIT = 10_000  # refused rows read per pass for their reasons, newest first
TOP_REASONS = 8
# Check keys are "name:direction" (brightness fails low or high); the label is what the advice calls it.
CHECK_LABELS = {
    **{f"{name}:{direction}": advice.split(":")[0] for (name, direction), advice in ADVICE.items()},
    "ood": "unlike the training photos",
    "other": "no check named",
}


@dataclass(frozen=True)
class Rates:
    """Done photos of one clinic, camera or day, and how many were not assessable or uncertain."""

    label: str
    photos: int
    not_assessable: int
    uncertain: int

    @property
    def not_assessable_share(self) -> float | None:
        return self.not_assessable / self.photos if self.photos else None

    @property
    def uncertain_share(self) -> float | None:
        return self.uncertain / self.photos if self.photos else None

    @property
    def not_assessable_percent(self) -> float | None:
        return None if self.not_assessable_share is None else 100 * self.not_assessable_share

    @property
    def uncertain_percent(self) -> float | None:
        return None if self.uncertain_share is None else 100 * self.uncertain_share

    def as_dict(self) -> dict:
        return {**asdict(self), "not_assessable_share": self.not_assessable_share,
                "uncertain_share": self.uncertain_share}  # fmt: skip


@dataclass(frozen=True)
class Summary:
    overall: Rates
    clinics: list[Rates]
    cameras: list[Rates]
    days: list[Rates]
    reasons: list[dict]  # {"check", "label", "count"}, most frequent first


# --- the rates ------------------------------------------------------------------------------------


def gated_photos(start=None, end=None) -> QuerySet:
    """The newest prediction of each done photo uploaded in [start, end], where the gate decided."""
    newer = Prediction.objects.filter(image=OuterRef("image")).filter(
        Q(created_at__gt=OuterRef("created_at")) | Q(created_at=OuterRef("created_at"), pk__gt=OuterRef("pk"))
    )
    rows = Prediction.objects.filter(image__state=ImageState.DONE).exclude(decision="").filter(~Exists(newer))
    if start is not None:
        rows = rows.filter(image__created_at__gte=start)
    if end is not None:
        rows = rows.filter(image__created_at__lte=end)
    return rows.order_by()


def _counts() -> dict:
    return {
        "photos": Count("pk"),
        "not_assessable": Count("pk", filter=Q(decision=NOT_ASSESSABLE)),
        "uncertain": Count("pk", filter=Q(decision=UNCERTAIN)),
    }


def _grouped(rows: QuerySet, key: str, label=str) -> list[Rates]:
    return [
        Rates(label(row[key]), row["photos"], row["not_assessable"], row["uncertain"])
        for row in rows.values(key).annotate(**_counts()).order_by(key)
    ]


def overall(rows: QuerySet) -> Rates:
    return Rates("all photos", **rows.aggregate(**_counts()))


def by_clinic(rows: QuerySet) -> list[Rates]:
    return _grouped(rows, "image__clinic__name")


def by_camera(rows: QuerySet) -> list[Rates]:
    return sorted(_grouped(rows, "image__camera", lambda camera: camera or UNKNOWN_CAMERA), key=lambda r: r.label)


def by_day(rows: QuerySet) -> list[Rates]:
    return _grouped(rows.annotate(day=TruncDate("image__created_at")), "day", lambda day: day.isoformat())


def refusing_checks(quality: dict | None) -> list[str]:
    """The checks that refused a photo, as "name:direction" keys ("ood" for out of distribution): the
    failed checks whose advice is among the photo's reasons (a lenient gate lists others as warnings)."""
    quality = quality or {}
    reasons = set(quality.get("reasons") or [])
    keys = [
        f"{check.get('name')}:{check.get('direction')}"
        for check in quality.get("checks") or []
        if not check.get("passed", True) and check.get("advice") in reasons
    ]
    if OOD_ADVICE in reasons:
        keys.append("ood")
    return keys or ["other"]


def refusal_reasons(rows: QuerySet, limit: int = SCAN_LIMIT) -> list[dict]:
    """Per check, how many of the refused photos among `rows` it refused (a photo may fail several)."""
    refused = rows.filter(decision=NOT_ASSESSABLE).order_by("-created_at").values_list("quality", flat=True)
    counts = Counter(key for quality in refused[:limit] for key in refusing_checks(quality))
    return [{"check": key, "label": CHECK_LABELS.get(key, key), "count": count}
            for key, count in sorted(counts.items(), key=lambda item: (-item[1], item[0]))]  # fmt: skip


def summary(start=None, end=None) -> Summary:
    rows = gated_photos(start, end)
    return Summary(overall(rows), by_clinic(rows), by_camera(rows), by_day(rows), refusal_reasons(rows))


def operations_quality(start, end) -> dict:
    """What a drift report's `operations` keeps of the gate in its window: {"quality": ...}, or nothing
    when no photo of the window went through the gate."""
    rows = gated_photos(start, end)
    total = overall(rows)
    if not total.photos:
        return {}
    return {"quality": {**total.as_dict(), "clinics": [r.as_dict() for r in by_clinic(rows)],
                        "cameras": [r.as_dict() for r in by_camera(rows)],
                        "refusals": refusal_reasons(rows)[:TOP_REASONS]}}  # fmt: skip


# --- the alert ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Rise:
    scope: str  # "clinic" or "camera"
    recent: Rates
    baseline: float | None  # the baseline's not-assessable share; None: no baseline photos to compare with

    def describe(self) -> str:
        share = self.recent.not_assessable_share
        against = "no baseline" if self.baseline is None else f"{self.baseline:.0%} before"
        return (f"{self.scope} {self.recent.label}: {self.recent.not_assessable} of {self.recent.photos} photos "
                f"({share:.0%}) not assessable, against {against}")  # fmt: skip


def _baseline(label: str, baselines: dict[str, Rates], everyone: Rates, minimum: int) -> float | None:
    """The clinic's or camera's own share before, when it had enough photos; else everyone's."""
    own = baselines.get(label)
    if own is not None and own.photos >= minimum:
        return own.not_assessable_share
    return everyone.not_assessable_share if everyone.photos >= minimum else None


def rises(now=None) -> tuple[int, list[Rise]]:
    """Over the last QUALITY_ALERT_WINDOW_HOURS: how many clinics and cameras had enough photos to be
    judged, and those whose not-assessable share is above QUALITY_ALERT_RATE and at least
    QUALITY_ALERT_MARGIN above their baseline (the QUALITY_ALERT_BASELINE_DAYS before the window)."""
    now = now or timezone.now()
    start = now - timedelta(hours=settings.QUALITY_ALERT_WINDOW_HOURS)
    recent = gated_photos(start, now)
    before = gated_photos(start - timedelta(days=settings.QUALITY_ALERT_BASELINE_DAYS), start - timedelta.resolution)
    everyone = overall(before)
    minimum = settings.QUALITY_ALERT_MIN_PHOTOS
    judged, found = 0, []
    for scope, grouping in (("clinic", by_clinic), ("camera", by_camera)):
        baselines = {rates.label: rates for rates in grouping(before)}
        for rates in grouping(recent):
            if rates.photos < minimum:
                continue
            judged += 1
            baseline = _baseline(rates.label, baselines, everyone, minimum)
            share = rates.not_assessable_share
            if share > settings.QUALITY_ALERT_RATE and share > (baseline or 0.0) + settings.QUALITY_ALERT_MARGIN:
                found.append(Rise(scope, rates, baseline))
    return judged, sorted(found, key=lambda rise: -rise.recent.not_assessable_share)


def alert_condition(now=None) -> tuple[bool, str] | None:
    """(is the not-assessable share up somewhere, message) for monitoring.evaluate_alerts; None when no
    clinic or camera had enough photos to judge (an open alert then stays as it is)."""
    judged, found = rises(now)
    if not judged:
        return None
    hours = settings.QUALITY_ALERT_WINDOW_HOURS
    rule = (f"the alert opens above {settings.QUALITY_ALERT_RATE:.0%} and at least "
            f"{settings.QUALITY_ALERT_MARGIN:.0%} above the previous {settings.QUALITY_ALERT_BASELINE_DAYS:g} days, "
            f"from {settings.QUALITY_ALERT_MIN_PHOTOS} photos")  # fmt: skip
    if not found:
        return False, f"No clinic or camera refuses more photos than usual in the last {hours:g} h; {rule}."
    listed = "; ".join(rise.describe() for rise in found)
    return True, (f"More photos than usual were not assessable in the last {hours:g} h: {listed}. A new phone, "
                  f"a new nurse or a change in lighting shows up here first; {rule}.")  # fmt: skip


# --- calibration: clinicians' word on photos against each check -----------------------------------


@dataclass
class CheckCalibration:
    check: str
    label: str
    refused: int = 0  # photos this check refused
    reviewed: int = 0  # ... on which a clinician gave their word
    marked_fine: int = 0  # ... who said "this photo was fine"

    @property
    def false_refusal_share(self) -> float | None:
        """Among the reviewed refusals, the share clinicians called fine (reviews are not a random sample)."""
        return self.marked_fine / self.reviewed if self.reviewed else None

    @property
    def false_refusal_percent(self) -> float | None:
        share = self.false_refusal_share
        return None if share is None else 100 * share


@dataclass
class VersionCalibration:
    model_version: str
    photos: int
    refused: int
    refused_reviewed: int
    refused_fine: int
    accepted: int
    accepted_reviewed: int
    accepted_poor: int
    checks: list[CheckCalibration] = field(default_factory=list)

    def as_dict(self) -> dict:
        return {**asdict(self), "checks": [{**asdict(c), "false_refusal_share": c.false_refusal_share}
                                           for c in self.checks]}  # fmt: skip


def calibration_report(days: float | None = None, now=None) -> list[VersionCalibration]:
    """Per model version, the predictions it made in the last `days` (QUALITY_CALIBRATION_DAYS): how
    many photos its gate refused and accepted, and on how many of each the clinician's newest photo
    feedback said the gate was wrong ("this photo was fine" on a refused one, poor on an accepted one);
    then per check the same for the photos it refused."""
    now = now or timezone.now()
    days = settings.QUALITY_CALIBRATION_DAYS if days is None else days
    verdicts = Feedback.objects.filter(kind=Feedback.Kind.PHOTO, prediction=OuterRef("pk")).order_by(
        "-recorded_at", "-id"
    )
    rows = (
        Prediction.objects.exclude(decision="").filter(created_at__gte=now - timedelta(days=days), created_at__lte=now)
        .annotate(gate_right=Subquery(verdicts.values("agrees")[:1])).order_by()
    )  # fmt: skip
    refused, accepted = Q(decision=NOT_ASSESSABLE), ~Q(decision=NOT_ASSESSABLE)
    totals = rows.values("model_version__version").annotate(
        photos=Count("pk"), refused=Count("pk", filter=refused),
        refused_reviewed=Count("pk", filter=refused & Q(gate_right__isnull=False)),
        refused_fine=Count("pk", filter=refused & Q(gate_right=False)), accepted=Count("pk", filter=accepted),
        accepted_reviewed=Count("pk", filter=accepted & Q(gate_right__isnull=False)),
        accepted_poor=Count("pk", filter=accepted & Q(gate_right=False)),
    )  # fmt: skip
    report = {}
    for row in totals:
        version = row.pop("model_version__version")
        report[version] = VersionCalibration(model_version=version, **row)
    per_check: dict[str, dict[str, CheckCalibration]] = defaultdict(dict)
    scanned = (
        rows.filter(refused).order_by("-created_at").values_list("model_version__version", "quality", "gate_right")
    )
    for version, quality, gate_right in scanned[:SCAN_LIMIT]:
        for key in refusing_checks(quality):
            check = per_check[version].setdefault(key, CheckCalibration(key, CHECK_LABELS.get(key, key)))
            check.refused += 1
            check.reviewed += gate_right is not None
            check.marked_fine += gate_right is False
    for version, calibration in report.items():
        calibration.checks = sorted(per_check[version].values(), key=lambda c: (-c.refused, c.check))
    return sorted(report.values(), key=lambda c: c.model_version)
