"""The portal's results in words: a prediction as a decision at the referral threshold (or, through the
photo-quality gate of issue 20, "uncertain" or "not assessable" with the reasons), a lesion's timeline
with the change in risk between visits, and the JSON the lesion and result pages poll.

Presentation over the models (portal URLs, labels, rounding); the reading of the rows is the models'
managers and the services'."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Prefetch
from django.urls import reverse

from ..models import Explanation, Feedback, ImageState, Lesion, LesionImage, Prediction, RiskDecision
from ..services import feedback as feedback_services
from ..services.explanations import method_label
from ..services.status import FINAL_STATES, diagnoses, prediction_outcome


def with_predictions(queryset):
    return queryset.prefetch_related(
        Prefetch("predictions", queryset=Prediction.objects.select_related("model_version"))
    )


TITLES = {
    RiskDecision.ABOVE: "Above referral threshold",
    RiskDecision.BELOW: "Below referral threshold",
    RiskDecision.UNCERTAIN: "Uncertain: specialist review recommended",
    RiskDecision.NOT_ASSESSABLE: "Not assessable: take another photo",
}
ADVICE = {
    RiskDecision.ABOVE: "The model rates this lesion at or above its referral threshold: consider specialist review.",
    RiskDecision.BELOW: "The model rates this lesion below its referral threshold. Clinical judgement still applies.",
    RiskDecision.UNCERTAIN: (
        "The model's estimate is too close to its referral threshold, or changes when the photo is turned, to "
        "call either way: a specialist should review this lesion."
    ),
    RiskDecision.NOT_ASSESSABLE: (
        "The photo-quality check refused this photo, so no risk is given for it. Take another photo of the lesion."
    ),
}


@dataclass
class Decision:
    """A prediction as the portal shows it. `kind` is the gate's decision (RiskDecision); a photo that is
    not assessable has no risk to show: its `percent` is empty and templates show its `reasons` instead."""

    probability: float
    threshold: float
    above: bool
    title: str
    advice: str
    model_version: str
    kind: str = RiskDecision.ABOVE
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    note: str = ""  # e.g. the gate was off for this model version; empty for rows stored before the gate
    # A model with several diagnoses: the most probable ones (services.status.diagnoses), each with its
    # percentage; empty for a binary model, whose one probability is the whole result.
    diagnoses: list[dict] = field(default_factory=list)

    @property
    def assessable(self) -> bool:
        return self.kind != RiskDecision.NOT_ASSESSABLE

    @property
    def uncertain(self) -> bool:
        return self.kind == RiskDecision.UNCERTAIN

    @property
    def css(self) -> str:
        """The risk's class: risk-high, risk-low, risk-uncertain or risk-none."""
        if not self.assessable:
            return "risk-none"
        if self.uncertain:
            return "risk-uncertain"
        return "risk-high" if self.above else "risk-low"

    @property
    def digits(self) -> int:
        # As many decimals as it takes for the probability and the threshold not to look equal
        # (e.g. not "50%" above a "50%" threshold), up to 3.
        for digits in range(4):
            if f"{self.probability * 100:.{digits}f}" != f"{self.threshold * 100:.{digits}f}":
                return digits
        return 3

    @property
    def percent(self) -> str:
        """The probability in percent; empty for a photo that cannot be assessed (it has no risk)."""
        return f"{self.probability * 100:.{self.digits}f}%" if self.assessable else ""

    @property
    def threshold_percent(self) -> str:
        return f"{self.threshold * 100:.{self.digits}f}%"

    @property
    def summary(self) -> str:
        """The result in one line, never a bare percentage: "80% · Above referral threshold",
        "Uncertain (49%): specialist review recommended" or "Not assessable: take another photo"."""
        if not self.assessable:
            return self.title
        if self.uncertain:
            return f"Uncertain ({self.percent}): specialist review recommended"
        return f"{self.percent} · {self.title}"


def decision_for(prediction: Prediction | None) -> Decision | None:
    if prediction is None:
        return None
    judged = prediction_outcome(prediction)
    kind, quality = judged["decision"], judged["quality"]
    return Decision(
        probability=prediction.probability_malignant,
        threshold=prediction.threshold,
        above=prediction.probability_malignant >= prediction.threshold,
        title=TITLES[kind],
        advice=ADVICE[kind],
        model_version=prediction.model_version.version,
        kind=kind,
        reasons=[str(reason) for reason in quality.get("reasons") or []],
        warnings=[str(warning) for warning in quality.get("warnings") or []],
        note=str(quality.get("note") or "") if prediction.decision else "",  # rows before the gate: as before
        diagnoses=top_diagnoses(prediction),
    )


TOP_DIAGNOSES = 3


def top_diagnoses(prediction: Prediction) -> list[dict]:
    """The TOP_DIAGNOSES most probable classes of a model with more than two, with their percentages."""
    if len(prediction.probabilities or {}) <= 2:
        return []
    ranked = diagnoses(prediction.probabilities, prediction.model_version.malignant_set)[:TOP_DIAGNOSES]
    return [{**row, "percent": f"{row['probability'] * 100:.0f}%"} for row in ranked]


def result_of(image: LesionImage) -> Decision | None:
    return decision_for(image.latest_prediction) if image.state == ImageState.DONE else None


@dataclass
class TimelineRow:
    image: LesionImage
    decision: Decision | None
    change: float | None = None  # change in probability since the lesion's previous scored image
    flagged: bool = False
    assessment: Feedback | None = None
    outcome: Feedback | None = None
    photo: Feedback | None = None  # the clinician's word on the quality gate's verdict
    explanations: list = field(default_factory=list)

    @property
    def change_points(self) -> str:
        if self.change is None:
            return ""
        points = round(self.change * 100)
        return "±0 pts" if points == 0 else f"{points:+d} pts"


def timeline(lesion: Lesion) -> list[TimelineRow]:
    """The lesion's images, newest first, each with its risk and the change since the previous assessable
    one (a photo the quality gate refused has no risk, so it neither has a change nor is compared with)."""
    # Only the images of the lesion's own clinic: LesionImage.clinic is what every scoping query uses, and
    # it stays true to where the photo was taken even if a lesion were ever moved to another clinic.
    own = lesion.images.filter(clinic_id=lesion.patient.clinic_id)
    images = with_predictions(own.order_by("created_at")).prefetch_related(
        Prefetch("feedback", queryset=Feedback.objects.select_related("recorded_by")),
        Prefetch("explanations", queryset=Explanation.objects.order_by("created_at")),
    )
    rows, previous = [], None
    for image in images:
        decision = result_of(image)
        row = TimelineRow(image=image, decision=decision, **feedback_services.latest_feedback(image))
        row.explanations = [e for e in image.explanations.all() if e.state == Explanation.State.DONE]
        for explanation in row.explanations:
            explanation.label = method_label(explanation.method)
        if decision is not None and decision.assessable:  # a refused photo has no risk to compare
            if previous is not None:
                row.change = decision.probability - previous
                row.flagged = row.change > settings.RISK_RISE_FLAG
            previous = decision.probability
        rows.append(row)
    rows.reverse()
    return rows


def explanation_payload(explanation: Explanation) -> dict:
    done = explanation.state == Explanation.State.DONE
    return {
        "id": str(explanation.pk),
        "method": explanation.method,
        "label": method_label(explanation.method),
        "state": explanation.state,
        "error": explanation.error,
        "target_class": explanation.target_class,
        "heatmap_url": reverse("portal:explanation-file", args=[explanation.pk, "heatmap"]) if done else None,
        "overlay_url": reverse("portal:explanation-file", args=[explanation.pk, "overlay"]) if done else None,
    }


def status_payload(image: LesionImage) -> dict:
    """What the page's script shows of a photo; `version` changes whenever anything else does.

    `decision` is the result in words (as before the gate), `decision_code` the gate's decision
    (above_threshold, below_threshold, uncertain, not_assessable), `summary` the one line the script shows.
    A photo that is not assessable has no probability, percent or above_threshold, only its `reasons` (in
    words) and the `photo_fine_url` where the clinician can say it was fine."""
    decision = result_of(image)
    risk = decision if decision is not None and decision.assessable else None
    photo_fine = decision is not None and not decision.assessable
    payload = {
        "id": str(image.pk),
        "state": image.state,
        "state_label": image.get_state_display(),
        "final": image.state in FINAL_STATES,
        "error": image.error if image.state == ImageState.FAILED else "",
        "probability": risk.probability if risk else None,
        "percent": risk.percent if risk else None,
        "decision": decision.title if decision else None,
        "decision_code": decision.kind if decision else None,
        "summary": decision.summary if decision else None,
        "assessable": decision.assessable if decision else None,
        "reasons": decision.reasons if decision else [],
        "warnings": decision.warnings if decision else [],
        "advice": decision.advice if decision else None,
        "above_threshold": risk.above if risk else None,
        "model_version": decision.model_version if decision else None,
        "result_url": reverse("portal:image", args=[image.pk]),
        "status_url": reverse("portal:image-status", args=[image.pk]),
        "thumb_url": reverse("portal:image-photo", args=[image.pk]) + "?size=thumb",
        "photo_fine_url": reverse("portal:image-photo-fine", args=[image.pk]) if photo_fine else None,
        "explanations": [explanation_payload(e) for e in result_explanations(image, decision)],
    }
    canonical = json.dumps(payload, sort_keys=True, default=str).encode()
    payload["version"] = hashlib.sha256(canonical).hexdigest()[:16]
    return payload


def result_explanations(image: LesionImage, decision: Decision | None) -> list[Explanation]:
    """The explanations of the image's current result (those of the model that made its latest
    prediction), oldest first; none while it has no result, nor for a photo that is not assessable (a heatmap
    of a risk that is not shown would read as one)."""
    if decision is None or not decision.assessable:
        return []
    prediction = image.latest_prediction
    return list(image.explanations.filter(model_version=prediction.model_version).order_by("created_at"))
