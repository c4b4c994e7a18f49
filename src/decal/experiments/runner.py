"""Run an experiment plan step by step, resumably.

Each step runs its `decal` commands as subprocesses (`python -m decal ...`), which isolates
memory between steps and lets each command resume its own partial output. A step is done only
when its folder holds a `DONE` marker, written atomically after every command exited 0; a rerun
skips done steps and reruns unfinished ones. Every start, skip, finish and failure is appended
to `steps.jsonl` in the experiment folder, and `results.csv` is rewritten after each finished
evaluation, so an interrupted run leaves a valid table of what finished.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Literal, Sequence

from .._io import write_json_atomic, write_text_atomic
from ..errors import ConfigError, DecalError
from .config import ExperimentConfig
from .plan import Step, build_plan, select_steps
from .results import RESULTS_FILE, collect_results, write_results

__all__ = [
    "Executor",
    "StepFailedError",
    "StepStatus",
    "experiment_dir",
    "plan_status",
    "run_experiment",
    "subprocess_executor",
    "DONE",
    "STEP_LOG",
    "EXPERIMENT_FILE",
]

logger = logging.getLogger(__name__)

DONE = "DONE"
STEP_LOG = "steps.jsonl"
EXPERIMENT_FILE = "experiment.json"
LOCK_FILE = ".lock"

# Runs one `decal` argument list, appending its output to `log_path`; returns the exit code.
Executor = Callable[[Sequence[str], Path], int]
StepStatus = Literal["done", "stale", "partial", "pending"]


class StepFailedError(DecalError, RuntimeError):
    """A step's command exited non-zero; the message names the step and its log file."""


def _metrics_in_process(argv: Sequence[str], log_path: Path) -> int:
    """`decal metrics RUN_DIR --n-bins N --binning B --bootstrap R`, without a new interpreter.

    Metrics need no model and take a second; a subprocess would spend longer importing torch.
    """
    from ..run_metrics import run_metrics

    flags = dict(zip(argv[2::2], argv[3::2]))
    report = run_metrics(
        Path(argv[1]), n_bins=int(flags["--n-bins"]), binning=flags["--binning"], bootstrap=int(flags["--bootstrap"])
    )
    with log_path.open("a", encoding="utf-8") as log:
        log.write(f"\n$ decal {' '.join(argv)}  (in process)\nn={report['n']} " + " ".join(
            f"{k}={v['value']:.4f}" for k, v in report["metrics"].items() if k in ("accuracy", "ece") and v["value"] is not None
        ) + "\n")
    return 0


def subprocess_executor(argv: Sequence[str], log_path: Path) -> int:
    """Run `python -m decal <argv>` with stdout and stderr appended to `log_path`.

    `decal metrics` runs in this process instead (see `_metrics_in_process`).
    """
    log_path.parent.mkdir(parents=True, exist_ok=True)
    if argv and argv[0] == "metrics":
        return _metrics_in_process(argv, log_path)
    with log_path.open("ab") as log:
        log.write(f"\n$ decal {' '.join(argv)}\n".encode())
        log.flush()
        proc = subprocess.Popen([sys.executable, "-m", "decal", *argv], stdout=log, stderr=subprocess.STDOUT)
        try:
            return proc.wait()
        except BaseException:
            # Ctrl-C or a kill of the runner: stop the child too, so no orphan keeps training.
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
            raise


@contextlib.contextmanager
def _exclusive(root: Path):
    """Hold an exclusive lock on the experiment folder: two runners would redo each other's steps."""
    try:
        import fcntl
    except ImportError:  # no flock on this platform: run unlocked
        yield
        return
    with (root / LOCK_FILE).open("a+") as f:
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            f.seek(0)
            holder = f.read().strip() or "another process"
            raise DecalError(f"{root} is in use by another `decal run` ({holder}); wait for it or use another --out") from e
        f.seek(0)
        f.truncate()
        f.write(f"pid {os.getpid()}")
        f.flush()
        try:
            yield
        finally:
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def experiment_dir(config: ExperimentConfig, out: str | Path | None = None) -> Path:
    """The experiment folder: `out` if given, else the config's `output_dir` (relative to the cwd)."""
    return Path(out if out is not None else config.output_dir).resolve()


def _fingerprint(root: Path, step: Step) -> str:
    """What a step runs, independent of where the experiment folder lives."""
    text = json.dumps({"commands": [list(c) for c in step.commands], "files": step.files}, sort_keys=True)
    return text.replace(str(root), "<experiment>")


def plan_status(root: Path, step: Step) -> StepStatus:
    """`done` (DONE marker), `stale` (done, but the config now asks for something else),
    `partial` (folder exists, no marker) or `pending`."""
    folder = root / step.id
    if (folder / DONE).is_file():
        try:
            recorded = json.loads((folder / DONE).read_text(encoding="utf-8")).get("fingerprint")
        except (json.JSONDecodeError, AttributeError):
            recorded = None  # a marker from `decal train` itself: the run finished
        return "stale" if recorded is not None and recorded != _fingerprint(root, step) else "done"
    return "partial" if folder.exists() else "pending"


def _log_event(root: Path, event: str, step: Step, **extra) -> None:
    entry = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "event": event, "step": step.id, "kind": step.kind, **extra}
    with (root / STEP_LOG).open("a", encoding="utf-8") as f:
        f.write(json.dumps(entry) + "\n")
        f.flush()
        os.fsync(f.fileno())


def _select_adapter(root: Path, step: Step) -> dict:
    """Copy the chosen adapter of a training run into `select/adapter`.

    The selected checkpoint (`best_adapter`, when `decal train --select-split` ran) wins over the
    final one (`adapter`); evaluations always read `select/adapter`, so their commands are fixed
    at planning time.
    """
    train_dir = root / step.info["train_dir"]
    chosen = train_dir / "best_adapter"
    if not chosen.is_dir():
        chosen = train_dir / "adapter"
    if not chosen.is_dir():
        raise StepFailedError(f"step {step.id}: training left no adapter in {train_dir} (expected adapter/ or best_adapter/)")
    target = root / step.id / "adapter"
    if target.exists():
        shutil.rmtree(target)
    shutil.copytree(chosen, target)
    selection = train_dir / "selection.json"
    info = {"adapter": str(chosen.relative_to(root)), "selection": None}
    if selection.is_file():
        info["selection"] = json.loads(selection.read_text(encoding="utf-8"))
    write_json_atomic(root / step.id / "selected.json", info)
    return info


def _metrics_for_calibrated(root: Path, step: Step, metrics_argv: tuple[str, ...] | None) -> list[tuple[str, ...]]:
    """`decal metrics` for every calibrated run folder the calibrate command wrote."""
    if metrics_argv is None:
        return []
    folder = root / step.id
    subs = sorted(p for p in folder.iterdir() if (p / "predictions.jsonl").is_file())
    return [("metrics", str(p), *metrics_argv) for p in subs]


def _run_step(root: Path, step: Step, executor: Executor, metrics_argv: tuple[str, ...], *, first_done: bool = False) -> None:
    """Run a step's commands and write its DONE marker; `first_done`: its first command already ran
    (in a `decal evaluate-many` batch)."""
    folder = root / step.id
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in step.files.items():
        write_text_atomic(folder / name, text)
    log_path = folder / "log.txt"
    commands = list(step.commands)
    if step.kind == "select":
        _select_adapter(root, step)
    if step.kind == "train" and (any(folder.glob("checkpoint-*")) or (folder / "adapter").exists()):
        # An interrupted training run continues from its newest checkpoint instead of restarting
        # (`decal train` refuses a folder holding a run unless told to resume).
        commands[0] = (*commands[0], "--resume")
    i = 1 if first_done else 0
    while i < len(commands):
        argv = commands[i]
        code = executor(argv, log_path)
        if code != 0:
            raise StepFailedError(
                f"step {step.id} failed: `decal {argv[0]}` exited with {code}; see {log_path} "
                "(rerun the same command to resume)"
            )
        if step.kind == "calibrate" and i == len(step.commands) - 1:
            commands += _metrics_for_calibrated(root, step, metrics_argv)
        i += 1
    marker = {
        "finished": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "commands": [list(c) for c in commands],
        "fingerprint": _fingerprint(root, step),
    }
    write_json_atomic(folder / DONE, marker)


def _experiment_record(config: ExperimentConfig, steps: list[Step]) -> dict:
    """What the report needs besides the results table: names, order, labels and sweep values."""
    try:
        from ..training.config import TrainConfig

        defaults = {f.name: f.default for f in dataclasses.fields(TrainConfig) if f.default is not dataclasses.MISSING}
    except ImportError:
        defaults = {}
    methods = []
    for m in config.all_methods():
        params = {k: m.train.get(k, defaults.get(k)) for k in ("cal_lambda", "beta")}
        methods.append({"name": m.name, "method": m.method, "variant": m.variant, "reasoning": m.resolved_reasoning, **params})
    return {
        "config": dataclasses.asdict(config),
        "methods": methods,
        "steps": [{"id": s.id, "kind": s.kind, "info": s.info} for s in steps],
    }


def run_experiment(
    config: ExperimentConfig,
    *,
    out: str | Path | None = None,
    only: str | None = None,
    dry_run: bool = False,
    executor: Executor | None = None,
    on_step: Callable[[Step, str], None] | None = None,
) -> list[Step]:
    """Run (or, with `dry_run`, only plan) an experiment; finished steps are skipped.

    Args:
        config: The validated experiment config.
        out: Experiment folder (default: `config.output_dir`).
        only: Glob (or substring) on step ids; the matching steps and their dependencies run.
        dry_run: Plan only: nothing is written.
        executor: Runs one `decal` argv (default: a `python -m decal` subprocess); tests inject fakes.
        on_step: Called with (step, event) for event in skip | start | done, for progress output.

    Returns:
        The selected steps, in order.

    Raises:
        StepFailedError: a command failed; the steps before it stay done.
    """
    root = experiment_dir(config, out)
    all_steps = build_plan(config, root)
    steps = select_steps(all_steps, only)
    if dry_run:
        return steps
    root.mkdir(parents=True, exist_ok=True)
    with _exclusive(root):
        write_json_atomic(root / EXPERIMENT_FILE, _experiment_record(config, all_steps))
        _run_steps(config, root, all_steps, steps, executor or subprocess_executor, on_step)
    return steps


def _run_steps(config, root: Path, all_steps: list[Step], steps: list[Step], executor: Executor, on_step) -> None:
    stale = [s.id for s in steps if plan_status(root, s) == "stale"]
    if stale:
        # Reusing a finished step that the config now describes differently would mix settings
        # in one table; rerunning it over its old outputs could mix them in one run folder.
        raise ConfigError(
            f"{len(stale)} finished step(s) were run with other settings than the config now gives "
            f"(first: {stale[0]}); delete their folders to rerun them, or use another --out"
        )
    m = config.metrics
    metrics_argv = ("--n-bins", str(m.n_bins), "--binning", m.binning, "--bootstrap", str(m.bootstrap))
    for step in steps:
        group = step.info.get("engine_group")
        if group and plan_status(root, step) != "done":
            # vLLM evaluations of one model: the ready ones run in one process with one engine start.
            batch = [s for s in steps if s.info.get("engine_group") == group and plan_status(root, s) != "done"
                     and all((root / d / DONE).is_file() for d in s.deps)]
            if len(batch) > 1:
                _run_batch(config, root, all_steps, batch, executor, on_step, metrics_argv)
                continue
        if plan_status(root, step) == "done":
            _log_event(root, "skip", step)
            if on_step:
                on_step(step, "skip")
            continue
        missing = [d for d in step.deps if not (root / d / DONE).is_file()]
        if missing:  # cannot happen in plan order; guards against a hand-deleted marker mid-run
            raise StepFailedError(f"step {step.id} needs {missing[0]}, which is not done")
        _log_event(root, "start", step)
        if on_step:
            on_step(step, "start")
        started = time.perf_counter()
        try:
            _run_step(root, step, executor, metrics_argv)
        except StepFailedError as e:
            _log_event(root, "fail", step, error=str(e))
            raise
        _log_event(root, "done", step, seconds=round(time.perf_counter() - started, 2))
        if on_step:
            on_step(step, "done")
        if step.kind in ("evaluate", "calibrate"):
            write_results(root / RESULTS_FILE, collect_results(config.name, root, all_steps))


def _run_batch(config, root: Path, all_steps: list[Step], batch: list[Step], executor: Executor, on_step,
               metrics_argv: tuple[str, ...]) -> None:
    """Run the `decal evaluate` commands of `batch` as one `decal evaluate-many` process, then each
    step's remaining commands (metrics) and DONE marker. Steps whose evaluation failed raise
    `StepFailedError` after the others are finished."""
    import hashlib

    jobs = []
    for step in batch:
        (root / step.id).mkdir(parents=True, exist_ok=True)
        jobs.append({"argv": list(step.commands[0][1:]), "log": str(root / step.id / "log.txt")})
        _log_event(root, "start", step, batch=len(batch))
        if on_step:
            on_step(step, "start")
    name = hashlib.sha256("|".join(s.id for s in batch).encode()).hexdigest()[:12]
    folder = root / ".batches"
    folder.mkdir(exist_ok=True)
    jobs_file, results_file = folder / f"{name}.json", folder / f"{name}.results.json"
    results_file.unlink(missing_ok=True)
    write_json_atomic(jobs_file, {"jobs": jobs, "results": str(results_file)})
    started = time.perf_counter()
    executor(("evaluate-many", str(jobs_file)), folder / f"{name}.log")
    codes = json.loads(results_file.read_text(encoding="utf-8")).get("codes", []) if results_file.is_file() else []
    failed: StepFailedError | None = None
    for i, step in enumerate(batch):
        code = codes[i] if i < len(codes) else None
        try:
            if code != 0:
                raise StepFailedError(
                    f"step {step.id} failed: `decal evaluate` "
                    + (f"exited with {code}" if code is not None else "did not finish")
                    + f"; see {root / step.id / 'log.txt'} and {folder / (name + '.log')} (rerun the same command to resume)"
                )
            _run_step(root, step, executor, metrics_argv, first_done=True)
        except StepFailedError as e:
            _log_event(root, "fail", step, error=str(e))
            failed = failed or e
            continue
        _log_event(root, "done", step, seconds=round(time.perf_counter() - started, 2), batch=len(batch))
        if on_step:
            on_step(step, "done")
        write_results(root / RESULTS_FILE, collect_results(config.name, root, all_steps))
    if failed:
        raise failed
