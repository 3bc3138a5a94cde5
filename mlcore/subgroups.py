"""Performance by subgroup (issue 21, item 5): AUC, sensitivity and specificity at the operating threshold, each
with a 95% interval and its case count, per skin-tone band, body site, sex and age band. Plain NumPy and
matplotlib: no Django, no torch.

A model that is good overall can miss melanomas on the skin it rarely saw in training. `subgroup_report` shows
each group's numbers beside the overall ones; `sensitivity_gaps` names the groups whose sensitivity falls short
of the overall by more than a margin, for evaluation and for the live alert on confirmed outcomes; the plot and
the table show the report to a person.

Intervals: the AUC's is a percentile bootstrap, resampling positives and negatives separately (as
mlcore.metrics.bootstrap_auc_interval does, so every resample has both classes), vectorised over resamples;
sensitivity's and specificity's are Wilson score intervals, which stay inside [0, 1] and keep their coverage
for small groups and for proportions near 0 or 1, where the normal approximation fails.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence
from statistics import NormalDist

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import ArrayLike

from .metrics import confusion_at, roc_auc
from .plots import _png, inline_svg
from .skintone import BAND_SLUGS

# The attributes the project groups by, and the order their groups are shown in (others: by name).
ATTRIBUTES = ("skin_tone", "site", "sex", "age_band")
AGE_BANDS = ("<30", "30–44", "45–59", "60–74", "75+")
UNKNOWN = "unknown"
ORDERS = {"skin_tone": BAND_SLUGS, "age_band": AGE_BANDS, "sex": ("female", "male")}
_UNKNOWN_SPELLINGS = {"", "unknown", "none", "nan", "nat", "<na>", "null", "na", "n/a", "?"}  # pandas: NaT, <NA>

MIN_CASES = 30  # a group with fewer cases, or fewer than MIN_PER_CLASS of either class, is flagged too small
MIN_PER_CLASS = 5
GAP_MARGIN = 0.10  # sensitivity_gaps' defaults: ten points below the overall sensitivity,
GAP_MIN_POSITIVES = 20  # among at least 20 confirmed malignant cases
_RESAMPLE_CELLS = 2_000_000  # bootstrap resamples are drawn in blocks of about this many counts (16 MB each)


def age_band(age: object) -> str:
    """The age band of an age in years ("<30", "30–44", "45–59", "60–74", "75+"), from a number or a numeric
    string (ISIC's age_approx is a multiple of 5); "unknown" for a missing, negative or unreadable age."""
    try:
        years = float(str(age).strip()) if isinstance(age, str) else float(age)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return UNKNOWN
    if math.isnan(years) or years < 0:
        return UNKNOWN
    for band, upper in zip(AGE_BANDS, (30, 45, 60, 75), strict=False):
        if years < upper:
            return band
    return AGE_BANDS[-1]


def group_value(value: object) -> str:
    """A grouping column's value as a group name: stripped text, "unknown" for None, NaN, "" and the usual
    spellings of unknown."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return UNKNOWN
    text = str(value).strip()
    return UNKNOWN if text.lower() in _UNKNOWN_SPELLINGS else text


def wilson_interval(successes: int, total: int, confidence: float = 0.95) -> list[float] | None:
    """The Wilson score interval of a proportion successes / total; None when total is 0."""
    if total == 0:
        return None
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / total
    denominator = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denominator
    half = z / denominator * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total))
    return [max(0.0, centre - half), min(1.0, centre + half)]


def _resample_counts(rng: np.random.Generator, n: int, resamples: int) -> np.ndarray:
    """How often each of n cases is drawn in each of `resamples` bootstrap resamples (resamples x n)."""
    draws = rng.integers(0, n, size=(resamples, n)) + (np.arange(resamples) * n)[:, None]
    return np.bincount(draws.ravel(), minlength=resamples * n).reshape(resamples, n)


def bootstrap_auc(positives: np.ndarray, negatives: np.ndarray, resamples: int, rng: np.random.Generator) -> np.ndarray:
    """The AUC of each of `resamples` stratified bootstrap resamples, vectorised: a resample is a count per
    case, and its AUC the count-weighted share of (positive, negative) pairs in order, ties one half. With the
    negatives sorted once, each positive's place among them (below, and at most equal) is fixed, and a
    resample's weighted count of negatives below it is a cumulative sum read at that place."""
    ordered = np.sort(negatives)
    below = np.searchsorted(ordered, positives, side="left")
    at_most = np.searchsorted(ordered, positives, side="right")
    n_pos, n_neg = len(positives), len(ordered)
    values = np.empty(resamples)
    block = max(1, _RESAMPLE_CELLS // max(n_pos, n_neg))
    for start in range(0, resamples, block):
        size = min(block, resamples - start)
        cumulative = np.zeros((size, n_neg + 1))
        np.cumsum(_resample_counts(rng, n_neg, size), axis=1, out=cumulative[:, 1:])
        wins = cumulative[:, below] + cumulative[:, at_most]  # twice (negatives below + half the ties)
        values[start : start + size] = (_resample_counts(rng, n_pos, size) * wins).sum(axis=1) / (2 * n_pos * n_neg)
    return values


def _group_stats(y: np.ndarray, s: np.ndarray, threshold: float, rng: np.random.Generator, settings: dict) -> dict:
    """One group's row of the report (see subgroup_report)."""
    n, n_positive = len(y), int(y.sum())
    n_negative = n - n_positive
    confidence = settings["confidence"]
    c = confusion_at(y, s, threshold)
    auc = auc_ci = None
    if n_positive and n_negative:
        auc = roc_auc(y, s)
        if settings["bootstrap"]:
            values = bootstrap_auc(s[y], s[~y], settings["bootstrap"], rng)
            auc_ci = [float(v) for v in np.quantile(values, [(1 - confidence) / 2, (1 + confidence) / 2])]
    return {
        "n": n,
        "n_positive": n_positive,
        "n_negative": n_negative,
        "auc": auc,
        "auc_ci": auc_ci,
        "sensitivity": c["tp"] / n_positive if n_positive else None,
        "sensitivity_ci": wilson_interval(c["tp"], n_positive, confidence),
        "specificity": c["tn"] / n_negative if n_negative else None,
        "specificity_ci": wilson_interval(c["tn"], n_negative, confidence),
        "confusion": c,
        "too_small": n < settings["min_cases"] or min(n_positive, n_negative) < settings["min_per_class"],
    }


def _rng(seed: int, key: str) -> np.random.Generator:
    """A group's own random stream, from the seed and its name: its interval does not depend on which other
    groups are in the report, nor on their order."""
    return np.random.default_rng([seed, zlib.crc32(key.encode())])


def _ordered(attribute: str, names: Sequence[str]) -> list[str]:
    """Groups in the attribute's natural order (ORDERS), the rest by name, "unknown" last."""
    order = ORDERS.get(attribute, ())
    known = sorted((n for n in names if n != UNKNOWN), key=lambda n: (order.index(n) if n in order else len(order), n))
    return known + [UNKNOWN] * (UNKNOWN in names)


def subgroup_report(
    labels: ArrayLike,
    scores: ArrayLike,
    threshold: float,
    groups: Mapping[str, Sequence | None],
    *,
    bootstrap: int = 1000,
    seed: int = 0,
    min_cases: int = MIN_CASES,
    min_per_class: int = MIN_PER_CLASS,
    confidence: float = 0.95,
) -> dict:
    """Performance overall and per group of each grouping column, at one operating threshold.

    `labels`: True for malignant; `scores`: the probability of malignancy (called malignant when >= threshold);
    `groups`: attribute name -> one value per case (None, NaN, "" or "unknown" for unknown, all grouped as
    "unknown"), or None when the attribute is unknown for every case. `bootstrap`: resamples for the AUC's
    interval (0: none). Deterministic for a seed.

    Returns a JSON-ready dict: the settings, "overall" and "attributes" (name -> a list of rows, one per group,
    in the attribute's natural order). Each row, and "overall", holds n, n_positive, n_negative, auc and auc_ci
    (None when the group lacks either class), sensitivity and specificity with their _ci (None without
    positives, or negatives), the confusion counts, and too_small: fewer than min_cases cases or fewer than
    min_per_class of either class, too few to judge."""
    y = np.asarray(labels).astype(bool).ravel()
    s = np.asarray(scores, dtype=np.float64).ravel()
    if len(y) != len(s) or len(y) == 0:
        raise ValueError(f"subgroup_report needs one score per label and at least one case, not {len(y)} labels "
                         f"and {len(s)} scores")  # fmt: skip
    if not np.isfinite(s).all():
        raise ValueError("subgroup_report: some scores are NaN or infinite; drop those cases first")
    if not 0 < confidence < 1 or bootstrap < 0:
        raise ValueError("subgroup_report: confidence must lie in (0, 1) and bootstrap be 0 or more")
    settings = {"confidence": confidence, "bootstrap": int(bootstrap), "min_cases": min_cases,
                "min_per_class": min_per_class}  # fmt: skip
    attributes = {}
    for attribute, column in groups.items():
        names = np.array([UNKNOWN] * len(y) if column is None else [group_value(v) for v in column], dtype=object)
        if len(names) != len(y):
            raise ValueError(f"subgroup_report: the grouping column {attribute!r} has {len(names)} values for "
                             f"{len(y)} cases; give one value per case (None where unknown)")  # fmt: skip
        rows = []
        for name in _ordered(attribute, sorted(set(names))):
            member = names == name
            stats = _group_stats(y[member], s[member], threshold, _rng(seed, f"{attribute}={name}"), settings)
            rows.append({"group": name, **stats})
        attributes[attribute] = rows
    overall = _group_stats(y, s, threshold, _rng(seed, "overall"), settings)
    return {"threshold": float(threshold), "seed": seed, **settings, "overall": overall, "attributes": attributes}


def sensitivity_gaps(
    report: Mapping, *, margin: float = GAP_MARGIN, min_positives: int = GAP_MIN_POSITIVES
) -> list[dict]:
    """The groups whose sensitivity falls below the overall sensitivity by more than `margin`, among those
    with at least `min_positives` confirmed malignant cases (fewer would alert on chance: with 10 positives a
    sensitivity's 95% interval is about ±25 points). Largest gap first; each with its attribute, group, n,
    n_positive, sensitivity and its interval, the overall sensitivity and the gap. Used by evaluation and by
    the live alert on confirmed outcomes."""
    overall = report["overall"]["sensitivity"]
    if overall is None:
        return []
    found = []
    for attribute, rows in report["attributes"].items():
        for row in rows:
            if row["n_positive"] < min_positives or row["sensitivity"] is None:
                continue
            gap = overall - row["sensitivity"]
            if gap > margin:
                found.append({"attribute": attribute, "group": row["group"], "n": row["n"],
                              "n_positive": row["n_positive"], "sensitivity": row["sensitivity"],
                              "sensitivity_ci": row["sensitivity_ci"], "overall_sensitivity": overall,
                              "gap": gap})  # fmt: skip
    return sorted(found, key=lambda gap: -gap["gap"])


# --- showing it -------------------------------------------------------------------------------------------------


def _rows(report: Mapping, attribute: str) -> list[dict]:
    if attribute not in report["attributes"]:
        known = ", ".join(report["attributes"]) or "none"
        raise ValueError(f"the report has no attribute {attribute!r}; it has: {known}")
    return report["attributes"][attribute]


def _figure(report: Mapping, attribute: str):
    """Two panels, sensitivity and specificity: per group the value with its interval (hollow when the group
    is too small to judge), the overall value as a dashed line, each group's cases and positives in its tick."""
    rows = _rows(report, attribute)
    figure, axes = plt.subplots(1, 2, figsize=(max(6.0, 1.5 * len(rows) + 2.0), 3.4), sharey=True)
    ticks = [f"{row['group']}\nn={row['n']}, {row['n_positive']} pos." for row in rows]
    for axis, metric, colour in zip(axes, ("sensitivity", "specificity"), ("#c0392b", "#2c6e9b"), strict=True):
        for small in (False, True):
            shown = [(i, row) for i, row in enumerate(rows) if row[metric] is not None and row["too_small"] == small]
            if not shown:
                continue
            xs = [i for i, _ in shown]
            values = np.array([row[metric] for _, row in shown])
            intervals = np.array([row[f"{metric}_ci"] for _, row in shown])
            # Wilson's bounds meet the estimate at 0 and 1 up to rounding: never a negative bar.
            below, above = np.maximum(values - intervals[:, 0], 0), np.maximum(intervals[:, 1] - values, 0)
            axis.errorbar(xs, values, yerr=[below, above], fmt="o", capsize=3,
                          color=colour, markerfacecolor="white" if small else colour,
                          label="too few cases" if small else None)  # fmt: skip
        overall = report["overall"][metric]
        if overall is not None:
            axis.axhline(overall, linestyle="--", color="#7f8c8d", linewidth=1, label=f"overall {overall:.2f}")
        axis.set_xticks(range(len(rows)), ticks, fontsize=7)
        axis.set(xlim=(-0.6, len(rows) - 0.4), ylim=(0, 1.05), title=f"{metric.capitalize()} by {attribute}")
        axis.tick_params(axis="y", labelsize=7)
        axis.legend(fontsize=7, loc="lower left")
    return figure


def subgroup_plot_svg(report: Mapping, attribute: str) -> str:
    """The subgroup plot of one attribute as inline SVG, its text kept as text (searchable, and drawn in the
    page's font)."""
    with plt.rc_context({"svg.fonttype": "none"}):
        return inline_svg(_figure(report, attribute))


def subgroup_plot_png(report: Mapping, attribute: str) -> bytes:
    """The subgroup plot of one attribute as PNG bytes, for evaluation reports."""
    return _png(_figure(report, attribute))


def _with_ci(value: float | None, interval: list[float] | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if interval is None else f"{value:.3f} [{interval[0]:.3f}–{interval[1]:.3f}]"


def format_subgroup_table(report: Mapping) -> str:
    """The report as a plain-text table: attribute, group, n, positives, then AUC, sensitivity and specificity
    each with its interval; "—" where a group lacks the class to compute one, "*" after n where the group is
    too small to judge."""
    header = ("attribute", "group", "n", "positives", "AUC [95% CI]", "sensitivity [95% CI]",
              "specificity [95% CI]")  # fmt: skip
    lines = [header]
    entries = [("overall", "all", report["overall"])]
    entries += [(attribute, row["group"], row) for attribute, rows in report["attributes"].items() for row in rows]
    for attribute, group, row in entries:
        lines.append((attribute, str(group), f"{row['n']}{'*' if row['too_small'] else ''}", str(row["n_positive"]),
                      _with_ci(row["auc"], row["auc_ci"]), _with_ci(row["sensitivity"], row["sensitivity_ci"]),
                      _with_ci(row["specificity"], row["specificity_ci"])))  # fmt: skip
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip() for line in lines]
    text.insert(1, "  ".join("-" * width for width in widths))
    threshold = report["threshold"]
    text.append(f"at threshold {threshold:.3f}; * too few cases to judge (under {report['min_cases']}, or under "
                f"{report['min_per_class']} of either class)")  # fmt: skip
    return "\n".join(text)
