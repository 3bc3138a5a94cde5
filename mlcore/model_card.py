"""A short model card (Mitchell et al., 2019) for one trained model, in Markdown: what it is for and not for,
what it was trained and tested on, how it performs overall and per subgroup (skin tone, body site, sex, age),
and its known limits, several of them read from its own numbers (subgroups too small to judge, a skin-tone
band with no test cases, a sensitivity gap, leakage found). Plain dicts in, text out: no Django, no torch."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .skintone import BAND_LABELS, BAND_SLUGS, band_of
from .subgroups import ATTRIBUTES

INTENDED_USE = (
    "Decision support for clinicians triaging skin lesions photographed in clinic: a malignancy risk, the most "
    "likely diagnoses for a model with several, and heatmaps of what drove them. It helps decide which lesions "
    "a specialist should see first. It is not a diagnosis, and it is not for use by patients on their own."
)
OUT_OF_SCOPE = (
    "Photos unlike the training data (other cameras, dermoscopes, body sites or skin tones it saw little of), "
    "children, lesions under dressings or tattoos, and any use without a clinician reading the result. The "
    "photo-quality and out-of-distribution gate refuses photos it cannot assess; a photo it passes can still "
    "be one the model has not learnt."
)
GENERAL_LIMITS = (
    "Public dermatology collections are mostly light skin: performance on darker skin is less certain, and the "
    "subgroup table above shows how many cases each band had.",
    "Skin tone is the individual typology angle measured on the skin around the lesion (or the metadata's "
    "Fitzpatrick type where given); lighting and white balance move it, and it is not a patient's ethnicity.",
    "The operating threshold was set on the validation set for the target sensitivity; a clinic with another "
    "case mix will see other predictive values.",
)


def _number(value: Any, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _interval(value: Any, interval: Any) -> str:
    if value is None:
        return "—"
    return f"{value:.3f} [{interval[0]:.3f}–{interval[1]:.3f}]" if interval else f"{value:.3f}"


def render_model_card(
    *,
    version: str,
    meta: Mapping[str, Any],
    metrics: Mapping[str, Any],
    provenance: Mapping[str, Any],
    training_skin_itas: list[float] | None = None,
    quality_gate: bool = False,
) -> str:
    """The card of one model version. `meta`: the checkpoint's metadata (mlcore.model.CheckpointMeta.to_dict);
    `metrics`: what training stored (validation, test, leakage, subgroups); `provenance`: the training run's
    (data source, counts, libraries); `training_skin_itas`: the training photos' measured ITAs, for the
    skin-tone mix; `quality_gate`: whether the version carries a photo-quality gate."""
    lines = [f"# Model card: {version}", ""]
    lines += _details(meta, quality_gate)
    lines += ["## Intended use", "", INTENDED_USE, "", "**Out of scope.** " + OUT_OF_SCOPE, ""]
    classes = list(meta.get("class_names") or [])
    lines += _data(provenance, training_skin_itas, classes)
    lines += _performance(metrics, classes)
    lines += _subgroups(metrics.get("subgroups"))
    lines += ["## Known limits", ""] + [f"- {limit}" for limit in known_limits(metrics, provenance)] + [""]
    return "\n".join(lines)


def _details(meta: Mapping[str, Any], quality_gate: bool) -> list[str]:
    classes = list(meta.get("class_names") or [])
    malignant = list(meta.get("malignant_classes") or [meta.get("positive_class")])
    config = (meta.get("training") or {}).get("config") or {}
    return [
        "## Model", "",
        f"- Architecture: {meta.get('arch')} at {meta.get('input_size')} px; classes: {', '.join(classes)}.",
        f"- Malignancy probability: the sum over {', '.join(malignant)}; referral threshold "
        f"{_number(meta.get('threshold'))}, set on validation for a sensitivity of "
        f"{config.get('target_sensitivity', 0.9):.0%}; temperature {_number(meta.get('temperature'), 2)}.",
        f"- Photo-quality and out-of-distribution gate: {'yes' if quality_gate else 'no (photos are not refused)'}.",
        "",
    ]  # fmt: skip


def _ordered(mapping: Mapping[str, Any], order: list[str]) -> list[tuple[str, Any]]:
    """A stored mapping's items in a known order (PostgreSQL's jsonb does not keep the keys' order)."""
    return sorted(mapping.items(), key=lambda item: order.index(item[0]) if item[0] in order else len(order))


def _data(provenance: Mapping[str, Any], itas: list[float] | None, classes: list[str]) -> list[str]:
    data = provenance.get("data") or {}
    counts = data.get("counts") or {}
    lines = ["## Data", "", f"- Source: {data.get('source') or data.get('directory') or 'unknown'}."]
    for split in ("train", "validation", "test"):
        if split in counts:
            total = sum(counts[split].values())
            detail = ", ".join(f"{name} {count}" for name, count in _ordered(counts[split], classes))
            lines.append(f"- {split.capitalize()}: {total} photos ({detail}).")
    if data.get("grouped_splits"):
        lines.append("- Splits keep every lesion and every patient on one side (by the table's ids).")
    if data.get("test_split_made") is False:
        lines.append("- The test set is the collection's own (official) test split, used as it is.")
    if itas:
        mix = {band: 0 for band in BAND_SLUGS}
        for value in itas:
            mix[band_of(value)] += 1
        shares = ", ".join(f"{BAND_LABELS[band]} {count / len(itas):.0%}" for band, count in mix.items())
        lines.append(f"- Skin tone of the training photos (ITA bands): {shares}.")
    return [*lines, ""]


def _performance(metrics: Mapping[str, Any], classes: list[str]) -> list[str]:
    test = metrics.get("test") or {}
    lines = ["## Performance on the test set", ""]
    if not test:
        return [*lines, "No test metrics were recorded.", ""]
    lines += [
        "| cases (malignant) | AUC [95% CI] | sensitivity | specificity | PPV | NPV | ECE |",
        "|---|---|---|---|---|---|---|",
        f"| {test.get('n')} ({test.get('n_positive')}) | {_interval(test.get('auc'), test.get('auc_ci95'))} | "
        f"{_number(test.get('sensitivity'))} | {_number(test.get('specificity'))} | {_number(test.get('ppv'))} | "
        f"{_number(test.get('npv'))} | {_number(test.get('ece'))} |",
        "",
    ]  # fmt: skip
    diagnoses = test.get("diagnoses")
    if diagnoses:
        lines += [f"Diagnoses: balanced accuracy {_number(diagnoses.get('balanced_accuracy'))}.", "",
                  "| diagnosis | cases | AUC (one vs rest) | recall |", "|---|---|---|---|"]  # fmt: skip
        for name, row in _ordered(diagnoses["per_class"], classes):
            lines.append(f"| {name} | {row['n']} | {_number(row['auc'])} | {_number(row['recall'])} |")
        lines.append("")
    leakage = metrics.get("leakage") or {}
    if leakage:
        text = f"Leakage: {leakage.get('near_duplicates_in_train', 0)} test photos have a near-duplicate in training"
        groups = leakage.get("groups")
        if groups:
            text += (
                f"; {groups['lesions']['shared']} lesions and {groups['patients']['shared']} patients are on both sides"
            )
        lines += [text + ".", ""]
    return lines


def _subgroups(report: Mapping[str, Any] | None) -> list[str]:
    lines = ["## Performance by subgroup", ""]
    if not report:
        return [*lines, "Not recorded for this model (trained before subgroup reports).", ""]
    lines += ["At the referral threshold, with 95% intervals; * too few cases to judge.", "",
              "| attribute | group | cases | malignant | AUC | sensitivity | specificity |",
              "|---|---|---|---|---|---|---|"]  # fmt: skip
    for attribute, rows in _ordered(report.get("attributes", {}), list(ATTRIBUTES)):
        for row in rows:
            lines.append(
                f"| {attribute} | {row['group']} | {row['n']}{'*' if row.get('too_small') else ''} | "
                f"{row['n_positive']} | {_interval(row['auc'], row['auc_ci'])} | "
                f"{_interval(row['sensitivity'], row['sensitivity_ci'])} | "
                f"{_interval(row['specificity'], row['specificity_ci'])} |"
            )
    return [*lines, ""]


def known_limits(metrics: Mapping[str, Any], provenance: Mapping[str, Any]) -> list[str]:
    """The general limits, and those this model's own numbers show."""
    limits = list(GENERAL_LIMITS)
    report = metrics.get("subgroups") or {}
    tones = {row["group"]: row for row in (report.get("attributes") or {}).get("skin_tone", [])}
    missing = [BAND_LABELS[band] for band in BAND_SLUGS if band not in tones]
    if report and missing:
        limits.append(f"No test photos of {', '.join(missing)} skin: performance there is unknown.")
    small = [BAND_LABELS.get(name, name) for name, row in tones.items() if row.get("too_small") and name != "unknown"]
    if small:
        limits.append(f"Too few test cases to judge {', '.join(small)} skin (see the * in the subgroup table).")
    for gap in report.get("gaps") or []:
        limits.append(
            f"Sensitivity is lower for {gap['attribute']} = {gap['group']}: {gap['sensitivity']:.2f} against "
            f"{gap['overall_sensitivity']:.2f} overall ({gap['n_positive']} malignant cases)."
        )
    leakage = metrics.get("leakage") or {}
    if leakage.get("near_duplicates_in_train"):
        limits.append("Some test photos have a near-duplicate in training: compare the de-duplicated metrics.")
    groups = leakage.get("groups") or {}
    if groups and (groups["lesions"]["shared"] or groups["patients"]["shared"]):
        limits.append("The official test split shares lesions or patients with training: its metrics are optimistic.")
    data = provenance.get("data") or {}
    source = str(data.get("source") or data.get("directory") or "").lower()
    if "synthetic" in source or "demo-data" in source:
        limits.append("Trained on synthetic lesions: a demonstration model, not for clinical use.")
    return limits
