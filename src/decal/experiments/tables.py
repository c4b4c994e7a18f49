"""The pieces the report's tables share: the table type, the results index, datasets and labels.

`decal.experiments.report` builds the paper's tables from them and `decal.experiments.headline`
the report's opening (the summary with intervals, the two conditions side by side).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass

__all__ = ["METHOD_LABELS", "CALIBRATOR_LABELS", "MISSING", "UNDEFINED", "Table", "Dataset", "ResultIndex",
           "percent", "cell", "datasets_of", "method_label"]

METHOD_LABELS = {"base": "Base", "sft": "SFT", "grpo": "GRPO", "cal-grpo": "Ours"}
CALIBRATOR_LABELS = {"none": "None", "isotonic": "Isotonic", "platt": "Platt", "temperature": "Temperature"}
MISSING = "–"  # not run
UNDEFINED = "n/a"  # run, but the metric has no value (AUROC with one outcome only)


@dataclass(frozen=True)
class Table:
    """A rendered-agnostic table: header row, body rows of cells, and per-cell tooltips."""

    key: str
    title: str
    header: tuple[str, ...]
    rows: tuple[tuple[str, ...], ...]
    tips: tuple[tuple[str, ...], ...]


@dataclass(frozen=True)
class Dataset:
    train_task: str
    task: str
    split: str
    domain: str
    label: str

    @property
    def marked(self) -> str:
        return f"{self.label} {'†' if self.domain == 'in' else '*'}"


class ResultIndex:
    """Lookup of result rows by cell, averaging over seeds."""

    def __init__(self, rows: list[dict]):
        self._cells: dict[tuple, list[dict]] = {}
        for r in rows:
            key = (r["model"], r["method"], r["variant"], r["train_task"], r["eval_task"], r["eval_split"], r["calibrator"], r["metric"])
            self._cells.setdefault(key, []).append(r)

    def keys(self):
        """The cells' keys: (model, method, variant, train_task, eval_task, eval_split, calibrator, metric)."""
        return self._cells.keys()

    def rows(self, model, method, variant, ds: "Dataset", metric, calibrator="none") -> list[dict]:
        """The result rows of one cell (one per seed; empty when not run)."""
        return self._cells.get((model, method, variant, ds.train_task, ds.task, ds.split, calibrator, metric), [])

    def get(self, model, method, variant, ds: Dataset, metric, calibrator="none") -> tuple[float | None, str]:
        rows = self._cells.get((model, method, variant, ds.train_task, ds.task, ds.split, calibrator, metric))
        if not rows:
            return None, ""
        values = [r["value"] for r in rows if r["value"] is not None and not math.isnan(r["value"])]
        if not values:
            return float("nan"), ""
        tip = f"n={rows[0]['n']}"
        if len(rows) == 1 and rows[0]["ci_low"] is not None:
            tip += f", 95% CI [{100 * rows[0]['ci_low']:.2f}, {100 * rows[0]['ci_high']:.2f}]"
        elif len(rows) > 1:
            tip += f", mean of {len(rows)} seeds"
        return statistics.fmean(values), tip


def percent(value: float | None) -> str:
    if value is None:
        return MISSING
    return UNDEFINED if math.isnan(value) else f"{100 * value:.2f}"


def cell(index: ResultIndex, *args, ci: bool, **kwargs) -> tuple[str, str]:
    value, tip = index.get(*args, **kwargs)
    text = percent(value)
    if ci and "CI" in tip:
        text += " " + tip[tip.index("[") :]
    return text, tip


def datasets_of(experiment: dict) -> list[Dataset]:
    out = []
    for t in experiment["config"]["train_tasks"]:
        for e in t["evaluations"]:
            out.append(Dataset(t["task"], e["task"], e["split"], e["domain"], e.get("label") or e["task"]))
    return out


def method_label(meth: dict) -> str:
    label = METHOD_LABELS.get(meth["method"], meth["name"])
    label = label if meth["name"] in (meth["method"], label.lower()) else f"{label} ({meth['name']})"
    return f"{label} [{meth['variant']}]" if meth.get("variant") else label
