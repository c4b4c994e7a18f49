"""The results table: every metric of every evaluation (and calibrated evaluation) with its interval.

`results.csv` in the experiment folder has one row per (run, metric) with the columns
`RESULT_COLUMNS`. It is rebuilt from the finished steps' `metrics.json` files (the shape
`decal metrics` writes) and written atomically, so a crash never leaves half a table. Where a
calibrator held part of its fit run out, the uncalibrated metrics of that part are added with
calibrator `none (held-out)`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import warnings
from pathlib import Path
from typing import Iterable

from .._io import read_json, write_text_atomic
from ..errors import DataError
from .plan import Step

__all__ = ["RESULT_COLUMNS", "collect_results", "write_results", "read_results", "RESULTS_FILE", "HELD_OUT_UNCALIBRATED"]

RESULTS_FILE = "results.csv"
RESULT_COLUMNS = (
    "experiment",
    "model",
    "method",
    "variant",
    "train_task",
    "eval_task",
    "eval_split",
    "domain",
    "calibrator",
    "seed",
    "metric",
    "value",
    "ci_low",
    "ci_high",
    "n",
    "run_dir",
)


HELD_OUT_UNCALIBRATED = "none (held-out)"


def _metric_rows(metrics_path: Path, common: dict, report: dict | None = None) -> list[dict]:
    report = read_json(metrics_path) if report is None else report
    if not isinstance(report, dict) or not isinstance(report.get("metrics"), dict):
        raise DataError("expected an object with a `metrics` mapping", path=metrics_path)
    rows = []
    for name, entry in report["metrics"].items():
        if isinstance(entry, dict):
            value, low, high = entry.get("value"), entry.get("ci_low"), entry.get("ci_high")
        else:  # a bare number (no bootstrap)
            value, low, high = entry, None, None
        rows.append({**common, "metric": name, "value": value, "ci_low": low, "ci_high": high, "n": report.get("n")})
    return rows


def _first_record(run_dir: Path) -> dict:
    with (run_dir / "predictions.jsonl").open(encoding="utf-8") as f:
        for line in f:
            if line.strip():
                return json.loads(line)
    raise DataError("no prediction records", path=run_dir / "predictions.jsonl")


HELD_OUT_CACHE = "uncalibrated-metrics.json"


def _held_out_uncalibrated(root: Path, sub: Path, fit_run: str) -> dict:
    """The uncalibrated metrics of the records a calibrator held out of its fit run, with the
    calibrated run's metric settings: Table 5 compares calibrators with "None" on the same examples.

    The results table is rebuilt after every step, so the bootstrap is computed once and kept in
    `sub/uncalibrated-metrics.json`, keyed by the settings and both prediction files' size and mtime.
    """
    from .._io import write_json_atomic
    from ..metrics import metrics_report
    from ..records import read_records

    settings = read_json(sub / "metrics.json")
    key = {name: settings[name] for name in ("n_bins", "binning", "bootstrap", "seed", "level")}
    for name, path in (("held_out", sub / "predictions.jsonl"), ("fit_run", root / fit_run / "predictions.jsonl")):
        stat = path.stat()
        key[name] = [stat.st_size, stat.st_mtime_ns]
    cache = sub / HELD_OUT_CACHE
    if cache.is_file():
        cached = read_json(cache)
        if isinstance(cached, dict) and cached.get("key") == key:
            return cached["report"]
    held_out = {r.id for r in read_records(sub)}
    records = [r for r in read_records(root / fit_run) if r.id in held_out]
    if len(records) != len(held_out):
        raise DataError(f"{len(held_out) - len(records)} held-out records are missing from the fit run {root / fit_run}", path=sub / "predictions.jsonl")
    with warnings.catch_warnings():  # an undefined AUROC was already reported by `decal metrics` on this run
        warnings.simplefilter("ignore", UserWarning)
        report = metrics_report(records, n_bins=settings["n_bins"], binning=settings["binning"],
                                n_resamples=settings["bootstrap"], seed=settings["seed"], level=settings["level"])
    write_json_atomic(cache, {"key": key, "report": report})
    return report


def _step_rows(experiment: str, root: Path, step: Step, seen_held_out: set) -> list[dict]:
    info = step.info
    common = {
        "experiment": experiment,
        "model": info["model"],
        "method": info["method"],
        "variant": info.get("variant", ""),
        "train_task": info["train_task"],
        "seed": info.get("seed", 0),
    }
    folder = root / step.id
    if step.kind == "evaluate":
        common.update(eval_task=info["eval_task"], eval_split=info["eval_split"], domain=info["domain"], calibrator="none")
        common["run_dir"] = step.id
        return _metric_rows(folder / "metrics.json", common)
    rows = []
    # A calibrate step holds one folder per calibrated run; its records name their task and split.
    for sub in sorted(p for p in folder.iterdir() if (p / "metrics.json").is_file()):
        first = _first_record(sub)
        eval_task, domain = _match_evaluation(first["task"], first["split"], info)
        sub_common = {
            **common,
            "eval_task": eval_task,
            "eval_split": first["split"],
            "domain": domain,
            "calibrator": info["calibrator"],
            "run_dir": f"{step.id}/{sub.name}",
        }
        rows += _metric_rows(sub / "metrics.json", sub_common)
        calibration = read_json(sub / "run.json").get("calibration", {}) if (sub / "run.json").is_file() else {}
        held_out_key = (info.get("fit_run"), calibration.get("fit_fraction"), calibration.get("seed"))
        if calibration.get("subset") == "held-out" and info.get("fit_run") and held_out_key not in seen_held_out:
            # Once per fit run and split: every calibrator fitted on the same split shares it.
            seen_held_out.add(held_out_key)
            report = _held_out_uncalibrated(root, sub, info["fit_run"])
            rows += _metric_rows(sub / "metrics.json", {**sub_common, "calibrator": HELD_OUT_UNCALIBRATED}, report)
    return rows


def _match_evaluation(task: str, split: str, info: dict) -> tuple[str, str]:
    """The configured evaluation (task spec as written in the config, domain) of a calibrated run.

    Records carry the task's own name (`builtin`), the config may hold a spec
    (`builtin:difficulty=3`); the split and the name before `:` identify the evaluation.
    """
    for key, domain in info.get("domains", {}).items():
        spec, _, spec_split = key.rpartition("/")
        if spec_split == split and (spec == task or spec.split(":")[0] == task.split(":")[0]):
            return spec, domain
    return task, "in" if (task, split) == (info.get("fit_task"), info.get("fit_split")) else "ood"


def collect_results(experiment: str, root: str | Path, steps: Iterable[Step]) -> list[dict]:
    """Rows for every finished evaluate and calibrate step (those with a `DONE` marker)."""
    root = Path(root)
    rows: list[dict] = []
    seen_held_out: set = set()
    for step in steps:
        if step.kind in ("evaluate", "calibrate") and (root / step.id / "DONE").is_file():
            rows += _step_rows(experiment, root, step, seen_held_out)
    return rows


def _fmt(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return "nan" if math.isnan(value) else repr(value)
    return str(value)


def write_results(path: str | Path, rows: list[dict]) -> None:
    """Write the results table atomically (CSV, columns `RESULT_COLUMNS`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=RESULT_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: _fmt(row.get(k)) for k in RESULT_COLUMNS})
    write_text_atomic(path, buf.getvalue())


def _parse_float(text: str) -> float | None:
    return None if text == "" else float(text)


def read_results(path: str | Path) -> list[dict]:
    """Read `results.csv` back; numbers become floats (`None` where empty), `seed` and `n` ints.

    Raises:
        FileNotFoundError: no table yet.
        DataError: a missing column or a malformed number (names the file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no results table; run `decal run CONFIG` first")
    with path.open(encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        missing = [c for c in RESULT_COLUMNS if c not in (reader.fieldnames or [])]
        if missing:
            raise DataError(f"missing column(s) {', '.join(missing)}", path=path, line=1)
        rows = []
        for lineno, row in enumerate(reader, start=2):
            try:
                for key in ("value", "ci_low", "ci_high"):
                    row[key] = _parse_float(row[key])
                row["seed"] = int(row["seed"]) if row["seed"] else 0
                row["n"] = int(row["n"]) if row["n"] else None
            except ValueError as e:
                raise DataError(f"malformed number ({e})", path=path, line=lineno) from e
            rows.append(row)
    return rows
