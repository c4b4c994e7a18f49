"""decal.plots: the reliability figure and the grid are written as PNG and SVG with the right panels."""

from __future__ import annotations

import numpy as np
import pytest

from decal.plots import plot_grid, plot_reliability
from decal.records import PredictionRecord


def _pair(n: int = 300, seed: int = 0):
    rng = np.random.default_rng(seed)
    conf = np.clip(1 - rng.exponential(0.05, n), 0, 1)
    return conf, rng.random(n) < 0.8


def _png_size(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size


def test_plot_reliability_writes_png_and_svg(tmp_path):
    paths = plot_reliability(_pair(), tmp_path / "fig" / "reliability.png", title="GRPO / XSTest")
    assert [p.name for p in paths] == ["reliability.png", "reliability.svg"]
    assert paths[0].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    svg = paths[1].read_text()
    assert "<svg" in svg and "GRPO / XSTest" in svg
    width, height = _png_size(paths[0])
    assert height > width > 300  # reliability diagram over histogram: taller than wide


def test_svg_shows_the_bins_that_hold_data(tmp_path):
    # All confidences in [0.9, 1]: one accuracy bar (plus its gap patch) in the top panel.
    conf = np.full(50, 0.95)
    correct = np.arange(50) < 40
    base = tmp_path / "one"
    plot_reliability((conf, correct), base, n_bins=10)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Redraw through the private panel to count the bars drawn (the public API only saves files).
    from decal.plots import _draw_panel

    fig, (a, b) = plt.subplots(2, 1)
    _draw_panel(a, b, conf, correct, n_bins=10, binning="equal_width", title=None)
    heights = sorted(round(p.get_height(), 6) for p in a.patches)
    plt.close(fig)
    assert heights == [0.15, 0.8]  # accuracy 0.8 and the gap |0.95 - 0.8|
    # The printed ECE is the table's equal-mass one: tied confidences keep file order, so eight
    # bins of 5 are all correct (gap .05) and two all wrong (gap .95): .8 * .05 + .2 * .95.
    assert "ECE 23.00" in (base.with_suffix(".svg")).read_text()


def test_plot_grid_rows_methods_columns_datasets(tmp_path):
    runs = {
        ("GRPO", "OpenAI"): _pair(seed=1),
        ("GRPO", "XSTest"): _pair(seed=2),
        ("Ours", "OpenAI"): _pair(seed=3),
        # ("Ours", "XSTest") is missing: that cell stays blank
    }
    paths = plot_grid(runs, tmp_path / "grid", title="Qwen3-1.7B")
    svg = paths[1].read_text()
    for label in ("GRPO / OpenAI", "GRPO / XSTest", "Ours / OpenAI", "Qwen3-1.7B"):
        assert label in svg
    assert "Ours / XSTest" not in svg
    width, height = _png_size(paths[0])
    assert width > 500 and height > 800


def test_plot_accepts_prediction_records(tmp_path):
    records = [
        PredictionRecord(id=str(i), task="t", split="s", label="A", prediction="A" if i % 3 else "B",
                         correct=bool(i % 3), valid=True, confidence=0.6 + i / 100,
                         option_probs=[0.6 + i / 100, 0.0], labels=["A", "B"])
        for i in range(30)
    ]
    paths = plot_reliability(records, tmp_path / "recs", binning="equal_mass")
    assert all(p.stat().st_size > 1000 for p in paths)


def test_plot_errors_name_the_argument(tmp_path):
    with pytest.raises(ValueError, match="`confidence` must hold probabilities"):
        plot_reliability(([1.5], [True]), tmp_path / "x")
    with pytest.raises(ValueError, match="`runs` must hold at least one"):
        plot_grid({}, tmp_path / "x")
    with pytest.raises(ValueError, match=r"`runs` keys must be \(row, column\) pairs"):
        plot_grid({"GRPO": _pair()}, tmp_path / "x")
    with pytest.raises(ValueError, match="`binning` must be one of"):
        plot_reliability(_pair(), tmp_path / "x", binning="log")
