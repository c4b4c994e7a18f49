"""`decal conformal`: split-conformal option sets fitted on one run, written into copies of runs.

`decal.conformal` holds the method. With ``--fit-fraction f`` the sets are fitted on a seeded
random fraction of the run and the rest is written too (as `decal calibrate` does), so coverage
is measured on examples the quantile never saw. Each applied run goes to
``OUT/<name>/predictions.jsonl`` (every record with its ``option_set``) with the source's
``run.json`` plus a ``conformal`` entry; the sets go to ``OUT/conformal.json`` (for `decal serve
--conformal`) and coverage and set sizes to ``OUT/summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "conformal_runs"]

EPILOG = """Examples:

  decal conformal runs/ours/csqa-val --alpha 0.1 --apply runs/ours/csqa-test runs/ours/obqa --out sets/lac

  decal conformal cal/platt/moderation --alpha 0.05 --score aps --mondrian --fit-fraction 0.5 --apply cal/platt/xstest --out sets/aps

Then `decal metrics sets/lac/csqa-test` shows coverage and mean set size (per class too), and
`decal serve --conformal sets/lac/conformal.json` answers alone only when a set holds one label.
"""


def _set_summary(records) -> dict:
    from ..metrics import summarize

    s = summarize(records)
    return {k: v for k, v in s.items() if k == "n" or k.startswith(("set_coverage", "mean_set_size", "singleton_share"))}


def conformal_runs(fit_dir: Path, *, alpha: float, score: str = "lac", mondrian: bool = False, apply_dirs: list[Path] = (),
                   out: Path, fit_fraction: float | None = None, seed: int = 0) -> dict:
    """Fit `ConformalSets` on `fit_dir` (or a fraction of it) and write copies of runs with option sets.

    Every run is read and every set computed before anything is written (no partial output).

    Returns:
        ``{"conformal": the conformal file, "runs": [{"name", "source", "subset", "n", "set_coverage", ...}]}``.
    """
    from .._io import write_json_atomic
    from ..conformal import ConformalSets, apply_conformal, save_conformal
    from ..metrics import input_scales
    from ..records import read_records, records_to_arrays
    from .calibrate import make_out, run_meta, run_names, split_fit, write_run

    fit_dir, out = Path(fit_dir), Path(out)
    fit_part, rest = split_fit(read_records(fit_dir), fit_fraction, seed)
    arrays = records_to_arrays(fit_part)
    scale = input_scales(calibrated=arrays.calibrated)["class_probs"]
    sets = ConformalSets(alpha, score=score, mondrian=mondrian).fit(arrays.class_probs, arrays.label_index)
    # With no run to apply the sets to, only conformal.json is written (for `decal serve --conformal`).
    sources = ([(fit_dir, rest, "held-out")] if rest else []) + [(Path(p), None, "all") for p in apply_dirs]
    info = {"fit_run": str(fit_dir), "fit_fraction": fit_fraction, "seed": seed, "n_fit": len(fit_part),
            "conformal": str(out / "conformal.json")}
    pending, runs = [], []
    for name, (source, records, subset) in zip(run_names([s[0] for s in sources]), sources):
        records = read_records(source) if records is None else records
        with_sets = apply_conformal(sets, records, labels=arrays.labels, scale=scale)
        pending.append((out / name, run_meta(source), with_sets, {**info, "source_run": str(source), "subset": subset}))
        runs.append({"name": name, "source": str(source), "subset": subset, **_set_summary(with_sets)})
    make_out(out)
    for folder, meta, records, entry in pending:
        write_run(folder, meta, records, entry, key="conformal")
    save_conformal(out / "conformal.json", sets, labels=arrays.labels, scale=scale, calibration_run=str(fit_dir),
                   fit_fraction=fit_fraction, seed=seed)
    summary = {"conformal": sets.to_dict(labels=arrays.labels, scale=scale), "runs": runs}
    write_json_atomic(out / "summary.json", summary)
    return summary


def _table(summary: dict):
    from rich.table import Table

    c = summary["conformal"]
    q = ", ".join(f"{lab} {'inf' if v is None else f'{v:.4g}'}" for lab, v in c["quantiles"].items())
    kind = "class-conditional" if c["mondrian"] else "marginal"
    table = Table(title=f"{c['score']} sets, alpha {c['alpha']:g} ({kind}), fitted on {c['n_calibration']} records; quantiles: {q}")
    labels = c["labels"]
    columns = ["run", "subset", "n", "coverage %", "mean size", "one label %", *[f"coverage[{lab}] %" for lab in labels]]
    for col in columns:
        table.add_column(col, justify="left" if col in ("run", "subset") else "right")
    for r in summary["runs"]:
        per_class = [f"{100 * r[f'set_coverage[{lab}]']:.2f}" if r[f"set_coverage[{lab}]"] == r[f"set_coverage[{lab}]"] else "–"
                     for lab in labels]
        table.add_row(r["name"], r["subset"], str(r["n"]), f"{100 * r['set_coverage']:.2f}", f"{r['mean_set_size']:.3f}",
                      f"{100 * r['singleton_share']:.2f}", *per_class)
    return table


def register(app: typer.Typer) -> None:
    @app.command("conformal", epilog=EPILOG)
    def conformal_command(
        fit: Path = typer.Argument(..., metavar="RUN_DIR", help="Run (a calibration split) the sets' quantile is fitted on."),
        alpha: float = typer.Option(0.1, "--alpha", metavar="A", help="Miscoverage: sets hold the gold label with probability >= 1 - A."),
        score: str = typer.Option("lac", "--score", metavar="lac|aps", help="Nonconformity score: lac (1 - p, smallest sets) or aps (cumulative, adaptive)."),
        mondrian: bool = typer.Option(False, "--mondrian", help="One quantile per gold label: coverage >= 1 - A for every label."),
        fit_fraction: Optional[float] = typer.Option(None, "--fit-fraction", metavar="F", help="Fit on this random fraction of RUN_DIR and write the rest with its sets."),
        seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the --fit-fraction split."),
        apply: Optional[list[Path]] = typer.Option(None, "--apply", metavar="RUN_DIR...", help="Runs to write with their option sets (several may follow one --apply)."),
        more: Optional[list[Path]] = typer.Argument(None, metavar="[RUN_DIR...]", hidden=True),
        out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder: conformal.json, summary.json, one folder per run."),
    ) -> None:
        """Split-conformal option sets on the decision-token probabilities, written into copies of runs."""
        from ._console import console as rich_console

        summary = conformal_runs(fit, alpha=alpha, score=score, mondrian=mondrian, apply_dirs=[*(apply or []), *(more or [])],
                                 out=out, fit_fraction=fit_fraction, seed=seed)
        rich_console().print(_table(summary))
        typer.echo(f"conformal: {out / 'conformal.json'}")
