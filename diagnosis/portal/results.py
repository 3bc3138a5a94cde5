"""The portal's results in words: a prediction as a decision at the referral threshold, a lesion's
timeline with the change in risk between visits, and the JSON the lesion and result pages poll.

Presentation over the models (portal URLs, labels, rounding); the reading of the rows is the models'
managers and the services'."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Prefetch
from django.urls import reverse

from ..models import Explanation, Feedback, ImageState, Lesion, LesionImage, Prediction
from ..services import feedback as feedback_services
from ..services.explanations import method_label
from ..services.status import FINAL_STATES


def with_predictions(queryset):
    return queryset.prefetch_related(
        Prefetch("predictions", queryset=Prediction.objects.select_related("model_version"))
    )


@dataclass
class Decision:
    probability: float
    threshold: float
    above: bool
    title: str
    advice: str
    model_version: str

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
        return f"{self.probability * 100:.{self.digits}f}%"

    @property
    def threshold_percent(self) -> str:
        return f"{self.threshold * 100:.{self.digits}f}%"


def decision_for(prediction: Prediction | None) -> Decision | None:
    if prediction is None:
        return None
    above = prediction.probability_malignant >= prediction.threshold
    return Decision(
        probability=prediction.probability_malignant,
        threshold=prediction.threshold,
        above=above,
        title="Above referral threshold" if above else "Below referral threshold",
        advice=(
            "The model rates this lesion at or above its referral threshold: consider specialist review."
            if above
            else "The model rates this lesion below its referral threshold. Clinical judgement still applies."
        ),
        model_version=prediction.model_version.version,
    )


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
    """The lesion's images, newest first, each with its risk and the change since the previous one."""
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
        if decision is not None:
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
    """What the page's script shows of a photo; `version` changes whenever anything else does."""
    decision = result_of(image)
    payload = {
        "id": str(image.pk),
        "state": image.state,
        "state_label": image.get_state_display(),
        "final": image.state in FINAL_STATES,
        "error": image.error if image.state == ImageState.FAILED else "",
        "probability": decision.probability if decision else None,
        "percent": decision.percent if decision else None,
        "decision": decision.title if decision else None,
        "above_threshold": decision.above if decision else None,
        "model_version": decision.model_version if decision else None,
        "result_url": reverse("portal:image", args=[image.pk]),
        "status_url": reverse("portal:image-status", args=[image.pk]),
        "thumb_url": reverse("portal:image-photo", args=[image.pk]) + "?size=thumb",
        "explanations": [explanation_payload(e) for e in result_explanations(image, decision)],
    }
    canonical = json.dumps(payload, sort_keys=True, default=str).encode()
    payload["version"] = hashlib.sha256(canonical).hexdigest()[:16]
    return payload


def result_explanations(image: LesionImage, decision: Decision | None) -> list[Explanation]:
    """The explanations of the image's current result (those of the model that made its latest
    prediction), oldest first; none while it has no result."""
    if decision is None:
        return []
    prediction = image.latest_prediction
    return list(image.explanations.filter(model_version=prediction.model_version).order_by("created_at"))
