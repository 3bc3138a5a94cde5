"""A model version's card (mlcore.model_card): generated from what was stored when it was registered, so
every version has one, including those registered before cards existed (their subgroup section says so)."""

from __future__ import annotations

from mlcore.model_card import render_model_card

from ..models import ModelVersion, ReferenceFeature


def model_card(model_version: ModelVersion) -> str:
    """The Markdown card of one model version."""
    itas = [
        values["skin_ita"]
        for values in ReferenceFeature.objects.filter(model_version=model_version, split="train").values_list(
            "values", flat=True
        )
        if isinstance(values, dict) and isinstance(values.get("skin_ita"), int | float)
    ]
    return render_model_card(
        version=model_version.version, meta=model_version.metadata or {}, metrics=model_version.metrics or {},
        provenance=model_version.provenance or {}, training_skin_itas=itas,
        quality_gate=bool(model_version.quality_gate),
    )  # fmt: skip
