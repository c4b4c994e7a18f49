"""Paper-style reports of an experiment folder: Markdown and a single offline HTML file.

Against a known truth the report opens with the comparison that matters (accuracy, ECE, TCE and
overconfidence with intervals; the hedging and committed conditions side by side when the grid has
both) and the reliability diagrams against the truth (`decal.experiments.headline`). Then the
tables follow the paper's layouts (values in percent with two decimals; † in-domain, * OOD):
Table 1 (accuracy and ECE of base, SFT, GRPO), Tables 2 and 3 (rollout and reasoning-swap
analyses, when the config runs them), Table 4 (the same with the calibration-aware
method, "Ours"), Table 5 (ECE after post-hoc calibrators), Table 6 (SCE and MCE), Table 7
(AUROC), Table 8 (lambda sweep) and Table 9 (KL beta sweep); when the records carry the true
answer probabilities (the `verdicts` task), the truth tables T1 (accuracy, ECE, true
calibration error, mean overconfidence, mean confidence and Bayes accuracy of every method and
sweep point) and T2 (true calibration error after post-hoc calibrators); Table L (the label
mass: the options' summed full-vocabulary probability at the decision position, its mean and
the share of records below 0.5, on the raw scale whatever the calibrator); the Figure 1/4 grids of
reliability diagrams with confidence histograms come from `decal.plots.plot_grid`. A table
with no runs behind it is left out, and the report says what was not run. Intervals (bootstrap)
appear in the HTML as cell tooltips and, with `ci=True`, in the Markdown cells.
"""

from __future__ import annotations

import base64
import html
import logging
import os
from pathlib import Path
from typing import Literal

from .._io import read_json, safe_name, write_text_atomic
from .headline import headline_tables, truth_figures
from .results import HELD_OUT_UNCALIBRATED, RESULTS_FILE, read_results
from .runner import EXPERIMENT_FILE
from .tables import (
    CALIBRATOR_LABELS,
    METHOD_LABELS,
    MISSING,
    UNDEFINED,
    ResultIndex,
    Table,
    cell,
    datasets_of,
    method_label,
    percent,
)

__all__ = ["Table", "build_tables", "make_figures", "write_report", "METHOD_LABELS", "MISSING", "UNDEFINED"]

logger = logging.getLogger(__name__)

def _metric_table(key, title, metrics, models, methods, datasets, index, *, ci) -> Table | None:
    """Rows: dataset x method; columns: model x metric (the layout of Tables 1, 4, 6, 7)."""
    header = ["Dataset", "Method"] + [f"{m} {label}" for m in models for _, label in metrics]
    rows, tips, filled = [], [], False
    for ds in datasets:
        for i, meth in enumerate(methods):
            row, tip = [ds.marked if i == 0 else "", method_label(meth)], ["", ""]
            for model in models:
                for metric, _ in metrics:
                    text, t = cell(index, model, meth["name"], meth.get("variant", ""), ds, metric, ci=ci)
                    filled |= text != MISSING
                    row.append(text)
                    tip.append(t)
            rows.append(tuple(row))
            tips.append(tuple(tip))
    if not filled:
        return None
    return Table(key, title, tuple(header), tuple(rows), tuple(tips))


def _posthoc_table(models, methods, datasets, index, *, ci, metric: str = "ece", key: str = "table5",
                   title: str = "Table 5: ECE after post-hoc calibration") -> Table | None:
    """Table 5: rows model x calibrator; columns dataset x (GRPO, Ours); ECE (or another `metric`)."""
    rl = [m for m in methods if m["method"] in ("grpo", "cal-grpo")]
    cals = sorted({c for (_, _, _, _, _, _, c, _) in index.keys() if c in CALIBRATOR_LABELS and c != "none"}, key=list(CALIBRATOR_LABELS).index)
    if not cals or not rl:
        return None
    used = [ds for ds in datasets if any(index.get(mo, m["name"], "", ds, metric, calibrator=c)[0] is not None for mo in models for m in rl for c in cals)]
    header = ["Model", "Post-hoc"] + [f"{ds.marked} {method_label(m)}" for ds in used for m in rl]
    rows, tips = [], []
    for model in models:
        for i, cal in enumerate(["none", *cals]):
            row, tip = [model if i == 0 else "", CALIBRATOR_LABELS.get(cal, cal)], ["", ""]
            for ds in used:
                for m in rl:
                    # "None" on the examples the calibrators were scored on, where they held part out.
                    held_out = cal == "none" and index.get(model, m["name"], "", ds, metric, calibrator=HELD_OUT_UNCALIBRATED)[0] is not None
                    text, t = cell(index, model, m["name"], "", ds, metric, calibrator=HELD_OUT_UNCALIBRATED if held_out else cal, ci=ci)
                    row.append(text)
                    tip.append(t)
            rows.append(tuple(row))
            tips.append(tuple(tip))
    if not used:
        return None
    return Table(key, f"{title} (fitted on part of the in-domain set; in-domain cells, None included, on the other part)", tuple(header), tuple(rows), tuple(tips))


def _sweep_table(key, title, kind, param, symbol, experiment, models, datasets, index, *, ci) -> Table | None:
    """Tables 8/9: for each model with variants of `kind`, rows dataset x param value; Acc, ECE."""
    # Only the swept entries (the base entry of a sweep and its variants): another entry of the same
    # kind differs in more than this parameter (say cal-grpo with the group-accuracy target at lambda 1)
    # and would sit in the table as a second, mislabelled point.
    # Two swept entries (say one per condition of the reasoning grid) are two sweeps, each with its own rows.
    swept = list(dict.fromkeys(s["method"] for s in experiment["config"].get("sweeps") or [] if s["param"] == param))
    entries = [m for m in experiment["methods"] if m["method"] == kind and m["name"] in swept]
    if not any(m["variant"] for m in entries):
        return None
    rows, tips = [], []
    for model in models:
        for ds in datasets:
            for name in swept:
                points = []
                for m in (e for e in entries if e["name"] == name):
                    acc = cell(index, model, m["name"], m["variant"], ds, "accuracy", ci=ci)
                    ece = cell(index, model, m["name"], m["variant"], ds, "ece", ci=ci)
                    if acc[0] != MISSING or ece[0] != MISSING:
                        points.append((m.get(param), acc, ece))
                if len(points) < 2:
                    continue  # one point is no sweep
                points.sort(key=lambda p: (p[0] is None, p[0] or 0.0))
                label = ds.marked if len(models) == 1 else f"{model} {ds.marked}"
                label += f" ({name})" if len(swept) > 1 else ""
                for i, (value, acc, ece) in enumerate(points):
                    rows.append((label if i == 0 else "", "default" if value is None else f"{value:g}", acc[0], ece[0]))
                    tips.append(("", "", acc[1], ece[1]))
    if not rows:
        return None
    return Table(key, title, ("Dataset", symbol, "Acc (↑)", "ECE (↓)"), tuple(rows), tuple(tips))


def _analysis_table(root: Path, experiment: dict, models: list[str], kind: str) -> Table | None:
    """Table 2 (rollouts: share of decisions with p > threshold) or 3 (swap: flip rate); rows task, columns model."""
    key, title = {
        "rollouts": ("share_above", "Table 2: share of overconfident sampled decisions (p > {t})"),
        "swap": ("flip_rate", "Table 3: share of predictions that flip after swapping the reasoning"),
    }[kind]
    labels = {t["task"]: t.get("label") or t["task"] for t in experiment["config"]["train_tasks"]}
    cells: dict[tuple[str, str], dict] = {}
    for step in experiment["steps"]:
        info = step["info"]
        summary = root / step["id"] / "summary.json"
        if step["kind"] == "analyze" and info.get("analysis") == kind and (root / step["id"] / "DONE").is_file():
            cells[(f"{labels.get(info['task'], info['task'])} ({info['split']}), {info['method']}", info["model"])] = read_json(summary)
    if not cells:
        return None
    threshold = next(iter(cells.values())).get("threshold", 0.99)
    row_names = list(dict.fromkeys(r for r, _ in cells))
    rows = tuple((r, *(percent(cells[(r, m)].get(key)) if (r, m) in cells else MISSING for m in models)) for r in row_names)
    tips = tuple(("", *(f"n={cells[(r, m)].get('n_rollouts', cells[(r, m)].get('n_swapped', ''))}" if (r, m) in cells else "" for m in models)) for r in row_names)
    return Table(f"table{2 if kind == 'rollouts' else 3}", title.format(t=threshold), ("Dataset", *models), rows, tips)


def build_tables(experiment_dir: str | Path, *, ci: bool = False) -> tuple[list[Table], list[str]]:
    """The paper's tables for an experiment folder, and notes on the tables that could not be made.

    Args:
        experiment_dir: A folder written by `decal run` (holds results.csv and experiment.json).
        ci: Put the bootstrap interval in each cell's text as well as in its tooltip.

    Returns:
        (tables, notes).
    """
    root = Path(experiment_dir)
    experiment = read_json(root / EXPERIMENT_FILE)
    index = ResultIndex(read_results(root / RESULTS_FILE))
    models = [m["name"] for m in experiment["config"]["models"]]
    datasets = datasets_of(experiment)
    main = [m for m in experiment["methods"] if not m["variant"]]
    acc_ece = (("accuracy", "Acc (↑)"), ("ece", "ECE (↓)"))
    table1_methods = [m for m in main if m["method"] != "cal-grpo"]
    candidates = [
        ("table1", lambda: _metric_table("table1", "Table 1: accuracy and ECE (%) of base, SFT and GRPO models", acc_ece, models, table1_methods, datasets, index, ci=ci)),
        ("table4", lambda: _metric_table("table4", "Table 4: accuracy and ECE (%) with the calibration-aware method (Ours)", acc_ece, models, main, datasets, index, ci=ci) if any(m["method"] == "cal-grpo" for m in main) else None),
        ("table5", lambda: _posthoc_table(models, main, datasets, index, ci=ci)),
        ("table6", lambda: _metric_table("table6", "Table 6: SCE and MCE (%)", (("sce", "SCE (↓)"), ("mce", "MCE (↓)")), models, main, datasets, index, ci=ci)),
        ("table7", lambda: _metric_table("table7", "Table 7: AUROC (%) for selective prediction", (("auroc", "AUROC (↑)"),), models, main, datasets, index, ci=ci)),
        ("table2", lambda: _analysis_table(root, experiment, models, "rollouts")),
        ("table3", lambda: _analysis_table(root, experiment, models, "swap")),
        ("table8", lambda: _sweep_table("table8", "Table 8: sensitivity to the calibration weight λ", "cal-grpo", "cal_lambda", "λ", experiment, models, datasets, index, ci=ci)),
        ("table9", lambda: _sweep_table("table9", "Table 9: effect of the KL coefficient β in GRPO", "grpo", "beta", "β", experiment, models, datasets, index, ci=ci)),
        ("tableL", lambda: _metric_table("tableL", "Table L: label mass (%): the options' summed full-vocabulary probability at the decision position (mean; share of records below 50 %)", (("mean_label_mass", "Label mass"), ("low_label_mass_share", "< 50 %")), models, experiment["methods"], datasets, index, ci=ci)),
    ]
    why = {
        "table1": "no base/SFT/GRPO evaluations", "table4": "no calibration-aware GRPO evaluations",
        "table5": "no post-hoc calibrators were run", "table6": "no SCE/MCE metrics", "table7": "no AUROC metrics",
        "table2": "no rollout analysis was run", "table3": "no reasoning-swap analysis was run", "table8": "no λ sweep", "table9": "no β sweep",
        "tableL": "no label-mass metrics (the runs' metrics.json predate them; rerun `decal metrics`)",
    }
    tables, notes = [], []
    for key, make in candidates:
        table = make()
        if table is None:
            notes.append(f"{key.replace('table', 'Table ')} omitted: {why[key]}.")
        else:
            tables.append(table)
    tables += _truth_tables(models, experiment, datasets, index, ci=ci)
    return headline_tables(root, experiment, index, models, datasets) + tables, notes


def _truth_tables(models, experiment, datasets, index, *, ci) -> list[Table]:
    """T1 and T2, only when some run's records carry the true probabilities (a `tce` result)."""
    if not any(key[-1] == "tce" for key in index.keys()):
        return []
    truth = (("accuracy", "Acc (↑)"), ("ece", "ECE (↓)"), ("tce", "TCE (↓)"), ("mean_overconfidence", "Over"),
             ("mean_confidence", "Conf"), ("bayes_accuracy", "Bayes acc"))
    title = ("Table T1: against the known truth (%): TCE = mean |confidence - true P(prediction)|, "
             "Over = mean (confidence - true P(prediction)), Bayes acc = mean max true P")
    out = [_metric_table("tableT1", title, truth, models, experiment["methods"], datasets, index, ci=ci)]
    main = [m for m in experiment["methods"] if not m["variant"]]
    out.append(_posthoc_table(models, main, datasets, index, ci=ci, metric="tce", key="tableT2",
                              title="Table T2: true calibration error after post-hoc calibration"))
    return [t for t in out if t is not None]


# --- figures -------------------------------------------------------------------------------


def _figure_runs(root: Path, experiment: dict, model: str) -> dict[tuple[str, str], Path]:
    """(method label, dataset label) -> run folder of the model's main evaluations."""
    rows = read_results(root / RESULTS_FILE)
    labels = {m["name"]: method_label(m) for m in experiment["methods"] if not m["variant"]}
    runs = {}
    for ds in datasets_of(experiment):
        for name, label in labels.items():
            for r in rows:
                if (r["model"], r["method"], r["variant"], r["train_task"], r["eval_task"], r["eval_split"], r["calibrator"]) == (
                    model, name, "", ds.train_task, ds.task, ds.split, "none"
                ):
                    runs[(label, ds.marked)] = root / r["run_dir"]
                    break
    return runs


def make_figures(experiment_dir: str | Path, *, n_bins: int | None = None) -> tuple[list[tuple[str, Path]], list[str]]:
    """Figure 1/4: one grid of reliability diagrams (rows: methods, columns: datasets) per model; first, where
    the records carry the truth, the reliability diagrams against it (`decal.experiments.headline`).

    Returns:
        ([(caption, png path)], notes); the PNG and SVG files go to `<experiment>/figures/`.
    """
    root = Path(experiment_dir)
    try:
        from ..plots import plot_grid
        from ..records import read_records
    except ImportError as e:  # plots need matplotlib, a core dependency; this guards a broken install
        return [], [f"Figures skipped: {e}."]
    experiment = read_json(root / EXPERIMENT_FILE)
    if n_bins is None:
        n_bins = experiment["config"]["metrics"]["n_bins"]
    figures, notes = [], []
    for i, model in enumerate(m["name"] for m in experiment["config"]["models"]):
        runs = _figure_runs(root, experiment, model)
        if not runs:
            notes.append(f"No reliability diagrams for {model}: no finished evaluation.")
            continue
        records = {key: read_records(folder) for key, folder in runs.items()}
        path = root / "figures" / f"reliability-{safe_name(model)}"
        path.parent.mkdir(parents=True, exist_ok=True)
        plot_grid(records, path, n_bins=n_bins, title=f"Reliability diagrams and confidence histograms: {model}")
        caption = f"Figure {'1' if i == 0 else '4'}: reliability diagrams and confidence distributions of {model}"
        figures.append((caption, path.with_suffix(".png")))
    index = ResultIndex(read_results(root / RESULTS_FILE))
    models = [m["name"] for m in experiment["config"]["models"]]
    return truth_figures(root, experiment, index, models, datasets_of(experiment), n_bins=n_bins) + figures, notes


# --- rendering -----------------------------------------------------------------------------


_OPENING = ("summary", "conditions")  # headline table keys: the report opens with them, then the truth figures


def _blocks(tables: list[Table], figures) -> list:
    """Tables and (caption, png) figures in report order: the opening table, the truth figures, the rest."""
    opening = [t for t in tables if t.key in _OPENING]
    truth = [f for f in figures if Path(f[1]).name.startswith("truth-")] if opening else []
    rest = [t for t in tables if t.key not in _OPENING] + [f for f in figures if f not in truth]
    return opening + truth + rest


def _markdown(title: str, description: str, tables: list[Table], figures, notes: list[str], folder: Path) -> str:
    lines = [f"# {title}", ""]
    if description:
        lines += [description, ""]
    lines += ["Values in %. † in-domain, * out-of-domain; – not run; n/a undefined (AUROC when every "
              "prediction is right, or every one wrong).", ""]
    for block in _blocks(tables, figures):
        if isinstance(block, Table):
            t = block
            lines += [f"## {t.title}", "", "| " + " | ".join(t.header) + " |", "|" + "|".join(" --- " for _ in t.header) + "|"]
            lines += ["| " + " | ".join(row) + " |" for row in t.rows]
            lines.append("")
        else:
            caption, png = block
            lines += [f"## {caption}", "", f"![{caption}]({Path(os.path.relpath(png, folder)).as_posix()})", ""]
    if notes:
        lines += ["## Not in this report", ""] + [f"- {n}" for n in notes] + [""]
    return "\n".join(lines)


_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:0.5em 0 1.5em}th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}
th{background:#f3f3f3}td:first-child,td:nth-child(2){text-align:left}td[title]:hover{background:#fff7d6}
img{max-width:100%;border:1px solid #eee}.note{color:#555}
"""


def _html(title: str, description: str, tables: list[Table], figures, notes: list[str]) -> str:
    esc = html.escape
    parts = [f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{esc(title)}</title><style>{_CSS}</style></head><body>"]
    parts.append(f"<h1>{esc(title)}</h1>")
    if description:
        parts.append(f"<p>{esc(description)}</p>")
    parts.append("<p class='note'>Values in %. † in-domain, * out-of-domain; – not run; n/a undefined (AUROC when every prediction is right, or every one wrong). Hover a cell for n and its 95% bootstrap interval.</p>")
    for block in _blocks(tables, figures):
        if not isinstance(block, Table):
            caption, png = block
            data = base64.b64encode(png.read_bytes()).decode("ascii")
            parts.append(f"<h2>{esc(caption)}</h2><img alt='{esc(caption)}' src='data:image/png;base64,{data}'>")
            continue
        t = block
        parts.append(f"<h2>{esc(t.title)}</h2><table><thead><tr>{''.join(f'<th>{esc(h)}</th>' for h in t.header)}</tr></thead><tbody>")
        for row, tips in zip(t.rows, t.tips):
            cells = "".join(f"<td title='{esc(tip)}'>{esc(c)}</td>" if tip else f"<td>{esc(c)}</td>" for c, tip in zip(row, tips))
            parts.append(f"<tr>{cells}</tr>")
        parts.append("</tbody></table>")
    if notes:
        parts.append("<h2>Not in this report</h2><ul>" + "".join(f"<li>{esc(n)}</li>" for n in notes) + "</ul>")
    parts.append("</body></html>")
    return "\n".join(parts)


def write_report(
    experiment_dir: str | Path,
    *,
    format: Literal["md", "html"] = "md",
    out: str | Path | None = None,
    ci: bool = False,
    figures: bool = True,
) -> Path:
    """Write the paper-style report of an experiment folder.

    Args:
        experiment_dir: A folder written by `decal run`.
        format: `md` (Markdown, figures as files beside it) or `html` (one self-contained file,
            figures embedded as base64 PNG, readable offline).
        out: Output file (default: `<experiment>/report.<format>`).
        ci: Also print the bootstrap intervals in the table cells.
        figures: Draw the reliability grids (reads every main run's predictions).

    Returns:
        The path of the written report.

    Raises:
        FileNotFoundError: the folder has no results.csv / experiment.json yet.
    """
    root = Path(experiment_dir).resolve()
    if not (root / EXPERIMENT_FILE).is_file():
        raise FileNotFoundError(f"{root}: not an experiment folder (no {EXPERIMENT_FILE}); run `decal run CONFIG` first")
    experiment = read_json(root / EXPERIMENT_FILE)
    tables, notes = build_tables(root, ci=ci)
    figs, fig_notes = make_figures(root) if figures else ([], [])
    notes = notes + fig_notes
    title = f"decal report: {experiment['config']['name']}"
    description = experiment["config"].get("description", "")
    path = Path(out) if out is not None else root / f"report.{format}"
    if format == "md":
        text = _markdown(title, description, tables, figs, notes, path.resolve().parent)
    elif format == "html":
        text = _html(title, description, tables, figs, notes)
    else:
        raise ValueError(f"`format` must be 'md' or 'html'; got {format!r}")
    write_text_atomic(path, text)
    return path
