"""Experiment configs: a validated YAML grid of models x methods x training tasks x evaluations.

An experiment config names the models, the methods (`base`, `sft`, `grpo`, `cal-grpo`) with
their training settings, the training tasks with their in-domain and out-of-domain evaluations,
the post-hoc calibrators and where they are fitted, the seeds, the sensitivity sweeps (lambda,
KL beta) and the optional analyses (rollouts, reasoning swap). `load_experiment_config` reads
it with `yaml.safe_load` and validates it with pydantic (`decal._config`): an unknown key, a
wrong type or a broken rule raises `ConfigError` naming the file and the field path
(`methods[2].train.cal_lambda`), with a "Did you mean" suggestion for misspelt keys and names.
A method's `train` settings are checked against the training config's fields and types.

Example (the smallest useful grid):

    name: tiny
    output_dir: runs/tiny
    models:
      - {name: smollm2, path: smollm2-135m-instruct}
    train_tasks:
      - task: builtin
        split: train
        evaluations:
          - {task: builtin, split: validation, domain: in}
    methods:
      - {name: base, method: base}
      - {name: sft, method: sft, train: {epochs: 1}}
"""

from __future__ import annotations

import dataclasses
from dataclasses import field
from pathlib import Path
from typing import Any, Literal, Mapping

from .._config import config_dataclass, load_yaml, validate_config
from ..errors import ConfigError, did_you_mean

__all__ = [
    "ModelSpec",
    "EvalSpec",
    "TrainTaskSpec",
    "EvalSettings",
    "MetricsSettings",
    "MethodSpec",
    "CalibratorSpec",
    "SweepSpec",
    "AnalysisSpec",
    "ExperimentConfig",
    "load_experiment_config",
    "experiment_config_from_dict",
    "METHODS",
    "CALIBRATORS",
]

METHODS = ("base", "sft", "grpo", "cal-grpo")
CALIBRATORS = ("platt", "isotonic", "temperature")


@config_dataclass
class ModelSpec:
    name: str = field(metadata={"help": "Name used in folders and tables, e.g. Qwen3-1.7B."})
    path: str = field(metadata={"help": "What `decal evaluate/train --model` receives: hub id, local folder, GGUF or alias."})
    engine_options: Mapping[str, Any] = field(
        default_factory=dict,
        metadata={"help": "Engine options for this model over `evaluation.engine_options` (e.g. tensor_parallel_size: 4)."},
    )


@config_dataclass
class EvalSpec:
    task: str = field(metadata={"help": "Task name or file, as `decal evaluate --task` takes it."})
    split: str = field(metadata={"help": "Split to evaluate."})
    domain: Literal["in", "ood"] = field(default="in", metadata={"help": "In-domain (†) or out-of-domain (*)."})
    label: str | None = field(default=None, metadata={"help": "Display name in tables (default: the task name)."})

    @property
    def display(self) -> str:
        return self.label or self.task


@config_dataclass
class TrainTaskSpec:
    task: str = field(metadata={"help": "Training task."})
    split: str = field(metadata={"help": "Training split (e.g. commonsense_qa train500)."})
    label: str | None = field(default=None, metadata={"help": "Display name (default: the task name)."})
    evaluations: tuple[EvalSpec, ...] = field(metadata={"help": "In-domain and OOD evaluations of every model trained on it."})
    select_split: str | None = field(default=None, metadata={"help": "Checkpoint selection split (`decal train --select-split`)."})
    select_limit: int | None = field(default=None, metadata={"help": "Examples used for checkpoint selection."})

    def __post_init__(self) -> None:
        if not self.evaluations:
            raise ConfigError(f"train task {self.task!r} needs at least one evaluation")
        # A calibrated run is matched to its evaluation by the records' task name and split, and
        # evaluation folders are named after them, so two evaluations must differ in one of them.
        seen: dict[tuple[str, str], str] = {}
        for ev in self.evaluations:
            key = (ev.task.split(":")[0], ev.split)
            if key in seen:
                raise ConfigError(
                    f"train task {self.task!r}: evaluations {seen[key]!r} and {ev.task!r} both use split {ev.split!r} "
                    "of the same task; give them different splits"
                )
            seen[key] = ev.task


@config_dataclass
class EvalSettings:
    limit: int | None = field(default=None, metadata={"help": "Evaluate the first N examples only."})
    batch_size: int | None = field(default=None, metadata={"help": "`decal evaluate --batch-size`."})
    max_new_tokens: int | None = field(default=None, metadata={"help": "Reasoning budget (`--max-new-tokens`)."})
    temperature: float | None = field(default=None, metadata={"help": "Sampling temperature; unset = the evaluator's default."})
    dtype: str | None = field(default=None, metadata={"help": "`--dtype`; None leaves the commands' `auto` (bfloat16 on GPUs and on CPUs with native bfloat16, else float32)."})
    device: str | None = field(default=None, metadata={"help": "`--device` of `decal evaluate` (e.g. cuda)."})
    engine: str | None = field(
        default=None, metadata={"help": "Inference engine of evaluations and analyses (`--engine`: hf, vllm or remote; "
                                        "default hf)."}
    )
    engine_options: Mapping[str, Any] | None = field(
        default=None,
        metadata={"help": "Engine options. vllm: tensor_parallel_size, data_parallel_size, gpu_memory_utilization, "
                          "max_model_len, or any vLLM engine argument (`--engine-arg`). remote: server_urls (a list), "
                          "served_model_name, max_concurrency, server_timeout, server_retries (the API key comes from "
                          "$DECAL_SERVER_API_KEY, never from a config)."},
    )

    def merged(self, other: "EvalSettings | None") -> "EvalSettings":
        """`other`'s set fields over this one's (merged with `is not None`)."""
        if other is None:
            return self
        return dataclasses.replace(
            self, **{f.name: getattr(other, f.name) for f in dataclasses.fields(other) if getattr(other, f.name) is not None}
        )


@config_dataclass
class MetricsSettings:
    n_bins: int = field(default=10, metadata={"help": "Bins for ECE and the reliability diagrams."})
    binning: Literal["equal_mass", "equal_width"] = field(default="equal_mass", metadata={"help": "The paper uses equal-mass bins."})
    bootstrap: int = field(default=1000, metadata={"help": "Bootstrap resamples for the intervals (0: none)."})

    def __post_init__(self) -> None:
        if self.n_bins < 1:
            raise ConfigError(f"`n_bins` must be >= 1; got {self.n_bins!r}")
        if self.bootstrap < 0:
            raise ConfigError(f"`bootstrap` must be >= 0; got {self.bootstrap!r}")


@config_dataclass
class MethodSpec:
    name: str = field(metadata={"help": "Unique name of this method entry (folders, tables), e.g. cal-grpo."})
    method: Literal["base", "sft", "grpo", "cal-grpo"] = field(metadata={"help": "What to run."})
    reasoning: bool | None = field(
        default=None, metadata={"help": "Reason before deciding; default: true for base/grpo/cal-grpo, false for sft."}
    )
    train: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "Training settings, keys as in a `decal train --config` YAML."}
    )
    evaluation: EvalSettings | None = field(default=None, metadata={"help": "Evaluation settings for this method."})
    models: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these model names."})
    train_tasks: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these training tasks."})
    variant: str = field(default="", metadata={"help": "Variant label (set by sweeps, e.g. lambda=0.005)."})
    init_from: str | None = field(
        default=None,
        metadata={"help": "Name of an earlier trained method entry whose selected adapter this one continues "
                          "(e.g. GRPO from a reasoning warm start); None trains a new adapter on the base model."},
    )

    def __post_init__(self) -> None:
        if self.method == "base" and self.train:
            raise ConfigError(f"method {self.name!r}: a `base` method has no `train` settings")
        if self.method == "base" and self.init_from is not None:
            raise ConfigError(f"method {self.name!r}: a `base` method trains nothing, so it has no `init_from`")
        if self.init_from is not None and "init_adapter" in self.train:
            raise ConfigError(f"method {self.name!r}: give `init_from` or `train.init_adapter`, not both")

    @property
    def resolved_reasoning(self) -> bool:
        if self.reasoning is not None:
            return self.reasoning
        return self.method != "sft"


@config_dataclass
class CalibratorSpec:
    method: Literal["platt", "isotonic", "temperature"] = field(metadata={"help": "Post-hoc calibrator."})
    fit_task: str = field(metadata={"help": "Evaluation (task) whose predictions the calibrator is fitted on."})
    fit_split: str = field(metadata={"help": "Its split."})
    fit_fraction: float = field(default=0.5, metadata={"help": "Fraction of the fit run used to fit; the rest is evaluated."})
    methods: tuple[str, ...] = field(default=("grpo", "cal-grpo"), metadata={"help": "Method names it is applied after."})
    models: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these model names."})

    def __post_init__(self) -> None:
        if not 0.0 < self.fit_fraction <= 1.0:
            raise ConfigError(f"`fit_fraction` must be in (0, 1]; got {self.fit_fraction!r}")


@config_dataclass
class SweepSpec:
    method: str = field(metadata={"help": "Name of the method entry to copy."})
    param: str = field(metadata={"help": "Training setting to vary, e.g. cal_lambda or beta."})
    values: tuple[float, ...] = field(metadata={"help": "Values to run besides the method's own."})
    label: str | None = field(default=None, metadata={"help": "Variant label prefix (default: lambda for cal_lambda)."})
    models: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these model names."})
    train_tasks: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these training tasks."})

    @property
    def prefix(self) -> str:
        return self.label or {"cal_lambda": "lambda"}.get(self.param, self.param)


@config_dataclass
class AnalysisSpec:
    kind: Literal["rollouts", "swap"] = field(metadata={"help": "`decal analyze rollouts` (Table 2) or `swap` (Table 3)."})
    task: str = field(metadata={"help": "Task analysed."})
    split: str = field(metadata={"help": "Split analysed (the paper uses the train splits)."})
    methods: tuple[str, ...] = field(default=("base",), metadata={"help": "Method names whose models are analysed."})
    models: tuple[str, ...] | None = field(default=None, metadata={"help": "Restrict to these model names."})
    settings: Mapping[str, Any] = field(
        default_factory=dict, metadata={"help": "Flags of the analyze command, snake_case (samples, limit, ...)."}
    )


@config_dataclass
class ExperimentConfig:
    name: str = field(metadata={"help": "Experiment name (first column of results.csv)."})
    output_dir: str = field(metadata={"help": "Experiment folder, relative to the working directory."})
    description: str = field(default="", metadata={"help": "Free text shown in the report."})
    data_dir: str | None = field(default=None, metadata={"help": "Folder of the paper datasets (else DECAL_DATA_DIR)."})
    seeds: tuple[int, ...] = field(default=(0,), metadata={"help": "Training and evaluation seeds."})
    models: tuple[ModelSpec, ...] = field(metadata={"help": "Models, in table column order."})
    train_tasks: tuple[TrainTaskSpec, ...] = field(metadata={"help": "Training tasks with their evaluations."})
    methods: tuple[MethodSpec, ...] = field(metadata={"help": "Methods, in table row order."})
    evaluation: EvalSettings = field(default_factory=EvalSettings, metadata={"help": "Default evaluation settings."})
    metrics: MetricsSettings = field(default_factory=MetricsSettings, metadata={"help": "Metric settings."})
    calibrators: tuple[CalibratorSpec, ...] = field(default=(), metadata={"help": "Post-hoc calibrators (Table 5)."})
    sweeps: tuple[SweepSpec, ...] = field(default=(), metadata={"help": "Sensitivity sweeps (Tables 8, 9)."})
    analyses: tuple[AnalysisSpec, ...] = field(default=(), metadata={"help": "Optional analyses (Tables 2, 3)."})

    def __post_init__(self) -> None:
        _check_unique("models", [m.name for m in self.models])
        _check_unique("methods", [m.name for m in self.methods])
        _check_unique("train_tasks", [t.task for t in self.train_tasks])
        _check_unique("seeds", list(self.seeds))
        if not self.models or not self.methods or not self.train_tasks:
            raise ConfigError("`models`, `methods` and `train_tasks` must each list at least one entry")
        model_names = [m.name for m in self.models]
        method_names = [m.name for m in self.methods]
        task_names = [t.task for t in self.train_tasks]
        for i, m in enumerate(self.methods):
            _check_refs(f"methods[{i}].models", m.models, model_names)
            _check_refs(f"methods[{i}].train_tasks", m.train_tasks, task_names)
            if m.init_from is not None:
                # An earlier entry, so the plan (in method order) trains it first.
                _check_refs(f"methods[{i}].init_from", (m.init_from,), method_names[:i])
                if self.method(m.init_from).method == "base":
                    raise ConfigError(f"`methods[{i}].init_from` must name a trained method; {m.init_from!r} is `base`")
        for i, c in enumerate(self.calibrators):
            _check_refs(f"calibrators[{i}].methods", c.methods, method_names)
            _check_refs(f"calibrators[{i}].models", c.models, model_names)
        for i, s in enumerate(self.sweeps):
            _check_refs(f"sweeps[{i}].method", (s.method,), method_names)
            _check_refs(f"sweeps[{i}].models", s.models, model_names)
            _check_refs(f"sweeps[{i}].train_tasks", s.train_tasks, task_names)
            if self.method(s.method).method == "base":
                raise ConfigError(f"`sweeps[{i}].method` must name a trained method; {s.method!r} is `base`")
        for i, a in enumerate(self.analyses):
            _check_refs(f"analyses[{i}].methods", a.methods, method_names)
            _check_refs(f"analyses[{i}].models", a.models, model_names)

    def method(self, name: str) -> MethodSpec:
        for m in self.methods:
            if m.name == name:
                return m
        raise ConfigError(_unknown("method", name, [m.name for m in self.methods]))

    def all_methods(self) -> tuple[MethodSpec, ...]:
        """The methods plus one copy per sweep value, with `variant` set (e.g. `lambda=0.005`)."""
        out = list(self.methods)
        for sweep in self.sweeps:
            base = self.method(sweep.method)
            for value in sweep.values:
                out.append(
                    dataclasses.replace(
                        base,
                        train={**base.train, sweep.param: value},
                        variant=f"{sweep.prefix}={value:g}",
                        models=sweep.models if sweep.models is not None else base.models,
                        train_tasks=sweep.train_tasks if sweep.train_tasks is not None else base.train_tasks,
                    )
                )
        return tuple(out)


def _check_unique(name: str, values: list) -> None:
    seen = set()
    for v in values:
        if v in seen:
            raise ConfigError(f"`{name}` lists {v!r} twice; each entry must be unique")
        seen.add(v)


def _unknown(kind: str, name: str, available: list[str]) -> str:
    return f"Unknown {kind} {name!r}.{did_you_mean(name, available)} Available: {', '.join(map(str, available)) or '(none)'}"


def _check_refs(where: str, refs, available: list[str]) -> None:
    for r in refs or ():
        if r not in available:
            raise ConfigError(f"`{where}`: " + _unknown("name", r, available))


def _normalise_models(data: dict) -> dict:
    """Let `models` entries be bare strings (`- Qwen/Qwen3-1.7B`): name = last path part."""
    models = data.get("models")
    if isinstance(models, list):
        data = {**data, "models": [{"name": Path(m).name, "path": m} if isinstance(m, str) else m for m in models]}
    return data


def experiment_config_from_dict(data: Any, *, source: str = "config") -> ExperimentConfig:
    """Validate a decoded YAML/JSON object into an `ExperimentConfig`.

    Raises:
        ConfigError: unknown key (with a suggestion), wrong type or bad value, naming the field path.
    """
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: an experiment config must be a YAML mapping; got {type(data).__name__}")
    config = validate_config(ExperimentConfig, _normalise_models(data), source=source)
    _check_train_settings(config, source)
    _check_engine_options(config, source)
    return config


def _check_engine_options(config: ExperimentConfig, source: str) -> None:
    """Check engine options' names and values (not the devices: a plan may be made on another machine)."""
    from ..engines import EngineOptions, check_engine_name, check_engine_options

    places = [("evaluation", config.evaluation)] + [
        (f"methods[{i}].evaluation", config.evaluation.merged(m.evaluation))
        for i, m in enumerate(config.methods) if m.evaluation is not None
    ]
    for where, settings in places:
        engine = settings.engine or "hf"
        try:
            check_engine_name(engine)
        except ConfigError as e:
            raise ConfigError(f"{source}: `{where}.engine`: {e}") from e
        for i, model in enumerate(config.models):
            merged = {**(settings.engine_options or {}), **model.engine_options}
            try:  # also with no options: the engine name, and what an engine cannot do without (remote: its URLs)
                check_engine_options(engine, EngineOptions.from_mapping(merged), devices=False)
            except ConfigError as e:
                raise ConfigError(
                    f"{source}: `{where}.engine_options` / `models[{i}].engine_options` (engine {engine}): {e}"
                ) from e


def _check_train_settings(config: ExperimentConfig, source: str) -> None:
    """Check `methods[i].train` keys and types, and the swept settings, against the training config."""
    from ..training.config import TrainConfig

    known = [f.name for f in dataclasses.fields(TrainConfig)]
    fixed = {"method", "model", "task", "split", "out"}  # set by the runner for every step
    for i, m in enumerate(config.methods):
        for key in m.train:
            if key in fixed:
                raise ConfigError(f"{source}: `methods[{i}].train.{key}` is set by the experiment grid; remove it")
        validate_config(TrainConfig, dict(m.train), source=source, where=f"methods[{i}].train", partial=True)
    for i, s in enumerate(config.sweeps):
        if s.param not in known:
            raise ConfigError(f"{source}: Unknown training setting `sweeps[{i}].param` = {s.param!r}."
                              f"{did_you_mean(s.param, known)}")


def load_experiment_config(path: str | Path) -> ExperimentConfig:
    """Read and validate an experiment YAML file.

    Args:
        path: The YAML file.

    Returns:
        The validated, frozen `ExperimentConfig`.

    Raises:
        FileNotFoundError: no such file.
        ConfigError: invalid YAML, unknown key or wrong type (the message names the file and field).
    """
    return experiment_config_from_dict(load_yaml(path, what="experiment config"), source=str(path))
