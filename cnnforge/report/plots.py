"""Figures as PNG bytes, drawn with matplotlib's Agg backend (no display, no pyplot state).

Each function takes the plain data that ``cnnforge.report.figures`` and ``cnnforge.report.explain`` compute and
only draws it: titles, axis labels with units, class names rather than indices.
"""

from __future__ import annotations

import io
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from cnnforge.core.objectives import TrialPoint, higher_is_better

if TYPE_CHECKING:
    from cnnforge.report.explain import Explanation, FeatureMaps, FilterBank
    from cnnforge.report.figures import ParetoFronts

MAPS_PER_LAYER = 16
FILTERS_SHOWN = 32
BEST_COLOUR, OTHER_COLOUR, FRONT_COLOUR, FAILED_COLOUR = "#d62728", "#1f77b4", "#2ca02c", "#7f7f7f"


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _png(figure: Any) -> bytes:
    out = io.BytesIO()
    figure.savefig(out, format="png", dpi=100)
    return out.getvalue()


def metric_axis(metric: str) -> tuple[str, float]:
    """An axis label with its unit for a Keras metric name, and the factor to plot it with."""
    split = "validation " if metric.startswith("val_") else "training "
    name = metric.removeprefix("val_").replace("_", " ")
    if "accuracy" in name:
        return f"{split}{name} (%)", 100.0
    if name == "loss":
        return f"{split}loss (cross-entropy)", 1.0
    return f"{split}{name}", 1.0


def render_trial_scores(points: list[TrialPoint], objective: str, best_id: str | None) -> bytes:
    """The objective of each trial in run order, the best so far as a step line; the winner in
    red, failed trials marked on the axis."""
    label, factor = metric_axis(objective)
    figure = _figure(max(6.0, 0.35 * len(points) + 2), 3.8)
    ax = figure.add_subplot()
    positions = np.arange(len(points))
    scored = [
        (x, p.score * factor) for x, p in zip(positions, points, strict=True) if p.score is not None
    ]
    if scored:
        xs, ys = zip(*scored, strict=True)
        pick = np.maximum if higher_is_better(objective) else np.minimum
        ax.step(
            xs,
            pick.accumulate(ys),
            where="post",
            color=FAILED_COLOUR,
            alpha=0.6,
            label="best so far",
        )
        ax.scatter(xs, ys, color=OTHER_COLOUR, zorder=3, label="trial")
    for x, p in zip(positions, points, strict=True):
        if p.score is None:
            ax.annotate(
                f"✕ {p.status.lower()}",
                (x, 0.02),
                xycoords=("data", "axes fraction"),
                ha="center",
                rotation=90,
                va="bottom",
                color=FAILED_COLOUR,
                fontsize=8,
            )
        elif p.trial_id == best_id:
            ax.scatter([x], [p.score * factor], color=BEST_COLOUR, s=80, zorder=4, label="winner")
            unit = "%" if factor == 100 else ""
            ax.annotate(
                f"{p.score * factor:.4g}{unit}",
                (x, p.score * factor),
                xytext=(8, -3),
                textcoords="offset points",
                color=BEST_COLOUR,
                fontsize=9,
            )
    ax.set_xticks(positions, [p.trial_id for p in points])
    ax.set_xlim(-0.7, len(points) - 0.3)
    ax.set_xlabel("trial (in the order it ran)")
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0].capitalize()} of each trial")
    ax.grid(alpha=0.3)
    if scored:
        ax.legend(loc="best", fontsize=8)
    return _png(figure)


def latency_axis(column: str) -> str:
    name = column.replace("_", " ")
    for suffix, unit in ((" ms", "ms"), (" us", "µs"), (" s", "s")):
        if name.endswith(suffix):
            return f"{name.removesuffix(suffix)} ({unit})"
    return name


def render_score_latency(
    points: list[TrialPoint],
    fronts: ParetoFronts,
    objective: str,
    latency_name: str,
    best_id: str | None,
) -> bytes:
    """Objective against latency per trial, with the Pareto front (no trial beats those on both)
    as a line, and the trials that join it once size counts as hollow markers."""
    label, factor = metric_axis(objective)
    measured = [p for p in points if p.score is not None and p.latency is not None]
    figure = _figure(7, 4.5)
    ax = figure.add_subplot()
    ax.scatter(
        [p.latency for p in measured],
        [p.score * factor for p in measured],
        color=OTHER_COLOUR,
        label="trial",
        zorder=2,
    )
    ax.step(
        [p.latency for p in fronts.latency],
        [p.score * factor for p in fronts.latency],
        where="post",
        color=FRONT_COLOUR,
        marker="o",
        label="Pareto front",
        zorder=3,
    )
    if fronts.smaller:
        ax.scatter(
            [p.latency for p in fronts.smaller],
            [p.score * factor for p in fronts.smaller],
            s=120,
            facecolors="none",
            edgecolors=FRONT_COLOUR,
            linewidths=2,
            label="on the front for its size",
            zorder=3,
        )
    for p in measured:
        colour = BEST_COLOUR if p.trial_id == best_id else "black"
        text = f"{p.trial_id} (best)" if p.trial_id == best_id else p.trial_id
        ax.annotate(
            text,
            (p.latency, p.score * factor),
            xytext=(4, 4),
            textcoords="offset points",
            fontsize=8,
            color=colour,
        )
    ax.set_xlabel(latency_axis(latency_name))
    ax.set_ylabel(label)
    ax.set_title(f"{label.split(' (')[0].capitalize()} against latency")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    return _png(figure)


def render_training_curves(history: dict[str, list[float]], title: str) -> bytes:
    """Loss and every other metric per epoch, training and validation side by side."""
    metrics = [m for m in history if not m.startswith("val_")]
    figure = _figure(5.0 * len(metrics), 3.8)
    axes = figure.subplots(1, len(metrics), squeeze=False)[0]
    for ax, metric in zip(axes, metrics, strict=True):
        label, factor = metric_axis(metric)
        for name, style in ((metric, "-o"), (f"val_{metric}", "--s")):
            if name in history:
                values = np.asarray(history[name]) * factor
                epochs = np.arange(1, len(values) + 1)
                kind = "validation" if name.startswith("val_") else "training"
                ax.plot(epochs, values, style, label=kind, markersize=4)
        ax.set_xlabel("epoch")
        ax.set_ylabel(label.removeprefix("training "))
        ax.set_title(label.removeprefix("training ").split(" (")[0].capitalize() + " per epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend()
        ax.grid(alpha=0.3)
    figure.suptitle(title)
    return _png(figure)


def render_confusion(matrix: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Counts per (true, predicted) pair, coloured by the share of the true class."""
    counts = np.asarray(matrix)
    classes = len(class_names)
    totals = counts.sum(axis=1, keepdims=True)
    share = np.divide(counts * 100.0, totals, out=np.zeros(counts.shape), where=totals > 0)
    side = min(max(5.0, 0.5 * classes + 2.0), 30.0)
    figure = _figure(side + 1.2, side)
    ax = figure.add_subplot()
    image = ax.imshow(share, cmap="Blues", vmin=0, vmax=100)
    figure.colorbar(image, ax=ax, label="share of the true class (%)", shrink=0.8)
    if classes <= 30:
        for (row, col), count in np.ndenumerate(counts):
            if count:
                colour = "white" if share[row, col] > 60 else "black"
                ax.text(col, row, str(count), ha="center", va="center", color=colour, fontsize=8)
    ticks = np.arange(classes)
    ax.set_xticks(ticks, class_names, rotation=45, ha="right", fontsize=8)
    ax.set_yticks(ticks, class_names, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title(f"Confusion matrix on the test split ({int(counts.sum())} images)")
    return _png(figure)


def render_class_scores(per_class: list[dict[str, Any]]) -> bytes:
    """Precision and recall per class as paired horizontal bars."""
    names = [c["name"] for c in per_class]
    rows = np.arange(len(names))
    figure = _figure(7, max(3.0, 0.35 * len(names) + 1.2))
    ax = figure.add_subplot()
    height = 0.4
    ax.barh(rows - height / 2, [c["precision"] * 100 for c in per_class], height, label="precision")
    ax.barh(rows + height / 2, [c["recall"] * 100 for c in per_class], height, label="recall")
    ax.set_yticks(rows, names, fontsize=8)
    ax.invert_yaxis()
    ax.set_xlim(0, 100)
    ax.set_xlabel("score on the test split (%)")
    ax.set_title("Precision and recall per class")
    ax.legend(loc="lower left", bbox_to_anchor=(1.0, 0.0))
    ax.grid(axis="x", alpha=0.3)
    return _png(figure)


def render_reliability(views: dict[str, list[dict[str, Any]]], ece: dict[str, float]) -> bytes:
    """Accuracy against mean confidence per bin of confidence, for each view (before / after
    calibration), with the diagonal a calibrated model would follow."""
    figure = _figure(5.5, 5)
    ax = figure.add_subplot()
    ax.plot([0, 100], [0, 100], color=FAILED_COLOUR, linestyle=":", label="calibrated")
    for name, rows in views.items():
        full = [r for r in rows if r["count"]]
        ax.plot(
            [r["confidence"] * 100 for r in full],
            [r["accuracy"] * 100 for r in full],
            marker="o",
            label=f"{name}: ECE {ece[name]:.2%}",
        )
    ax.set_xlim(0, 100)
    ax.set_ylim(0, 100)
    ax.set_xlabel("mean confidence in the bin (%)")
    ax.set_ylabel("accuracy in the bin (%)")
    ax.set_title("Reliability diagram (15 equal-width bins)")
    ax.legend(loc="upper left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(figure)


def render_coverage(curves: dict[str, list[tuple[float, float]]]) -> bytes:
    """Accuracy on the most confident share of the test images against that share."""
    figure = _figure(6, 4)
    ax = figure.add_subplot()
    for name, points in curves.items():
        ax.plot([c * 100 for c, _ in points], [a * 100 for _, a in points], marker=".", label=name)
    ax.set_xlabel("coverage: share of the test images answered, most confident first (%)")
    ax.set_ylabel("accuracy on them (%)")
    ax.set_title("Accuracy against coverage")
    ax.legend(loc="lower left", fontsize=8)
    ax.grid(alpha=0.3)
    return _png(figure)


def _show_pixels(ax: Any, pixels: np.ndarray) -> None:
    """Raw 0-255 pixels as they are: grayscale for one channel, colour for three."""
    if pixels.shape[-1] == 1:
        ax.imshow(pixels[..., 0], cmap="gray", vmin=0, vmax=255)
    else:
        ax.imshow(np.clip(pixels, 0, 255).astype(np.uint8))
    ax.set_axis_off()


def render_misclassified(
    images: np.ndarray, true_names: list[str], predicted_names: list[str], confidence: list[float]
) -> bytes:
    """A grid of misclassified images, each titled with its true and predicted class."""
    columns = min(6, len(images))
    rows = math.ceil(len(images) / columns)
    figure = _figure(2.0 * columns, 2.3 * rows + 0.4)
    axes = figure.subplots(rows, columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, image, true, predicted, p in zip(
        axes, images, true_names, predicted_names, confidence, strict=False
    ):
        _show_pixels(ax, image)
        ax.set_title(f"true: {true}\npredicted: {predicted}\n({p:.0%} sure)", fontsize=8)
    figure.suptitle("Test images the model got wrong, most confident mistakes first")
    return _png(figure)


def _normalised(kernels: np.ndarray) -> np.ndarray:
    """Each kernel scaled to [0, 1] on its own, so its pattern shows whatever its magnitude."""
    low = kernels.min(axis=(1, 2, 3), keepdims=True)
    span = kernels.max(axis=(1, 2, 3), keepdims=True) - low
    return np.divide(kernels - low, span, out=np.full(kernels.shape, 0.5), where=span > 0)


def _draw_filters(panel: Any, bank: FilterBank) -> None:
    shown = _normalised(bank.kernels[:FILTERS_SHOWN])
    columns = min(16, len(shown))
    axes = panel.subplots(math.ceil(len(shown) / columns), columns, squeeze=False).ravel()
    for ax in axes:
        ax.set_axis_off()
    for ax, kernel in zip(axes, shown, strict=False):
        ax.imshow(
            kernel[..., 0] if kernel.shape[-1] == 1 else kernel,
            cmap="gray",
            interpolation="nearest",
        )
    layer = bank.layer
    kh, kw = layer.kernel_size or bank.kernels.shape[1:3]
    count = len(bank.kernels)
    which = f"first {len(shown)} of {count}" if count > len(shown) else f"all {count}"
    note = f"; {bank.note}" if bank.note else ""
    panel.suptitle(
        f"Learned filters of {layer.path} ({layer.kind}): {which} {kh}×{kw} kernels{note}; "
        "light = positive weight, dark = negative",
        fontsize=9,
    )


def most_active_channels(maps: np.ndarray, count: int) -> list[int]:
    """The ``count`` channels with the largest mean activation, strongest first (ties: index)."""
    strength = maps.reshape(-1, maps.shape[-1]).mean(axis=0)
    return [int(i) for i in np.argsort(-strength, kind="stable")[:count]]


def _draw_maps(panel: Any, entry: FeatureMaps) -> None:
    layer, maps = entry.layer, entry.maps
    channels = most_active_channels(maps, MAPS_PER_LAYER)
    axes = panel.subplots(1, MAPS_PER_LAYER)
    for ax in axes:
        ax.set_axis_off()
    for ax, channel in zip(axes, channels, strict=False):
        ax.imshow(maps[..., channel], cmap="viridis", interpolation="nearest")
        ax.set_title(f"#{channel}", fontsize=7)
    height, width, depth = layer.output_shape
    kernel = f" {layer.kernel_size[0]}×{layer.kernel_size[1]}" if layer.kernel_size else ""
    filters = f": {depth} filters{kernel}" if layer.is_conv else ""
    which = (
        f"the {len(channels)} most active of {depth} maps"
        if depth > len(channels)
        else (f"all {depth} maps")
    )
    panel.suptitle(
        f"{layer.path} ({layer.kind}){filters} → output {height}×{width}×{depth}; {which}",
        fontsize=10,
        x=0.01,
        ha="left",
    )


def render_explanation(explanation: Explanation, title: str) -> bytes:
    """The input image and first-layer filters on top, then one row of feature maps per layer."""
    rows = len(explanation.feature_maps)
    filter_rows = (
        0
        if explanation.filters is None
        else math.ceil(min(len(explanation.filters.kernels), FILTERS_SHOWN) / 16)
    )
    top = max(2.2, 1.0 + 0.9 * filter_rows)
    figure = _figure(16, top + 1.35 * rows + 0.6)
    panels = figure.subfigures(1 + rows, 1, height_ratios=[top] + [1.35] * rows)
    panels = np.atleast_1d(panels)
    header = panels[0].subfigures(1, 2, width_ratios=[1.3, 6])
    image_ax = header[0].subplots()
    _show_pixels(image_ax, explanation.image)
    if explanation.prediction:
        name, probability = explanation.prediction
        image_ax.set_title(
            f"input {'×'.join(map(str, explanation.image.shape))}\n"
            f"predicted: {name} ({probability:.0%})",
            fontsize=9,
        )
    if explanation.filters is not None:
        _draw_filters(header[1], explanation.filters)
    for panel, entry in zip(panels[1:], explanation.feature_maps, strict=True):
        _draw_maps(panel, entry)
    shown = sum(e.layer.is_conv for e in explanation.feature_maps)
    subset = (
        f" ({shown} of {explanation.conv_layers} conv layers shown)"
        if shown < explanation.conv_layers
        else ""
    )
    notes = f"\n{'; '.join(explanation.notes)}" if explanation.notes else ""
    figure.suptitle(
        f"What {explanation.model} sees in {title}: feature maps, one row per layer{subset}; "
        f"each map on its own colour scale, yellow = strongest{notes}",
        fontsize=11,
    )
    return _png(figure)
