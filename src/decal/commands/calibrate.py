"""`decal calibrate`: fit a post-hoc calibrator on one run and write calibrated copies of runs.

The paper's setup (Appendix B.1): fit on part of OpenAI Moderation, evaluate on the rest and on
XSTest. ``--fit-feedback STATE_DIR`` fits on the labelled decisions of a `decal serve` decision log
instead (`decal.serve.decision_log.feedback_records`); they are written as the run
``OUT/feedback`` (the held-out part with ``--fit-fraction``), which `decal threshold` takes. With ``--fit-fraction f`` the calibrator is fitted on a seeded random fraction ``f`` of
the fit run, and the other ``1 - f`` of it is written as a calibrated run too, so "the rest" is
evaluated like any other run. Each calibrated run goes to ``OUT/<name>/predictions.jsonl`` with a
``run.json`` (the source's, plus a ``calibration`` entry); the calibrator goes to
``OUT/calibrator.json`` and a before/after summary to ``OUT/summary.json``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

__all__ = ["register", "calibrate_runs", "run_names", "split_fit", "run_meta", "write_run", "make_out"]

EPILOG = """Examples:

  decal calibrate --method isotonic --fit runs/grpo/moderation --fit-fraction 0.5 --seed 0 --apply runs/grpo/xstest --out runs/grpo/calibrate/isotonic

  decal calibrate --method platt --fit runs/ours/moderation --fit-fraction 0.3 --apply runs/ours/xstest runs/ours/csqa --out cal/platt

  decal calibrate --calibrator cal/platt/calibrator.json --apply runs/ours/obqa --out cal/platt-obqa

  decal calibrate --method platt --fit-feedback state --fit-fraction 0.5 --out cal/feedback
  decal threshold cal/feedback/feedback --target-accuracy 0.9 --out threshold-feedback.json
"""


def run_names(paths: list[Path]) -> list[str]:
    """One folder name per run: the shortest tail of its path that tells the runs apart.

    >>> run_names([Path("a/grpo/xstest"), Path("b/ours/xstest"), Path("a/grpo/moderation")])
    ['grpo--xstest', 'ours--xstest', 'moderation']
    """
    from .._io import safe_name

    resolved = [p.resolve() for p in paths]
    if len(set(resolved)) != len(resolved):
        dup = next(p for p in paths if resolved.count(p.resolve()) > 1)
        raise ValueError(f"run {dup} is given twice (as --fit with --fit-fraction and in --apply, or twice in --apply)")
    names = []
    for p in resolved:
        depth = 1
        while True:
            tail = "/".join(p.parts[-depth:])
            others = ["/".join(q.parts[-depth:]) for q in resolved if q != p]
            if tail not in others or depth >= len(p.parts):
                break
            depth += 1
        names.append(safe_name(tail))
    return names


def split_fit(records: list, fraction: float | None, seed: int) -> tuple[list, list]:
    """(fit part, held-out rest) of a run; the rest keeps the file order."""
    import numpy as np

    if fraction is None or fraction == 1.0:
        return records, []
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"`--fit-fraction` must be in (0, 1]; got {fraction!r}")
    n = len(records)
    n_fit = int(round(fraction * n))
    if n_fit < 1 or n_fit >= n:
        raise ValueError(f"`--fit-fraction` {fraction} of {n} records leaves {n_fit} to fit and {n - n_fit} to evaluate; both must be >= 1")
    chosen = np.zeros(n, dtype=bool)
    chosen[np.random.default_rng(seed).permutation(n)[:n_fit]] = True
    return [r for r, c in zip(records, chosen) if c], [r for r, c in zip(records, chosen) if not c]


def run_meta(source: Path) -> dict:
    from .._io import read_json

    meta = read_json(source / "run.json") if (source / "run.json").is_file() else {}
    return meta if isinstance(meta, dict) else {"source_run_json": meta}


def write_run(out_dir: Path, meta: dict, records: list, entry: dict, *, key: str = "calibration") -> None:
    """A derived run folder: its records and the source's run.json plus an entry saying how it was derived."""
    from .._io import write_json_atomic, write_text_atomic

    write_text_atomic(out_dir / "predictions.jsonl", "".join(r.to_json() + "\n" for r in records))
    write_json_atomic(out_dir / "run.json", {**meta, key: entry})


def make_out(out: Path) -> None:
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a parent is a file, or a read-only file system
        raise ValueError(f"cannot create the output folder {out}: {e.strerror or e}") from e


def calibrate_runs(
    method: str | None, fit_dir: Path | None, *, apply_dirs: list[Path], out: Path, fit_fraction: float | None = None,
    seed: int = 0, calibrator_file: Path | None = None, fit_records: list | None = None, fit_meta: dict | None = None,
) -> dict:
    """Fit `method` on `fit_dir` (or a fraction of it), or load `calibrator_file`, and write calibrated copies to `out`.

    Every input is read and every run calibrated before anything is written, so a bad run or
    calibrator file leaves no partial output (issue #9). With `fit_records` (a decision log's
    labelled decisions; `fit_dir` is then its state dir) the calibrator is fitted on them and
    they are written as the run ``feedback`` (the held-out part with `fit_fraction`, else all),
    with `fit_meta` as its run.json.

    Returns:
        ``{"calibrator": to_dict, "n_fit": int, "runs": [{"name", "source", "subset", "before",
        "after"}]}`` where before/after are `decal.metrics.summarize` dicts; `n_fit` is None for
        a loaded calibrator.
    """
    from .._io import write_json_atomic
    from ..calibrators import apply_calibrator, fit_calibrator, load_calibrator, make_calibrator
    from ..metrics import summarize
    from ..records import read_records

    out = Path(out)
    if calibrator_file is not None:
        calibrator, fit_part, rest = load_calibrator(calibrator_file), None, []
    else:
        calibrator, fit_dir = make_calibrator(method), Path(fit_dir)
        fit_part, rest = split_fit(read_records(fit_dir) if fit_records is None else fit_records, fit_fraction, seed)
        fit_calibrator(calibrator, fit_part)
    n_fit = None if fit_part is None else len(fit_part)
    if fit_records is not None:  # the labelled decisions are the run `decal threshold` picks a threshold on
        sources = [(fit_dir / "feedback", rest or fit_part, "held-out" if rest else "fit")]
    else:
        sources = [(fit_dir, rest, "held-out")] if rest else []
    sources += [(Path(p), None, "all") for p in apply_dirs]
    names = run_names([s[0] for s in sources])
    info = {"method": calibrator.name, "fit_run": None if fit_dir is None else str(fit_dir),
            "fit_fraction": fit_fraction, "seed": seed, "n_fit": n_fit, "calibrator": str(out / "calibrator.json"),
            "loaded_from": None if calibrator_file is None else str(calibrator_file)}
    summary = {"calibrator": calibrator.to_dict(), "n_fit": n_fit, "runs": []}
    pending = []
    for name, (source, records, subset) in zip(names, sources):
        records = read_records(source) if records is None else records
        calibrated = apply_calibrator(calibrator, records)
        meta = fit_meta if fit_records is not None and subset != "all" else run_meta(source)
        pending.append((out / name, meta, calibrated, {**info, "source_run": str(source), "subset": subset}))
        summary["runs"].append({"name": name, "source": str(source), "subset": subset,
                                "before": summarize(records), "after": summarize(calibrated)})
    make_out(out)
    for args in pending:
        write_run(*args)
    calibrator.save(out / "calibrator.json")
    write_json_atomic(out / "summary.json", summary)
    return summary


def _table(summary: dict):
    from rich.table import Table

    fitted = "loaded from file" if summary["n_fit"] is None else f"fitted on {summary['n_fit']} records"
    table = Table(title=f"{summary['calibrator']['method']} calibrator, {fitted} (%)")
    for col in ("run", "subset", "n", "accuracy", "ECE before", "ECE after", "Brier before", "Brier after"):
        table.add_column(col, justify="left" if col in ("run", "subset") else "right")
    for r in summary["runs"]:
        b, a = r["before"], r["after"]
        table.add_row(r["name"], r["subset"], str(b["n"]), f"{100 * b['accuracy']:.2f}", f"{100 * b['ece']:.2f}",
                      f"{100 * a['ece']:.2f}", f"{100 * b['brier']:.2f}", f"{100 * a['brier']:.2f}")
    return table


def register(app: typer.Typer) -> None:
    @app.command("calibrate", epilog=EPILOG)
    def calibrate_command(
        method: Optional[str] = typer.Option(None, "--method", metavar="platt|isotonic|temperature", help="Post-hoc calibrator (required unless --calibrator)."),
        fit: Optional[Path] = typer.Option(None, "--fit", metavar="RUN_DIR", help="Run whose predictions the calibrator is fitted on (required unless --calibrator or --fit-feedback)."),
        fit_feedback: Optional[Path] = typer.Option(None, "--fit-feedback", metavar="STATE_DIR", help="Fit on the labelled decisions of a decal serve decision log (its --state-dir); written as the run OUT/feedback."),
        calibrator_file: Optional[Path] = typer.Option(None, "--calibrator", metavar="FILE", help="Apply a saved calibrator.json instead of fitting one."),
        fit_fraction: Optional[float] = typer.Option(None, "--fit-fraction", metavar="F", help="Fit on this random fraction of --fit and write the rest as a calibrated run."),
        seed: int = typer.Option(0, "--seed", metavar="S", help="Seed of the --fit-fraction split."),
        apply: Optional[list[Path]] = typer.Option(None, "--apply", metavar="RUN_DIR...", help="Runs to calibrate (several may follow one --apply)."),
        more: Optional[list[Path]] = typer.Argument(None, metavar="[RUN_DIR...]", hidden=True),
        out: Path = typer.Option(..., "--out", metavar="DIR", help="Output folder: calibrator.json, summary.json, one folder per run."),
    ) -> None:
        """Fit a post-hoc calibrator on one run and write calibrated copies of runs."""
        from ._console import console as rich_console

        # `--apply a b c` puts b and c in the positional list; both spellings mean the same.
        apply_dirs = [*(apply or []), *(more or [])]
        fit_records = fit_meta = None
        if fit_feedback is not None:
            if fit is not None or calibrator_file is not None or method is None:
                raise typer.BadParameter("--fit-feedback takes --method, and neither --fit nor --calibrator", param_hint="--fit-feedback")
            from ..serve.decision_log import feedback_records

            fit_records, fit_meta = feedback_records(fit_feedback)
            fit = fit_feedback
            typer.echo(fit_meta["summary"])
        elif calibrator_file is not None:
            if method is not None or fit is not None or fit_fraction is not None:
                raise typer.BadParameter("give either --calibrator FILE or --method/--fit/--fit-fraction, not both", param_hint="--calibrator")
            if not apply_dirs:
                raise typer.BadParameter("nothing to calibrate: give --apply RUN_DIR...", param_hint="--apply")
        elif method is None or fit is None:
            raise typer.BadParameter("--method and --fit are required (or --calibrator FILE to apply a saved one)", param_hint="--method/--fit")
        elif fit_feedback is None and fit_fraction is None and not apply_dirs:
            raise typer.BadParameter("nothing to calibrate: give --apply RUN_DIR..., or --fit-fraction to evaluate on the rest of --fit", param_hint="--apply")
        summary = calibrate_runs(method, fit, apply_dirs=apply_dirs, out=out, fit_fraction=fit_fraction, seed=seed,
                                 calibrator_file=calibrator_file, fit_records=fit_records, fit_meta=fit_meta)
        rich_console().print(_table(summary))
        typer.echo(f"calibrator: {out / 'calibrator.json'}")
