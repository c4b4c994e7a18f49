"""Expand an experiment config into an ordered list of steps (train, select, evaluate, calibrate, analyze).

Every step owns one folder under the experiment folder; its id is that folder's path relative
to the experiment folder, built from `decal._io.safe_name` parts:

    runs/<model>/<method>[_<variant>]/<train-task>[/seed-<s>]/train
    runs/<model>/<method>[_<variant>]/<train-task>[/seed-<s>]/select
    runs/<model>/<method>[_<variant>]/<train-task>[/seed-<s>]/eval/<task>-<split>
    runs/<model>/<method>[_<variant>]/<train-task>[/seed-<s>]/calibrate/<calibrator>
    analysis/<model>/<method>/<kind>-<task>-<split>

Steps list their dependencies; the plan is in dependency order, so running it front to back is
always valid. A method with `init_from` continues the adapter that another (earlier) method's
select step chose: its train step depends on that step and its `train.yaml` sets `init_adapter`. A step's commands are `decal` argument lists (the runner prefixes
`python -m decal`); `select` runs in-process (it copies the chosen adapter).
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import yaml

from .._io import safe_name
from .config import EvalSpec, ExperimentConfig, MethodSpec, ModelSpec, TrainTaskSpec

__all__ = ["Step", "build_plan", "select_steps", "run_prefix", "engine_args"]

StepKind = Literal["train", "select", "evaluate", "calibrate", "analyze"]


@dataclass(frozen=True, kw_only=True)
class Step:
    """One unit of work with its own folder and `DONE` marker.

    id: folder path relative to the experiment folder (also the name `--only` matches).
    kind: train | select | evaluate | calibrate | analyze.
    commands: `decal` argument lists run in order; `{step}` in an argument is the step folder.
    deps: ids of the steps that must be done first.
    files: text files (name -> content) written into the step folder before the commands.
    info: model, method, variant, train_task, eval_task, eval_split, domain, calibrator, seed.
    """

    id: str
    kind: StepKind
    commands: tuple[tuple[str, ...], ...] = ()
    deps: tuple[str, ...] = ()
    files: dict[str, str] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)


def run_prefix(model: ModelSpec, method: MethodSpec, train_task: TrainTaskSpec, seed: int, n_seeds: int) -> str:
    """The folder of one trained (or base) model: `runs/<model>/<method>[_<variant>]/<train-task>[/seed-s]`."""
    method_dir = safe_name(method.name if not method.variant else f"{method.name}_{method.variant}")
    parts = ["runs", safe_name(model.name), method_dir, safe_name(train_task.task)]
    if n_seeds > 1:
        parts.append(f"seed-{seed}")
    return "/".join(parts)


def _applies(restrict: tuple[str, ...] | None, name: str) -> bool:
    return restrict is None or name in restrict


def engine_args(settings, model: ModelSpec) -> list[str]:
    """`--engine` and the engine-option flags of an evaluation or analysis of `model`.

    The model's `engine_options` win over the evaluation's; the registry turns them into the
    engine's own flags (`decal.engines.registry.option_args`: `--server-url` once per URL,
    `--tensor-parallel-size`, else `--engine-arg KEY=VALUE`). Nothing is added when neither sets
    anything, so configs without engines plan the commands they always did.
    """
    from ..engines.registry import option_args

    options = {**(settings.engine_options or {}), **model.engine_options}
    args = ["--engine", settings.engine] if settings.engine else []
    return args + option_args(settings.engine or "hf", options)


def _engine_flags(settings: Mapping[str, Any]) -> bool:
    """Whether an analysis's own settings choose its engine or engine options (then the evaluation's are not added)."""
    from ..engines.registry import engine_kinds

    flags = {o.key for kind in engine_kinds() for o in kind.options}
    return any(k in ("engine", "engine_arg") or k in flags for k in settings)


def _eval_args(config: ExperimentConfig, method: MethodSpec, ev: EvalSpec, seed: int, model: ModelSpec) -> list[str]:
    settings = config.evaluation.merged(method.evaluation)
    args = ["--task", ev.task, "--split", ev.split]
    if method.resolved_reasoning:
        args.append("--reasoning")
    for flag, value in (
        ("--limit", settings.limit),
        ("--batch-size", settings.batch_size),
        ("--max-new-tokens", settings.max_new_tokens if method.resolved_reasoning else None),
        ("--temperature", settings.temperature),
        ("--dtype", settings.dtype),
        ("--device", settings.device),
    ):
        if value is not None:
            args += [flag, str(value)]
    args += engine_args(settings, model)
    # Output goes to the step's log file, where a progress bar is noise.
    args += ["--seed", str(seed), "--no-progress"]
    if config.data_dir:
        args += ["--data-dir", config.data_dir]
    return args


def _metrics_command(config: ExperimentConfig, run_dir: str) -> tuple[str, ...]:
    m = config.metrics
    return ("metrics", run_dir, "--n-bins", str(m.n_bins), "--binning", m.binning, "--bootstrap", str(m.bootstrap))


def _train_yaml(config: ExperimentConfig, method: MethodSpec, task: TrainTaskSpec, seed: int,
                init_adapter: str | None = None) -> str:
    """The per-step training YAML (keys = `decal train` flag names with underscores)."""
    settings = dict(method.train)
    if init_adapter is not None:
        settings["init_adapter"] = init_adapter
    settings.setdefault("reasoning", method.resolved_reasoning)
    settings.setdefault("seed", seed)
    if task.select_split is not None:
        settings.setdefault("select_split", task.select_split)
        if task.select_limit is not None:
            settings.setdefault("select_limit", task.select_limit)
    if config.data_dir:
        settings.setdefault("data_dir", config.data_dir)
    return yaml.safe_dump(settings, sort_keys=True)


def _model_steps(config, model, method, task, seed, root: Path) -> list[Step]:
    """Train + select (trained methods) and one evaluate step per evaluation of `task`."""
    prefix = run_prefix(model, method, task, seed, len(config.seeds))
    base_info = {
        "model": model.name,
        "method": method.name,
        "kind": method.method,
        "variant": method.variant,
        "train_task": task.task,
        "seed": seed,
    }
    steps: list[Step] = []
    adapter_args: list[str] = []
    eval_deps: tuple[str, ...] = ()
    if method.method != "base":
        train_id, select_id = f"{prefix}/train", f"{prefix}/select"
        init_adapter, train_deps = None, ()
        if method.init_from is not None:
            start = run_prefix(model, config.method(method.init_from), task, seed, len(config.seeds))
            init_adapter, train_deps = str(root / start / "select" / "adapter"), (f"{start}/select",)
        steps.append(
            Step(
                id=train_id,
                kind="train",
                commands=(
                    (
                        "train", "--method", method.method, "--model", model.path, "--task", task.task,
                        "--split", task.split, "--out", str(root / train_id), "--config", str(root / train_id / "train.yaml"),
                    ),
                ),
                deps=train_deps,
                files={"train.yaml": _train_yaml(config, method, task, seed, init_adapter)},
                info=dict(base_info),
            )
        )
        steps.append(Step(id=select_id, kind="select", deps=(train_id,), info={**base_info, "train_dir": train_id}))
        adapter_args = ["--adapter", str(root / select_id / "adapter")]
        eval_deps = (select_id,)
    for ev in task.evaluations:
        eval_id = f"{prefix}/eval/{safe_name(ev.task)}-{safe_name(ev.split)}"
        out = str(root / eval_id)
        # `decal evaluate --out PARENT --name NAME` writes PARENT/NAME; the step folder is that run folder.
        evaluate = (
            "evaluate", "--model", model.path, *adapter_args, *_eval_args(config, method, ev, seed, model),
            "--out", str((root / eval_id).parent), "--name", (root / eval_id).name,
        )
        steps.append(
            Step(
                id=eval_id,
                kind="evaluate",
                commands=(evaluate, _metrics_command(config, out)),
                deps=eval_deps,
                info={**base_info, "eval_task": ev.task, "eval_split": ev.split, "domain": ev.domain, "calibrator": "none",
                      **_engine_info(config, method, model)},
            )
        )
    return steps


def _engine_info(config: ExperimentConfig, method: MethodSpec, model: ModelSpec) -> dict:
    """Step info of an evaluation's engine; on an engine that serves adapters from one running
    engine (vllm, remote), the evaluations of one model (and engine options) share an
    `engine_group`, which the runner scores in one process with one engine start."""
    from ..engines import engine_kind

    settings = config.evaluation.merged(method.evaluation)
    engine = settings.engine or "hf"
    if not engine_kind(engine).capabilities.shared_adapters:
        return {}
    import json

    return {"engine": engine, "engine_group": json.dumps([model.path, settings.dtype, engine_args(settings, model)])}


def _calibrate_steps(config, model, method, task, seed, root: Path, eval_steps: list[Step]) -> list[Step]:
    steps = []
    prefix = run_prefix(model, method, task, seed, len(config.seeds))
    for cal in config.calibrators:
        if method.name not in cal.methods or not _applies(cal.models, model.name):
            continue
        fit = [s for s in eval_steps if (s.info["eval_task"], s.info["eval_split"]) == (cal.fit_task, cal.fit_split)]
        if not fit:
            continue  # this training task does not evaluate on the calibrator's fit data
        others = [s for s in eval_steps if s is not fit[0]]
        step_id = f"{prefix}/calibrate/{safe_name(cal.method)}"
        command = ["calibrate", "--method", cal.method, "--fit", str(root / fit[0].id)]
        if cal.fit_fraction < 1.0:
            command += ["--fit-fraction", str(cal.fit_fraction), "--seed", str(seed)]
        if others:
            command += ["--apply", *(str(root / s.id) for s in others)]
        command += ["--out", str(root / step_id)]
        steps.append(
            Step(
                id=step_id,
                kind="calibrate",
                commands=(tuple(command),),
                deps=tuple(s.id for s in (fit[0], *others)),
                info={
                    **{k: v for k, v in fit[0].info.items() if k not in ("eval_task", "eval_split", "domain")},
                    "calibrator": cal.method,
                    "fit_run": fit[0].id,
                    "fit_task": cal.fit_task,
                    "fit_split": cal.fit_split,
                    "domains": {f"{s.info['eval_task']}/{s.info['eval_split']}": s.info["domain"] for s in eval_steps},
                },
            )
        )
    return steps


def _analysis_steps(config: ExperimentConfig, root: Path, model_steps: dict) -> list[Step]:
    steps = []
    for a in config.analyses:
        for model in config.models:
            if not _applies(a.models, model.name):
                continue
            for method_name in a.methods:
                method = config.method(method_name)
                # The analysed model: the method trained on the analysed task if there is one, else the first.
                task = next((t for t in config.train_tasks if t.task == a.task), config.train_tasks[0])
                seed = config.seeds[0]
                key = (model.name, method.name, method.variant, task.task, seed)
                if key not in model_steps:
                    continue
                prefix = run_prefix(model, method, task, seed, len(config.seeds))
                step_id = f"analysis/{safe_name(model.name)}/{safe_name(method.name)}/{a.kind}-{safe_name(a.task)}-{safe_name(a.split)}"
                command = ["analyze", a.kind, "--model", model.path]
                deps: tuple[str, ...] = ()
                if method.method != "base":
                    command += ["--adapter", str(root / prefix / "select" / "adapter")]
                    deps = (f"{prefix}/select",)
                command += ["--task", a.task, "--split", a.split]
                if not _engine_flags(a.settings):
                    command += engine_args(config.evaluation.merged(method.evaluation), model)
                for key_, value in a.settings.items():
                    flag = f"--{key_.replace('_', '-')}"
                    if isinstance(value, bool):  # a switch (`--include-invalid`), not a flag with a value
                        command += [flag] if value else []
                    else:
                        command += [flag, str(value)]
                if config.data_dir:
                    command += ["--data-dir", config.data_dir]
                # The step's output goes to its log file, where a progress bar is noise.
                command += ["--no-progress", "--out", str(root / step_id)]
                steps.append(
                    Step(
                        id=step_id,
                        kind="analyze",
                        commands=(tuple(command),),
                        deps=deps,
                        info={"model": model.name, "method": method.name, "analysis": a.kind, "task": a.task, "split": a.split},
                    )
                )
    return steps


def build_plan(config: ExperimentConfig, root: str | Path) -> list[Step]:
    """All steps of an experiment, in dependency order.

    Args:
        config: The validated experiment config.
        root: The experiment folder (absolute paths in the commands are built from it).

    Returns:
        The steps; ids are unique.
    """
    root = Path(root).resolve()
    steps: list[Step] = []
    model_steps: dict = {}
    for model in config.models:
        for task in config.train_tasks:
            for method in config.all_methods():
                if not (_applies(method.models, model.name) and _applies(method.train_tasks, task.task)):
                    continue
                for seed in config.seeds:
                    own = _model_steps(config, model, method, task, seed, root)
                    evals = [s for s in own if s.kind == "evaluate"]
                    own += _calibrate_steps(config, model, method, task, seed, root, evals)
                    model_steps[(model.name, method.name, method.variant, task.task, seed)] = own
                    steps += own
    steps += _analysis_steps(config, root, model_steps)
    if any(s.info.get("engine_group") for s in steps):
        # All training first, so that each model's vLLM evaluations (base, SFT, GRPO, ...) are
        # ready together and the runner starts its engine once. Still dependency order:
        # evaluations depend only on selections, calibrations and analyses on what precedes them.
        steps = [s for s in steps if s.kind in ("train", "select")] + [s for s in steps if s.kind not in ("train", "select")]
    ids = [s.id for s in steps]
    missing = sorted({d for s in steps for d in s.deps if d not in ids})
    if missing:
        # `init_from` names a method restricted away from this model or training task.
        raise ValueError(f"a step depends on {missing[0]}, which the grid does not train; check the `init_from` "
                         "method's `models` and `train_tasks`")
    if len(set(ids)) != len(ids):
        dup = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"two steps share a folder: {dup[0]}; give the clashing entries distinct names")
    return steps


def select_steps(steps: list[Step], pattern: str | None) -> list[Step]:
    """The steps whose id matches the glob `pattern` (or contains it), plus everything they depend on.

    Raises:
        ValueError: no step matches.
    """
    if not pattern:
        return list(steps)
    by_id = {s.id: s for s in steps}
    wanted: set[str] = set()
    todo = [s.id for s in steps if fnmatch.fnmatch(s.id, pattern) or pattern in s.id]
    if not todo:
        raise ValueError(f"`--only {pattern}` matches no step; step ids look like {steps[0].id!r}" if steps else "empty plan")
    while todo:
        sid = todo.pop()
        if sid not in wanted:
            wanted.add(sid)
            todo.extend(by_id[sid].deps)
    return [s for s in steps if s.id in wanted]
