"""The one config mechanism (`decal._config`): pydantic validates experiment and training configs
into their frozen dataclasses, and every problem is one line naming the file, the key path and,
for a misspelt key or choice, the closest name (issue #20 item 9)."""

from __future__ import annotations

import dataclasses
import typing

import pytest

from decal._config import config_dataclass, validate_config
from decal.errors import ConfigError
from decal.experiments.config import ExperimentConfig, experiment_config_from_dict, load_experiment_config
from decal.training.config import TrainConfig, load_config_file, merge_config

from test_experiments import tiny_config


def _error(data: dict) -> str:
    with pytest.raises(ConfigError) as info:
        experiment_config_from_dict(data, source="grid.yaml")
    message = str(info.value)
    assert "\n" not in message
    return message


def _with(path: str, value) -> dict:
    """`tiny_config()` with one value set at a dotted path (`methods.1.train`)."""
    data = tiny_config()
    *parents, last = path.split(".")
    node = data
    for part in parents:
        node = node[int(part)] if part.isdigit() else node[part]
    node[int(last) if last.isdigit() else last] = value
    return data


@pytest.mark.parametrize(("path", "value", "message"), [
    # types as JSON has them: no bool for an int, no float for an int, no string for a bool
    ("seeds", [True], "grid.yaml: `seeds[0]` must be an integer; got True."),
    ("seeds", [1.5], "grid.yaml: `seeds[0]` must be an integer; got 1.5."),
    ("methods.0.reasoning", "yes", "grid.yaml: `methods[0].reasoning` must be true or false; got 'yes'."),
    ("calibrators.0.fit_fraction", True, "grid.yaml: `calibrators[0].fit_fraction` must be a number; got True."),
    ("models.0.path", 7, "grid.yaml: `models[0].path` must be a non-empty string; got 7."),
    ("models.0.path", "", "grid.yaml: `models[0].path` must be a non-empty string; got ''."),
    ("seeds", 0, "grid.yaml: `seeds` must be a list; got 0."),
    ("metrics", [1], "grid.yaml: `metrics` must be a mapping; got [1]."),
    ("models.0.engine_options", "fast", "grid.yaml: `models[0].engine_options` must be a mapping of settings; got 'fast'."),
    ("evaluation", {"dtype": 16}, "grid.yaml: `evaluation.dtype` must be a non-empty string; got 16."),
    ("calibrators.0.fit_fraction", float("nan"), "grid.yaml: `calibrators[0].fit_fraction` must be a finite number; got nan."),
    ("models.0.engine_options", {"": 1}, "grid.yaml: `models[0].engine_options` must have non-empty string keys; got ''."),
    # choices: the house "Unknown ... Did you mean ... Available" line
    ("metrics", {"binning": "equal_mas"},
     "grid.yaml: Unknown `metrics.binning` 'equal_mas'. Did you mean: equal_mass? Available: equal_mass, equal_width."),
    # a required key names itself and says what it is for
    ("models.0", {"name": "m1"}, "grid.yaml: `models[0].path` is required (What `decal evaluate/train --model` receives"),
    # a rule of `__post_init__` gets the path of the object that broke it
    ("calibrators.0.fit_fraction", 2.0, "grid.yaml: calibrators[0]: `fit_fraction` must be in (0, 1]; got 2.0"),
    ("seeds", [3, 3], "grid.yaml: `seeds` lists 3 twice"),
    ("metrics", {"n_bins": 0}, "grid.yaml: metrics: `n_bins` must be >= 1; got 0"),
    # a method's training settings are checked against the training config: keys and types
    ("methods.1.train", {"epochs": "five"}, "grid.yaml: `methods[1].train.epochs` must be a number; got 'five'."),
    ("methods.1.train", {"cal_target": "unifrom"}, "grid.yaml: Unknown `methods[1].train.cal_target` 'unifrom'. "
                                                   "Did you mean: uniform?"),
])
def test_each_problem_is_one_line_naming_the_key_path(path, value, message):
    assert _error(_with(path, value)).startswith(message)


def test_an_unknown_key_is_reported_before_the_missing_key_it_misspells():
    message = _error(_with("methods.1", {"name": "sft", "methd": "sft"}))
    assert message.startswith("grid.yaml: Unknown key `methods[1].methd`. Did you mean: method? Available: name, method,")


def test_a_union_is_reported_at_its_key_with_both_types():
    with pytest.raises(ConfigError, match=r"^`lora_target_modules` must be a list or a non-empty string; got 5\.$"):
        merge_config(cli_values={"lora_target_modules": 5})


def test_yaml_1_1_number_strings_become_numbers_in_float_fields_only(tmp_path):
    # PyYAML reads `5e-4` (no dot) as a string; YAML 1.2 and every user read it as a number.
    path = tmp_path / "grid.yaml"
    path.write_text("""\
name: 1e3
output_dir: exp
models: [{name: m1, path: some/model}]
train_tasks: [{task: builtin, split: train, evaluations: [{task: builtin, split: validation}]}]
methods: [{name: base, method: base}, {name: cal, method: cal-grpo, train: {cal_lambda: 1e-3}}]
sweeps: [{method: cal, param: cal_lambda, values: [5e-4, 1E-2]}]
""")
    config = load_experiment_config(path)
    assert config.sweeps[0].values == (5e-4, 1e-2)
    assert config.name == "1e3"  # a string field keeps the text
    data = tiny_config(sweeps=[{"method": "cal-grpo", "param": "cal_lambda", "values": ["5e-4"]}])
    assert experiment_config_from_dict(data).sweeps[0].values == (5e-4,)
    assert data["sweeps"][0]["values"] == ["5e-4"]  # the caller's data is not modified
    data["sweeps"][0]["values"] = ["5e-4x"]
    assert _error(data) == "grid.yaml: `sweeps[0].values[0]` must be a number; got '5e-4x'."


def test_a_training_file_is_checked_key_by_key_and_its_rules_after_the_merge(tmp_path):
    path = tmp_path / "train.yaml"
    # valid only once the command line adds max_prompt_length: the file alone must load
    path.write_text("method: sft\ntruncate_prompts: true\nepochs: 2\nlearning_rate: 3e-4\n")
    values = load_config_file(path)
    assert values == {"method": "sft", "truncate_prompts": True, "epochs": 2.0, "learning_rate": 3e-4}
    with pytest.raises(ConfigError, match="`truncate_prompts` needs `max_prompt_length`"):
        merge_config(file_values=values)
    config, _ = merge_config(file_values=values, cli_values={"max_prompt_length": 128})
    assert (config.truncate_prompts, config.max_prompt_length, config.epochs) == (True, 128, 2.0)
    path.write_text("method: sft\nseed: true\n")
    with pytest.raises(ConfigError, match=r"train\.yaml: `seed` must be an integer; got True\.$"):
        load_config_file(path)


def test_yaml_dates_are_read_as_the_text_written():
    config = experiment_config_from_dict(_with("train_tasks.0.split", __import__("datetime").date(2024, 1, 2)))
    assert config.train_tasks[0].split == "2024-01-02"


def _dataclasses_reachable(tp, seen=None) -> set:
    seen = set() if seen is None else seen
    for arg in typing.get_args(tp) or ():
        _dataclasses_reachable(arg, seen)
    if dataclasses.is_dataclass(tp) and tp not in seen:
        seen.add(tp)
        for hint in typing.get_type_hints(tp).values():
            _dataclasses_reachable(hint, seen)
    return seen


def test_every_config_class_is_declared_with_the_mechanism():
    """A nested class declared with a plain @dataclass would let its unknown keys through."""
    classes = _dataclasses_reachable(ExperimentConfig) | _dataclasses_reachable(TrainConfig)
    assert len(classes) >= 10
    assert [c.__name__ for c in classes if getattr(c, "__pydantic_config__", None) is None] == []
    assert all(c.__dataclass_params__.frozen for c in classes)


@config_dataclass
class Inner:
    engine: typing.Literal["hf", "vllm", "remote"] = dataclasses.field(default="hf", metadata={"help": "Engine."})


@config_dataclass
class Outer:
    name: str = dataclasses.field(metadata={"help": "A name."})
    warm_start_labels: bool = dataclasses.field(default=False, metadata={"help": "New setting."})
    inner: tuple[Inner, ...] = ()


def test_a_new_setting_or_choice_is_one_annotated_line():
    assert validate_config(Outer, {"name": "x", "warm_start_labels": True, "inner": [{"engine": "remote"}]}) == Outer(
        name="x", warm_start_labels=True, inner=(Inner(engine="remote"),))
    with pytest.raises(ConfigError, match=r"^Unknown key `inner\[0\]\.engin`\. Did you mean: engine\? Available: engine\.$"):
        validate_config(Outer, {"name": "x", "inner": [{"engin": "hf"}]})
    with pytest.raises(ConfigError, match=r"^`name` is required \(A name\.\)\.$"):
        validate_config(Outer, {})
