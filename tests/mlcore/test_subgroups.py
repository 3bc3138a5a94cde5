"""Performance by subgroup, its gaps, plot and table (mlcore.subgroups)."""

from __future__ import annotations

import json
import xml.etree.ElementTree as ElementTree

import numpy as np
import pytest

from mlcore.metrics import bootstrap_auc_interval, roc_auc, sensitivity_specificity
from mlcore.subgroups import (
    AGE_BANDS,
    age_band,
    bootstrap_auc,
    format_subgroup_table,
    group_value,
    sensitivity_gaps,
    subgroup_plot_png,
    subgroup_plot_svg,
    subgroup_report,
    wilson_interval,
)


def _cases(rng: np.random.Generator, n: int, separation: float, prevalence: float = 0.3):
    """Labels and scores in (0, 1): a logistic of a normal, shifted up by `separation` for positives."""
    labels = rng.random(n) < prevalence
    scores = 1 / (1 + np.exp(-(rng.normal(0, 1, n) + separation * labels - separation / 2)))
    return labels, scores


def _planted(seed: int = 0):
    """Four skin-tone groups of 400 cases; on dark skin the malignant cases score lower (a fainter signal),
    and a group of 12 brown cases whose positives are all missed."""
    rng = np.random.default_rng(seed)
    parts = [(*_cases(rng, 400, 3.0), band) for band in ("very_light", "light", "intermediate", "tan")]
    labels, scores = _cases(rng, 400, 0.8)
    parts.append((labels, scores, "dark"))
    small = np.array([True] * 4 + [False] * 8)
    parts.append((small, np.where(small, 0.05, 0.3), "brown"))
    labels = np.concatenate([p[0] for p in parts])
    scores = np.concatenate([p[1] for p in parts])
    tones = np.concatenate([[p[2]] * len(p[0]) for p in parts])
    return labels, scores, tones


# --- pieces -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("successes", "total", "expected"),
    [(8, 10, (0.4902, 0.9433)), (0, 10, (0.0, 0.2775)), (10, 10, (0.7225, 1.0)), (50, 100, (0.4038, 0.5962))],
)
def test_wilson_interval_gives_the_textbook_values(successes, total, expected):
    assert wilson_interval(successes, total) == pytest.approx(expected, abs=1e-4)
    assert wilson_interval(0, 0) is None


@pytest.mark.parametrize(
    ("age", "band"),
    [(0, "<30"), (29.9, "<30"), (30, "30–44"), ("44", "30–44"), (45.0, "45–59"), (" 60 ", "60–74"), (74, "60–74"),
     (75, "75+"), (101, "75+"), (None, "unknown"), (float("nan"), "unknown"), ("", "unknown"), ("old", "unknown"),
     (-5, "unknown")],
)  # fmt: skip
def test_age_band(age, band):
    assert age_band(age) == band
    assert band == "unknown" or band in AGE_BANDS


@pytest.mark.parametrize(
    "value", [None, float("nan"), np.float32("nan"), "", "  ", "unknown", "Unknown ", "NaN", "n/a", "<NA>"]
)
def test_the_spellings_of_unknown_are_one_group(value):
    assert group_value(value) == "unknown"
    assert group_value(" trunk ") == "trunk"


def test_the_vectorised_bootstrap_agrees_with_the_one_resample_at_a_time_one():
    labels, scores = _cases(np.random.default_rng(3), 300, 1.5)
    values = bootstrap_auc(scores[labels], scores[~labels], 2000, np.random.default_rng(0))
    assert values.shape == (2000,) and 0 < values.std() < 0.05
    assert np.quantile(values, [0.025, 0.975]) == pytest.approx(bootstrap_auc_interval(labels, scores), abs=0.01)
    # ties count one half, and a resample of one positive and one negative is the pair itself
    assert bootstrap_auc(np.full(5, 0.4), np.full(7, 0.4), 10, np.random.default_rng(0)) == pytest.approx([0.5] * 10)
    assert bootstrap_auc(np.array([0.9]), np.array([0.2]), 4, np.random.default_rng(0)) == pytest.approx([1.0] * 4)


# --- the report -------------------------------------------------------------------------------------------------


def test_the_overall_row_is_the_usual_metrics_and_every_interval_holds_its_estimate():
    labels, scores, tones = _planted()
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones}, bootstrap=300)
    overall = report["overall"]
    assert overall["n"] == len(labels) and overall["n_positive"] == int(labels.sum())
    assert overall["auc"] == pytest.approx(roc_auc(labels, scores))
    assert (overall["sensitivity"], overall["specificity"]) == pytest.approx(
        sensitivity_specificity(labels, scores, 0.5)
    )
    for row in [overall, *report["attributes"]["skin_tone"]]:
        for metric in ("auc", "sensitivity", "specificity"):
            low, high = row[f"{metric}_ci"]
            assert 0 <= low <= row[metric] <= high <= 1, (row.get("group"), metric)
    json.dumps(report)  # stored as is


def test_intervals_narrow_as_the_group_grows():
    rng = np.random.default_rng(1)
    widths = []
    for n in (100, 1000, 8000):
        labels, scores = _cases(rng, n, 1.5)
        row = subgroup_report(labels, scores, 0.5, {}, bootstrap=300)["overall"]
        widths.append([row[f"{m}_ci"][1] - row[f"{m}_ci"][0] for m in ("auc", "sensitivity", "specificity")])
    widths = np.array(widths)
    assert (widths[1] < widths[0]).all() and (widths[2] < widths[1]).all()
    assert (widths[2] < widths[0] / 4).all()  # about 1 / sqrt(80) of it


def test_a_planted_gap_is_found_and_only_there():
    labels, scores, tones = _planted()
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones}, bootstrap=200)
    rows = {row["group"]: row for row in report["attributes"]["skin_tone"]}
    assert rows["dark"]["auc"] < rows["light"]["auc"] - 0.1
    gaps = sensitivity_gaps(report, margin=0.1, min_positives=20)
    assert [(gap["attribute"], gap["group"]) for gap in gaps] == [("skin_tone", "dark")]
    gap = gaps[0]
    assert gap["gap"] == pytest.approx(report["overall"]["sensitivity"] - rows["dark"]["sensitivity"])
    assert gap["gap"] > 0.1 and gap["n_positive"] == rows["dark"]["n_positive"] >= 20
    assert sensitivity_gaps(report, margin=gap["gap"] + 0.01, min_positives=20) == []


def test_a_group_too_small_to_judge_is_flagged_and_never_alerted():
    labels, scores, tones = _planted()
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones}, bootstrap=200)
    rows = {row["group"]: row for row in report["attributes"]["skin_tone"]}
    brown = rows["brown"]
    assert brown["too_small"] and brown["n"] == 12 and brown["sensitivity"] == 0.0  # every melanoma missed
    assert not any(row["too_small"] for name, row in rows.items() if name != "brown")
    assert "brown" not in [gap["group"] for gap in sensitivity_gaps(report, margin=0.1, min_positives=20)]
    assert "brown" in [gap["group"] for gap in sensitivity_gaps(report, margin=0.1, min_positives=4)]


def test_groups_follow_their_natural_order_and_unknown_values_are_one_group_last():
    labels, scores = _cases(np.random.default_rng(2), 12, 2.0)
    tones = ["dark", None, "light", "", "very_light", "unknown", "tan", float("nan"), "dark", "light", " ", "tan"]
    ages = [age_band(a) for a in (80, 20, 50, None, 35, 65, 20, 80, 35, 50, 65, 20)]
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones, "age_band": ages, "site": None}, bootstrap=50)
    skin = report["attributes"]["skin_tone"]
    assert [row["group"] for row in skin] == ["very_light", "light", "tan", "dark", "unknown"]
    assert skin[-1]["n"] == 5
    assert [row["group"] for row in report["attributes"]["age_band"]] == [*AGE_BANDS, "unknown"]
    assert [(row["group"], row["n"]) for row in report["attributes"]["site"]] == [("unknown", 12)]
    with pytest.raises(ValueError, match="'sex' has 3 values for 12 cases"):
        subgroup_report(labels, scores, 0.5, {"sex": ["male", "female", None]})


def test_a_group_without_one_class_has_no_auc_and_no_rate_for_the_missing_class():
    labels = np.array([True, True, False, False, True, True])
    scores = np.array([0.9, 0.2, 0.1, 0.6, 0.8, 0.7])
    report = subgroup_report(labels, scores, 0.5, {"site": ["a", "a", "b", "b", "a", "a"]}, bootstrap=50)
    only_positive, only_negative = report["attributes"]["site"]
    assert only_positive["auc"] is None and only_positive["auc_ci"] is None
    assert only_positive["specificity"] is None and only_positive["sensitivity"] == 0.75
    assert only_negative["sensitivity"] is None and only_negative["specificity"] == 0.5
    assert only_positive["too_small"] and only_negative["too_small"]


def test_the_report_is_deterministic_for_a_seed_and_each_group_draws_its_own_stream():
    labels, scores, tones = _planted()
    sites = np.random.default_rng(9).choice(["trunk", "head", "leg"], len(labels))
    first = subgroup_report(labels, scores, 0.5, {"skin_tone": tones, "site": sites}, bootstrap=200, seed=4)
    again = subgroup_report(labels, scores, 0.5, {"skin_tone": tones, "site": sites}, bootstrap=200, seed=4)
    assert json.dumps(first) == json.dumps(again)
    other = subgroup_report(labels, scores, 0.5, {"skin_tone": tones, "site": sites}, bootstrap=200, seed=5)
    assert other["overall"]["auc_ci"] != first["overall"]["auc_ci"]
    alone = subgroup_report(labels, scores, 0.5, {"site": sites}, bootstrap=200, seed=4)
    assert alone["attributes"]["site"] == first["attributes"]["site"]


def test_bad_inputs_are_refused_with_what_to_do():
    with pytest.raises(ValueError, match="one score per label"):
        subgroup_report([True, False], [0.5], 0.5, {})
    with pytest.raises(ValueError, match="NaN or infinite"):
        subgroup_report([True, False], [0.5, float("nan")], 0.5, {})


# --- showing it -------------------------------------------------------------------------------------------------


def test_the_plot_is_svg_that_names_each_group_with_its_counts():
    labels, scores, tones = _planted()
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones}, bootstrap=100)
    svg = subgroup_plot_svg(report, "skin_tone")
    root = ElementTree.fromstring(svg)
    assert root.tag.endswith("svg")
    for row in report["attributes"]["skin_tone"]:
        assert row["group"] in svg and f"n={row['n']}, {row['n_positive']} pos." in svg
    assert "Sensitivity by skin_tone" in svg and "overall" in svg and "too few cases" in svg
    assert subgroup_plot_png(report, "skin_tone").startswith(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(ValueError, match="no attribute 'sex'; it has: skin_tone"):
        subgroup_plot_svg(report, "sex")


def test_the_table_lists_every_group_with_its_counts_and_intervals():
    labels, scores, tones = _planted()
    report = subgroup_report(labels, scores, 0.5, {"skin_tone": tones}, bootstrap=100)
    table = format_subgroup_table(report)
    lines = table.splitlines()
    assert lines[0].split()[:4] == ["attribute", "group", "n", "positives"]
    assert lines[2].split()[:4] == ["overall", "all", str(len(labels)), str(int(labels.sum()))]
    for row in report["attributes"]["skin_tone"]:
        line = next(line for line in lines if line.split()[:2] == ["skin_tone", row["group"]])
        n = f"{row['n']}*" if row["too_small"] else str(row["n"])
        assert line.split()[2:4] == [n, str(row["n_positive"])]
        assert f"{row['sensitivity']:.3f} [{row['sensitivity_ci'][0]:.3f}–" in line
    assert "12*" in table and "* too few cases" in lines[-1]
    no_auc = subgroup_report([True, True], [0.7, 0.2], 0.5, {}, bootstrap=0)
    assert "—" in format_subgroup_table(no_auc)


def test_the_plot_draws_groups_whose_sensitivity_is_one_or_zero():
    # Wilson's bound meets the estimate at 1 and 0 only up to rounding; the plot must not see a negative bar.
    labels = np.array([True] * 8 + [False] * 8 + [True] * 8 + [False] * 8)
    scores = np.array([0.9] * 8 + [0.1] * 8 + [0.1] * 8 + [0.9] * 8)
    groups = {"skin_tone": ["light"] * 16 + ["dark"] * 16}
    report = subgroup_report(labels, scores, 0.5, groups, bootstrap=50)
    sensitivities = {row["group"]: row["sensitivity"] for row in report["attributes"]["skin_tone"]}
    assert sensitivities == {"light": 1.0, "dark": 0.0}
    assert subgroup_plot_png(report, "skin_tone").startswith(b"\x89PNG")
