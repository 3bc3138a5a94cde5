"""Evaluation plots as PNG bytes (matplotlib's Agg backend: no display needed)."""

from __future__ import annotations

import io

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
from numpy.typing import ArrayLike

from .metrics import reliability_curve, roc_auc


def _png(figure) -> bytes:
    buffer = io.BytesIO()
    figure.tight_layout()
    figure.savefig(buffer, format="png", dpi=110)
    plt.close(figure)
    return buffer.getvalue()


def roc_curve_points(labels: ArrayLike, scores: ArrayLike) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.concatenate([[np.inf], np.unique(s)[::-1]])
    tpr = np.array([(s[y] >= t).mean() for t in thresholds])
    fpr = np.array([(s[~y] >= t).mean() for t in thresholds])
    return fpr, tpr, thresholds


def roc_plot(labels: ArrayLike, scores: ArrayLike, threshold: float) -> bytes:
    fpr, tpr, _ = roc_curve_points(labels, scores)
    y, s = np.asarray(labels).astype(bool), np.asarray(scores)
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(fpr, tpr, label=f"ROC (AUC {roc_auc(labels, scores):.3f})")
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="chance")
    axis.scatter([(s[~y] >= threshold).mean()], [(s[y] >= threshold).mean()], color="crimson", zorder=3,
                 label=f"operating point (t={threshold:.3f})")  # fmt: skip
    axis.set(xlabel="1 − specificity", ylabel="sensitivity", title="ROC curve (test set)", xlim=(0, 1), ylim=(0, 1))
    axis.legend(loc="lower right", fontsize=8)
    return _png(figure)


def precision_recall_plot(labels: ArrayLike, scores: ArrayLike) -> bytes:
    y = np.asarray(labels).astype(bool)
    s = np.asarray(scores, dtype=np.float64)
    thresholds = np.unique(s)[::-1]
    recall = np.array([(s[y] >= t).mean() for t in thresholds])
    precision = np.array([y[s >= t].mean() for t in thresholds])
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot(recall, precision)
    axis.axhline(y.mean(), linestyle="--", color="grey", label=f"prevalence {y.mean():.2f}")
    axis.set(xlabel="recall (sensitivity)", ylabel="precision (PPV)", title="Precision–recall (test set)",
             xlim=(0, 1), ylim=(0, 1.02))  # fmt: skip
    axis.legend(loc="lower left", fontsize=8)
    return _png(figure)


def reliability_plot(labels: ArrayLike, raw_scores: ArrayLike, calibrated_scores: ArrayLike) -> bytes:
    figure, axis = plt.subplots(figsize=(4.5, 4.5))
    axis.plot([0, 1], [0, 1], linestyle="--", color="grey", label="perfect calibration")
    for scores, name in ((raw_scores, "before temperature scaling"), (calibrated_scores, "after")):
        curve = reliability_curve(labels, scores)
        axis.plot([p["mean_score"] for p in curve], [p["observed"] for p in curve], marker="o", label=name)
    axis.set(xlabel="predicted probability of malignancy", ylabel="observed rate", title="Reliability (test set)",
             xlim=(0, 1), ylim=(0, 1))  # fmt: skip
    axis.legend(loc="upper left", fontsize=8)
    return _png(figure)


def training_curves_plot(history: list[dict[str, float]]) -> bytes:
    epochs = [h["epoch"] for h in history]
    figure, (loss_axis, auc_axis) = plt.subplots(1, 2, figsize=(8, 3.5))
    loss_axis.plot(epochs, [h["loss"] for h in history], marker="o")
    loss_axis.set(xlabel="epoch", ylabel="training loss", title="Loss")
    auc_axis.plot(epochs, [h["val_auc"] for h in history], marker="o", color="darkgreen")
    auc_axis.set(xlabel="epoch", ylabel="validation AUC", title="Validation AUC")
    return _png(figure)


# --- drift monitoring (inline SVG for the admin dashboard) ---------------------------------------


def inline_svg(figure) -> str:
    """The figure as SVG text to inline in HTML (closed afterwards)."""
    buffer = io.StringIO()
    figure.tight_layout()
    figure.savefig(buffer, format="svg")
    plt.close(figure)
    text = buffer.getvalue()
    return text[text.index("<svg") :]  # drop the XML prolog and doctype: the SVG is inlined in HTML


def drift_histograms_svg(features: list[dict], columns: int = 4) -> str:
    """Small multiples: per feature, the reference and current histograms (as shares, so windows of
    any size compare), titled with the test's p-value and the verdict."""
    shown = [f for f in features if f.get("histogram", {}).get("edges")]
    if not shown:
        return ""
    rows = -(-len(shown) // columns)
    figure, axes = plt.subplots(rows, columns, figsize=(3.1 * columns, 2.3 * rows), squeeze=False)
    for axis in axes.ravel()[len(shown) :]:
        axis.axis("off")
    for axis, feature in zip(axes.ravel(), shown, strict=False):
        histogram = feature["histogram"]
        edges = np.asarray(histogram["edges"])
        widths = np.diff(edges)
        for key, colour, label in (("reference", "#7f8c8d", "reference"), ("current", "#c0392b", "current")):
            counts = np.asarray(histogram[key], dtype=float)
            shares = counts / max(counts.sum(), 1)
            axis.bar(edges[:-1], shares, width=widths, align="edge", alpha=0.55, color=colour, label=label)
        verdict = "DRIFT" if feature["drifted"] else "ok"
        axis.set_title(f"{feature['feature']}\np={feature['p_value']:.2g} ({verdict})", fontsize=9,
                       color="#c0392b" if feature["drifted"] else "#1d2733")  # fmt: skip
        axis.tick_params(labelsize=7)
    axes.ravel()[0].legend(fontsize=7)
    return inline_svg(figure)


def drift_timeline_svg(reports: list[dict]) -> str:
    """Across past reports (oldest first): the smallest p-value against its Holm threshold on a log
    scale, and the verdict as the marker colour."""
    judged = [r for r in reports if r.get("min_p") is not None]
    if not judged:
        return ""
    figure, axis = plt.subplots(figsize=(9, 2.6))
    times = [r["created_at"] for r in judged]
    smallest = [max(r["min_p"], 1e-12) for r in judged]  # clipped: below 1e-12 it is all the same verdict
    thresholds = [r["threshold"] for r in judged]
    axis.plot(times, smallest, color="#34495e", linewidth=1)
    axis.step(times, thresholds, where="mid", color="#e67e22", linestyle="--", linewidth=1, label="threshold")
    colours = ["#c0392b" if r["status"] == "drift" else "#27ae60" for r in judged]
    axis.scatter(times, smallest, c=colours, zorder=3, s=22)
    axis.set_yscale("log")
    axis.set_ylabel("smallest p-value", fontsize=8)
    axis.tick_params(labelsize=7)
    axis.legend(fontsize=7, loc="lower left")
    figure.autofmt_xdate()
    return inline_svg(figure)


def confusion_matrix_plot(matrix: ArrayLike, class_names: list[str] | tuple[str, ...]) -> bytes:
    """The confusion matrix of the most probable diagnosis: each row (true class) as shares of its cases,
    with the counts written in the cells."""
    counts = np.asarray(matrix, dtype=np.int64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = 1.6 + 0.55 * len(class_names)
    figure, axis = plt.subplots(figsize=(size + 1, size))
    image = axis.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    ticks = range(len(class_names))
    axis.set_xticks(ticks, class_names, rotation=45, ha="right")
    axis.set_yticks(ticks, [f"{name} ({row.sum()})" for name, row in zip(class_names, counts, strict=True)])
    for row, column in np.ndindex(counts.shape):
        colour = "white" if shares[row, column] > 0.6 else "black"
        axis.text(column, row, str(counts[row, column]), ha="center", va="center", fontsize=8, color=colour)
    axis.set(xlabel="predicted (most probable)", ylabel="true diagnosis (cases)", title="Confusion matrix (test set)")
    figure.colorbar(image, ax=axis, fraction=0.046, label="share of the true class")
    return _png(figure)
