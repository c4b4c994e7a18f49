"""`decal monitor STATE_DIR`: the monitor's figures over time from a decision log, with the alarms marked.

Reads the store (read-only; a running server keeps writing, WAL mode lets both work), replays
it in time order (`decal.serve.monitor.monitor_history`), and writes into ``OUT`` (default
``STATE_DIR/report``):

- ``monitor.png`` / ``.svg``: four panels over the number of decisions: accuracy of answered
  decisions (measured on labels, the label-free estimate, the promise), deferral rate / mean
  confidence / mean label mass, ECE and Brier of the labelled window, and both alarms' e-values
  against their firing level 1/alpha (drawn up to 1e6); a vertical line where each alarm first fired, a dotted one
  at each new epoch (reload);
- ``monitor.md`` or one self-contained ``monitor.html`` (the figure embedded): the current figures,
  the alarms, and the epochs;
- ``monitor.json``: the final snapshot (what ``GET /v1/monitor`` showed) and the history rows.
"""

from __future__ import annotations

import base64
import html
import json
import os
from pathlib import Path
from typing import Literal

__all__ = ["write_monitor_report", "history_figure"]

_COLORS = {"accuracy": "#3b6ea8", "estimated_accuracy": "#5cb85c", "target_accuracy": "#222222", "deferral_rate": "#8e44ad",
           "mean_confidence": "#3b6ea8", "mean_label_mass": "#e67e22", "ece": "#d9534f", "brier": "#7f8c8d",
           "guarantee_e_value": "#d9534f", "drift_e_value": "#e67e22"}


_E_CAP = 1e6  # e-values drawn at most this high


def _series(rows: list[dict], key: str) -> tuple[list[float], list[float]]:
    points = [(r["decisions"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in points], [p[1] for p in points]


def _marks(rows: list[dict]) -> dict[str, list[float]]:
    """Decision counts where each alarm first fired (per epoch) and where epochs began."""
    marks = {"guarantee": [], "drift": [], "epoch": []}
    previous = None
    for r in rows:
        if previous is not None and r["epoch"] != previous["epoch"]:
            marks["epoch"].append(r["decisions"])
        for alarm in ("guarantee", "drift"):
            before = previous is not None and previous["epoch"] == r["epoch"] and previous[f"{alarm}_alert"]
            if r[f"{alarm}_alert"] and not before:
                marks[alarm].append(r["decisions"])
        previous = r
    return marks


def history_figure(rows: list[dict], path: str | os.PathLike, *, alpha: float, title: str) -> list[Path]:
    """Draw the four panels (module docstring) to ``path`` (.png and .svg)."""
    from ..plots import _pyplot, _save

    plt = _pyplot()
    fig, axes = plt.subplots(4, 1, figsize=(9, 10), sharex=True)
    panels = [
        (axes[0], ("accuracy", "estimated_accuracy", "target_accuracy"), "accuracy of answered"),
        (axes[1], ("deferral_rate", "mean_confidence", "mean_label_mass"), "analysis window"),
        (axes[2], ("ece", "brier"), "labelled window"),
        (axes[3], ("guarantee_e_value", "drift_e_value"), "e-value"),
    ]
    names = {"accuracy": "measured (labels)", "estimated_accuracy": "label-free estimate", "target_accuracy": "promise",
             "guarantee_e_value": "guarantee alarm", "drift_e_value": "drift alarm", "ece": "ECE", "brier": "Brier"}
    for ax, keys, ylabel in panels:
        for key in keys:
            x, y = _series(rows, key)
            if key.endswith("e_value"):  # past the alarm the evidence grows without bound: keep the level readable
                y = [min(v, _E_CAP) for v in y]
            if x:
                style = {"drawstyle": "steps-post", "linestyle": "--"} if key == "target_accuracy" else {}
                ax.plot(x, y, color=_COLORS[key], linewidth=1.2, label=names.get(key, key.replace("_", " ")), **style)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
    axes[3].set_yscale("log")
    axes[3].set_ylim(top=_E_CAP * 3)
    axes[3].axhline(1.0 / alpha, color="black", linewidth=0.8, linestyle=":", label=f"fires at 1/alpha = {1 / alpha:g}")
    marks = _marks(rows)
    for ax in axes:
        for x in marks["guarantee"]:
            ax.axvline(x, color=_COLORS["guarantee_e_value"], linewidth=1.0)
        for x in marks["drift"]:
            ax.axvline(x, color=_COLORS["drift_e_value"], linewidth=1.0, linestyle="-.")
        for x in marks["epoch"]:
            ax.axvline(x, color="gray", linewidth=0.8, linestyle=":")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7, loc="best")
    axes[3].set_xlabel("decisions")
    axes[0].set_title(title, fontsize=10)
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def _fmt(value, pct: bool = False) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{100 * value:.2f}" if pct else f"{value:.4g}"
    return str(value)


def _summary(snapshot: dict) -> list[tuple[str, str]]:
    analysis, labelled, epoch = snapshot["analysis_window"], snapshot["labelled_window"], snapshot["epoch"]
    promise = snapshot.get("promise") or {}
    return [
        ("decisions (all epochs)", _fmt(snapshot["decisions"])), ("labelled (all epochs)", _fmt(snapshot["labelled"])),
        ("epoch", f"{epoch['id']}: {epoch['decisions']} decisions, {epoch['labelled']} labelled"),
        ("promise: accuracy of answered >= (%)", _fmt(promise.get("target_accuracy"), True)),
        ("accuracy of answered, labelled window (%)", _fmt(labelled["accuracy"], True) + f" (n {labelled['answered']})"),
        ("label-free estimate, analysis window (%)", _fmt(analysis["estimated_accuracy"], True)),
        ("ECE / Brier, labelled window (%)", f"{_fmt(labelled['ece'], True)} / {_fmt(labelled['brier'], True)}"),
        ("deferral rate (%)", _fmt(analysis["deferral_rate"], True)),
        ("mean confidence / label mass (%)", f"{_fmt(analysis['mean_confidence'], True)} / {_fmt(analysis['mean_label_mass'], True)}"),
    ]


def _alarm_rows(snapshot: dict) -> list[tuple[str, str, str, str]]:
    out = []
    for name, alarm in snapshot["alarms"].items():
        if alarm.get("disabled"):
            out.append((name, "off", "–", alarm["disabled"]))
            continue
        fired = alarm.get("fired_at_label") or alarm.get("fired_at_decision")
        unit = "label" if name == "guarantee" else "decision"
        out.append((name, "ALERT" if alarm["alert"] else "ok", f"{alarm['e_value']:.3g} (fires at {alarm['fires_at']:g})",
                    f"first fired at {unit} {fired} of this epoch" if fired else "not fired"))
    return out


def _epoch_rows(epochs) -> list[tuple[str, ...]]:
    rows = []
    for e in epochs:
        s = e.settings
        cal, thr, ref = s.get("calibrator") or {}, s.get("threshold") or {}, s.get("reference") or {}
        rows.append((str(e.id), f"{e.started:.0f}", cal.get("path", "none"), _fmt(thr.get("value")),
                     _fmt(thr.get("target_accuracy")), ref.get("source", "none")))
    return rows


def _markdown(title: str, summary, alarms, epochs, figure: str) -> str:
    lines = [f"# {title}", "", "| figure | value |", "| --- | ---: |"] + [f"| {a} | {b} |" for a, b in summary]
    lines += ["", "## Alarms", "", "| alarm | state | e-value | |", "| --- | --- | ---: | --- |"]
    lines += [f"| {' | '.join(r)} |" for r in alarms]
    lines += ["", "## Epochs", "", "| epoch | started (unix s) | calibrator | threshold | promise | reference |",
              "| ---: | ---: | --- | ---: | ---: | --- |"] + [f"| {' | '.join(r)} |" for r in epochs]
    lines += ["", "## Over time", "", f"![monitor]({figure})", ""]
    return "\n".join(lines)


def _html(title: str, summary, alarms, epochs, png: Path) -> str:
    from ..experiments.report import _CSS

    esc = html.escape

    def table(header, rows):
        head = "".join(f"<th>{esc(h)}</th>" for h in header)
        body = "".join("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in row) + "</tr>" for row in rows)
        return f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"

    image = base64.b64encode(png.read_bytes()).decode("ascii")
    return "\n".join([
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{esc(title)}</h1>", table(("figure", "value"), summary), "<h2>Alarms</h2>",
        table(("alarm", "state", "e-value", ""), alarms), "<h2>Epochs</h2>",
        table(("epoch", "started (unix s)", "calibrator", "threshold", "promise", "reference"), epochs),
        f"<h2>Over time</h2><img alt='monitor' src='data:image/png;base64,{image}'>", "</body></html>",
    ])


def write_monitor_report(state_dir: str | os.PathLike, *, format: Literal["md", "html"] = "md",
                         out: str | os.PathLike | None = None, points: int = 200) -> Path:
    """Write the monitor report of a state dir (module docstring); returns the report's path.

    Raises:
        FileNotFoundError: `state_dir` holds no decision log; ValueError: an empty log or a bad `format`.
    """
    from .._io import write_json_atomic, write_text_atomic
    from .monitor import monitor_history
    from .store import open_store

    if format not in ("md", "html"):
        raise ValueError(f"`--format` must be md or html; got {format!r}")
    store = open_store(state_dir, create=False)
    try:
        rows, monitor = monitor_history(store, points=points)
        epochs = store.epochs()
    finally:
        store.close()
    if not rows:
        raise ValueError(f"{state_dir}: the decision log holds no decisions yet")
    snapshot = monitor.snapshot()
    folder = Path(out) if out is not None else Path(state_dir) / "report"
    title = f"decal monitor: {state_dir}"
    alpha = float(epochs[-1].settings.get("alarm_alpha", 0.05))
    png, _ = history_figure(rows, folder / "monitor", alpha=alpha, title=title)
    write_json_atomic(folder / "monitor.json", json.loads(json.dumps({"snapshot": snapshot, "history": rows})))
    summary, alarms, epoch_rows = _summary(snapshot), _alarm_rows(snapshot), _epoch_rows(epochs)
    path = folder / f"monitor.{format}"
    text = _markdown(title, summary, alarms, epoch_rows, png.name) if format == "md" else _html(title, summary, alarms, epoch_rows, png)
    write_text_atomic(path, text)
    return path
