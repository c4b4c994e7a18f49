"""Reliability diagrams over confidence histograms, like the paper's Figure 1.

One panel is a reliability diagram (bars: accuracy per confidence bin; shaded: the gap between
accuracy and mean confidence in that bin; dashed: the diagonal of perfect calibration) above a
histogram of the confidences (fraction of examples per bin). `plot_reliability` draws one run;
`plot_grid` draws several (rows: methods, columns: datasets). Both save ``.png`` and ``.svg``.

Against a known truth (records with `true_probs`, the `verdicts` task), `plot_truth_grid` draws
confidence against the true probability of the chosen option instead of accuracy (issue #22):
every prediction as a dot, the per-bin means as a line (equal-width confidence bins), the
diagonal where a model that reports the true probability of its choice sits (TCE 0).

The bars use equal-width bins by default, although the paper's ECE uses equal-mass bins: when
confidences cluster near 1 (the overconfident models the paper studies) equal-mass bins shrink
to slivers that cannot be seen. The ECE printed in each panel is the table's (equal-mass) ECE.
Pass ``binning="equal_mass"`` to draw each bin over the range of its confidences instead.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import numpy as np

from ._checks import check_binning, check_conf_correct, check_n_bins
from .binning import bin_stats
from .metrics import Binning, _ece

__all__ = ["plot_reliability", "plot_grid", "plot_truth_grid"]

_BAR = "#3b6ea8"
_GAP = "#d9534f"


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")  # files only; never needs a display
    import matplotlib.pyplot as plt

    return plt


def _conf_correct(data) -> tuple[np.ndarray, np.ndarray]:
    """confidence and correct from records, a RecordArrays, or a ``(confidence, correct)`` pair."""
    from .records import RecordArrays, records_to_arrays

    if isinstance(data, tuple) and len(data) == 2:
        return check_conf_correct(*data)
    arrays = data if isinstance(data, RecordArrays) else records_to_arrays(list(data))
    return check_conf_correct(arrays.confidence, arrays.correct)


def _draw_panel(ax_rel, ax_hist, conf, corr, *, n_bins: int, binning: str, title: str | None) -> None:
    stats = bin_stats(conf, corr, n_bins, binning)
    ok = stats.count > 0
    if binning == "equal_width":
        left, width = stats.lower, stats.upper - stats.lower
    else:
        # A bin covers its own confidences; keep a minimum width so a narrow bin stays visible.
        width = np.maximum(stats.upper - stats.lower, 0.01)
        left = np.minimum(stats.lower, 1.0 - width)
    ax_rel.bar(left[ok], stats.acc[ok], width=width[ok], align="edge", color=_BAR, edgecolor="black",
               linewidth=0.6, label="Accuracy")
    gap_bottom = np.minimum(stats.acc[ok], stats.conf[ok])
    gap_height = np.abs(stats.conf[ok] - stats.acc[ok])
    ax_rel.bar(left[ok], gap_height, bottom=gap_bottom, width=width[ok], align="edge", color=_GAP, alpha=0.35,
               edgecolor=_GAP, hatch="//", linewidth=0.6, label="Gap")
    ax_rel.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="Perfect calibration")
    ax_rel.set_xlim(0, 1)
    ax_rel.set_ylim(0, 1)
    ax_rel.set_ylabel("Accuracy")
    ax_rel.tick_params(labelbottom=False)
    ece_value = _ece(conf, corr, n_bins, "equal_mass")
    ax_rel.text(0.04, 0.95, f"ECE {100 * ece_value:.2f}\nAcc {100 * corr.mean():.1f}\nn {len(conf)}",
                transform=ax_rel.transAxes, va="top", ha="left", fontsize=8,
                bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "lightgray"})
    if title:
        ax_rel.set_title(title, fontsize=10)
    # Histogram: always 20 equal-width bins, so the shape of the distribution is visible.
    weights = np.full(len(conf), 1.0 / len(conf))
    ax_hist.hist(conf, bins=np.linspace(0, 1, 21), weights=weights, color=_BAR, edgecolor="black", linewidth=0.6)
    ax_hist.axvline(conf.mean(), color=_GAP, linestyle="--", linewidth=1.0)
    ax_hist.set_xlim(0, 1)
    ax_hist.set_ylim(0, 1)
    ax_hist.set_xlabel("Confidence")
    ax_hist.set_ylabel("% of samples")
    ax_hist.yaxis.set_major_formatter(lambda v, _: f"{100 * v:.0f}")


def _save(fig, path: str | os.PathLike) -> list[Path]:
    base = Path(path)
    if base.suffix.lower() in (".png", ".svg"):
        base = base.with_suffix("")
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for suffix in (".png", ".svg"):
        target = base.with_name(base.name + suffix)
        fig.savefig(target, dpi=150, bbox_inches="tight")
        out.append(target)
    return out


def plot_reliability(
    data, path: str | os.PathLike, *, title: str | None = None, n_bins: int = 10, binning: Binning = "equal_width"
) -> list[Path]:
    """Draw one run's reliability diagram over its confidence histogram.

    Args:
        data: Prediction records, a `RecordArrays`, or a ``(confidence, correct)`` pair of
            arrays of shape (n,).
        path: Output path without suffix (a ``.png``/``.svg`` suffix is dropped); both
            ``<path>.png`` and ``<path>.svg`` are written.
        title: Panel title (for example ``"Qwen3-1.7B GRPO, XSTest"``).
        n_bins: Bars in the reliability diagram.
        binning: ``"equal_width"`` (default, module docstring) or ``"equal_mass"``.

    Returns:
        The two written paths.
    """
    conf, corr = _conf_correct(data)
    n_bins, binning = check_n_bins(n_bins), check_binning(binning)
    plt = _pyplot()
    fig, (ax_rel, ax_hist) = plt.subplots(2, 1, figsize=(3.6, 4.6), sharex=True,
                                          gridspec_kw={"height_ratios": [3, 1], "hspace": 0.08})
    try:
        _draw_panel(ax_rel, ax_hist, conf, corr, n_bins=n_bins, binning=binning, title=title)
        # Upper left, under the ECE box: overconfident runs leave that corner empty.
        ax_rel.legend(loc="upper left", bbox_to_anchor=(0.0, 0.8), fontsize=7, frameon=True)
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_grid(
    runs: Mapping[tuple[str, str], object],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    n_bins: int = 10,
    binning: Binning = "equal_width",
) -> list[Path]:
    """Draw a grid of panels: one row per method, one column per dataset (the paper's Figure 1).

    Args:
        runs: ``{(row, column): data}``, where data is as in `plot_reliability`. Rows and
            columns keep their first-seen order; a missing cell stays blank.
        path: Output path without suffix; ``.png`` and ``.svg`` are written.
        title: Figure title.
        n_bins, binning: As in `plot_reliability`.
    """
    if not runs:
        raise ValueError("`runs` must hold at least one (row, column) -> records entry; got none.")
    for key in runs:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"`runs` keys must be (row, column) pairs; got {key!r}.")
    n_bins, binning = check_n_bins(n_bins), check_binning(binning)
    rows = list(dict.fromkeys(k[0] for k in runs))
    cols = list(dict.fromkeys(k[1] for k in runs))
    plt = _pyplot()
    height = 4.2 * len(rows)
    fig = plt.figure(figsize=(3.2 * len(cols), height))
    # Margins in inches, not fractions: matplotlib's default top (0.88) leaves a band of 2 in
    # under the title of a four-row grid.
    outer = fig.add_gridspec(len(rows), len(cols), hspace=0.3, wspace=0.45, top=1 - 0.95 / height, bottom=0.5 / height)
    try:
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                if (row, col) not in runs:
                    continue
                conf, corr = _conf_correct(runs[(row, col)])
                inner = outer[i, j].subgridspec(2, 1, height_ratios=[3, 1], hspace=0.08)
                ax_rel = fig.add_subplot(inner[0])
                ax_hist = fig.add_subplot(inner[1], sharex=ax_rel)
                _draw_panel(ax_rel, ax_hist, conf, corr, n_bins=n_bins, binning=binning, title=f"{row} / {col}")
        if title:
            fig.suptitle(title)
        return _save(fig, path)
    finally:
        plt.close(fig)


def _conf_truth(data) -> tuple[np.ndarray, np.ndarray]:
    """(confidence, true probability of the predicted option) from records or a `RecordArrays`."""
    from .records import RecordArrays, records_to_arrays

    arrays = data if isinstance(data, RecordArrays) else records_to_arrays(list(data))
    if arrays.true_probs is None:
        raise ValueError("a reliability diagram against the truth needs records with `true_probs` (e.g. the verdicts task)")
    p_star = arrays.true_probs[np.arange(len(arrays.confidence)), arrays.prediction_index]
    return arrays.confidence, p_star


def _draw_truth_panel(ax, conf: np.ndarray, p_star: np.ndarray, *, n_bins: int, title: str | None) -> None:
    # equal-width bins [i/M, (i+1)/M), the last closed at 1.0 (docs/design.md, "Metrics": the equal-width rule)
    which = np.minimum((conf * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(which, minlength=n_bins)
    ok = count > 0
    mean_conf = np.bincount(which, weights=conf, minlength=n_bins)[ok] / count[ok]
    mean_truth = np.bincount(which, weights=p_star, minlength=n_bins)[ok] / count[ok]
    ax.scatter(conf, p_star, s=6, alpha=0.25, color=_BAR, linewidths=0, label="Predictions")
    ax.plot(mean_conf, mean_truth, marker="o", color=_GAP, linewidth=1.2, markersize=3.5, label="Bin means")
    ax.plot([0, 1], [0, 1], linestyle="--", color="gray", linewidth=1.0, label="Confidence = truth")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("Confidence")
    ax.set_ylabel("True P(chosen option)")
    gap = conf - p_star
    ax.text(0.04, 0.97, f"TCE {100 * np.abs(gap).mean():.2f}\nOver {100 * gap.mean():+.2f}\nn {len(conf)}",
            transform=ax.transAxes, va="top", ha="left", fontsize=8,
            bbox={"boxstyle": "round", "facecolor": "white", "alpha": 0.85, "edgecolor": "lightgray"})
    if title:
        ax.set_title(title, fontsize=10)


def plot_truth_grid(
    runs: Mapping[tuple[str, str], object],
    path: str | os.PathLike,
    *,
    title: str | None = None,
    n_bins: int = 10,
) -> list[Path]:
    """Reliability against the truth: confidence vs the true probability of the chosen option (module docstring).

    Args:
        runs: ``{(row, column): records}`` (or `RecordArrays`) whose records carry `true_probs`;
            the report puts datasets in rows and methods side by side in columns. Rows and columns
            keep their first-seen order; a missing cell stays blank.
        path: Output path without suffix; ``.png`` and ``.svg`` are written.
        title: Figure title.
        n_bins: Equal-width confidence bins of the line of bin means.

    Raises:
        ValueError: no runs, a key that is not a pair, or records without `true_probs`.
    """
    if not runs:
        raise ValueError("`runs` must hold at least one (row, column) -> records entry; got none.")
    for key in runs:
        if not (isinstance(key, tuple) and len(key) == 2):
            raise ValueError(f"`runs` keys must be (row, column) pairs; got {key!r}.")
    n_bins = check_n_bins(n_bins)
    rows = list(dict.fromkeys(k[0] for k in runs))
    cols = list(dict.fromkeys(k[1] for k in runs))
    plt = _pyplot()
    height = 3.3 * len(rows)
    fig = plt.figure(figsize=(3.2 * len(cols), height))
    grid = fig.add_gridspec(len(rows), len(cols), hspace=0.4, wspace=0.35, top=1 - 0.95 / height, bottom=0.55 / height)
    try:
        for i, row in enumerate(rows):
            for j, col in enumerate(cols):
                if (row, col) in runs:
                    conf, p_star = _conf_truth(runs[(row, col)])
                    _draw_truth_panel(fig.add_subplot(grid[i, j]), conf, p_star, n_bins=n_bins, title=f"{col} / {row}")
        if title:
            fig.suptitle(title)
        return _save(fig, path)
    finally:
        plt.close(fig)
