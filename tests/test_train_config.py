"""TrainConfig: paper defaults per method, CLI > YAML > defaults, and one-line errors before any model loads."""

from __future__ import annotations

import pytest

from decal.cli import main
from decal.errors import ConfigError
from decal.training.config import TrainConfig, load_config_file, merge_config


def test_method_defaults_follow_the_paper():
    sft = TrainConfig(method="sft").resolve()
    assert (sft.learning_rate, sft.epochs, sft.batch_size * sft.grad_accum, sft.reasoning) == (2e-4, 5.0, 32, False)
    grpo = TrainConfig(method="grpo").resolve()
    assert (grpo.learning_rate, grpo.epochs, grpo.batch_size * grpo.grad_accum) == (1e-3, 20.0, 256)
    assert (grpo.num_generations, grpo.temperature, grpo.max_completion_length) == (32, 1.0, 256)
    assert (grpo.loss_type, grpo.beta, grpo.epsilon, grpo.reasoning) == ("bnpo", 0.0, 0.2, True)
    cal = TrainConfig(method="cal-grpo").resolve()
    assert cal.learning_rate == grpo.learning_rate and cal.cal_lambda == 0.001 and cal.cal_target == "uniform"
    assert (sft.lora_r, sft.lora_alpha, sft.lora_dropout) == (16, 32, 0.1)


def test_resolve_keeps_explicit_values():
    cfg = TrainConfig(method="grpo", learning_rate=5e-4, reasoning=False, batch_size=4).resolve()
    assert (cfg.learning_rate, cfg.reasoning, cfg.batch_size, cfg.grad_accum) == (5e-4, False, 4, 8)


def test_cli_overrides_yaml_overrides_defaults(tmp_path):
    path = tmp_path / "train.yaml"
    path.write_text("method: grpo\nlearning_rate: 1e-4\nseed: 3\nlora_target_modules: [q_proj, v_proj]\n")
    values = load_config_file(path)
    assert values["learning_rate"] == 1e-4  # YAML 1.1 reads 1e-4 as a string; float fields accept it
    cfg, overridden = merge_config(file_values=values, cli_values={"seed": 7, "beta": None, "model": "m"})
    assert (cfg.method, cfg.learning_rate, cfg.seed, cfg.beta) == ("grpo", 1e-4, 7, 0.0)
    assert cfg.lora_target_modules == ["q_proj", "v_proj"]
    assert overridden == ["seed"]  # `model` was not in the file, `beta` not given
    # `is not None`, not truthiness: an explicit 0 on the command line wins over the file
    cfg, _ = merge_config(file_values={"beta": 0.05}, cli_values={"beta": 0.0})
    assert cfg.beta == 0.0


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"learnig_rate": 1e-3}, "Did you mean: learning_rate"),
        ({"learning_rate": "fast"}, "`learning_rate` must be a number; got 'fast'"),
        ({"seed": 1.5}, "`seed` must be an integer; got 1.5"),
        ({"use_vllm": "yes"}, "`use_vllm` must be true or false; got 'yes'"),
        ({"learning_rate": -1e-3}, "`learning_rate` must be > 0"),
        ({"num_generations": 1}, "`num_generations` must be >= 2"),
        ({"cal_lambda": -0.1}, "`cal_lambda` must be >= 0"),
        ({"cal_target": "unifrom"}, "Unknown `cal_target` 'unifrom'. Did you mean: uniform?"),
        ({"method": "ppo"}, "Unknown `method` 'ppo'"),
        ({"lora_dropout": 1.0}, "`lora_dropout` must be in [0, 1)"),
        ({"max_steps": 0}, "`max_steps` must be a positive step count or -1"),
        ({"loss_type": "bnp"}, "Did you mean: bnpo?"),
        ({"method": "grpo", "max_prompt_length": 128, "truncate_prompts": True}, "`truncate_prompts` applies to sft only"),
        ({"method": "sft", "truncate_prompts": True}, "`truncate_prompts` needs `max_prompt_length`"),
        ({"method": "sft", "reasoning": True, "max_prompt_length": 64}, "applies to decision-token sft only"),
    ],
)
def test_bad_values_raise_config_error(values, message):
    with pytest.raises(ConfigError) as info:
        merge_config(cli_values=values)
    assert message in str(info.value)


def test_yaml_errors_name_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("method: sft\nbatchsize: 8\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml: Unknown key `batchsize`\. Did you mean: batch_size"):
        load_config_file(path)
    path.write_text("- a list\n")
    with pytest.raises(ConfigError, match="must be a YAML mapping"):
        load_config_file(path)
    with pytest.raises(FileNotFoundError):
        load_config_file(tmp_path / "missing.yaml")


def test_missing_required_fields():
    with pytest.raises(ConfigError, match="`model` must be set; pass --model"):
        TrainConfig(task="builtin", out="x").check_runnable()


def test_trainer_rejections_become_config_errors():
    from decal.training.runner import training_arguments

    # TRL requires the generation batch to be a multiple of num_generations
    cfg = TrainConfig(method="grpo", model="m", task="t", out="o", batch_size=3, grad_accum=1, num_generations=2)
    with pytest.raises(ConfigError, match="invalid training settings for grpo"):
        training_arguments(cfg.resolve(), progress=False)


def test_report_to_needs_the_tracker_installed(monkeypatch):
    import importlib.util

    from decal.training import runner

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match="wandb package is not installed"):
        runner._report_to("wandb")
    assert runner._report_to("none") == "none"


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--learning-rate", "-0.1"], "`learning_rate` must be > 0"),
        (["--num-generations", "1", "--method", "grpo"], "`num_generations` must be >= 2"),
        (["--cal-lambda", "-1", "--method", "cal-grpo"], "`cal_lambda` must be >= 0"),
        (["--cal-target", "nope", "--method", "cal-grpo"], "Unknown `cal_target` 'nope'"),
    ],
)
def test_cli_bad_config_is_one_line_before_loading(flags, message, tmp_path, capsys, monkeypatch):
    import decal.models

    def must_not_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config was validated")

    monkeypatch.setattr(decal.models, "load_model", must_not_load)
    code = main(["train", "--model", "no-such-model", "--task", "builtin", "--out", str(tmp_path / "o"), *flags])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "o").exists()


def test_cli_unknown_yaml_key_is_one_line(tmp_path, capsys):
    path = tmp_path / "c.yaml"
    path.write_text("methd: sft\n")
    code = main(["train", "--config", str(path), "--model", "m", "--task", "builtin", "--out", str(tmp_path / "o")])
    err = capsys.readouterr().err.strip()
    assert code == 1 and len(err.splitlines()) == 1 and "Did you mean: method?" in err


def test_grpo_settings_reach_the_trainer_config():
    from decal.training.runner import training_arguments

    cfg = TrainConfig(method="cal-grpo", model="m", task="t", out="o", batch_size=4, grad_accum=2, num_generations=4,
                      max_completion_length=64, temperature=0.7, beta=0.05, epsilon=0.3, cal_lambda=0.005,
                      cal_target="group-accuracy", use_vllm=True, vllm_mode="server",
                      vllm_server_base_url="http://localhost:8000", vllm_importance_sampling_correction=False,
                      report_to="tensorboard", save_steps=7, seed=3, max_steps=5).resolve()
    args = training_arguments(cfg, progress=False)
    assert (args.per_device_train_batch_size, args.gradient_accumulation_steps, args.num_generations) == (4, 2, 4)
    assert (args.max_completion_length, args.temperature, args.beta, args.epsilon) == (64, 0.7, 0.05, 0.3)
    assert (args.calibration, args.cal_lambda, args.cal_target, args.reasoning) == (True, 0.005, "group-accuracy", True)
    assert (args.use_vllm, args.vllm_mode, args.vllm_server_base_url) == (True, "server", "http://localhost:8000")
    assert args.vllm_importance_sampling_correction is False
    assert (args.learning_rate, args.save_steps, args.seed, args.max_steps, args.logging_steps) == (1e-3, 7, 3, 5, 1)
    assert args.report_to == ["tensorboard"] and args.bf16 is False and args.loss_type == "bnpo"
    plain = training_arguments(TrainConfig(method="grpo", model="m", task="t", out="o").resolve(), progress=False)
    assert plain.calibration is False and plain.vllm_importance_sampling_correction is True


def test_sft_settings_reach_the_trainer_config():
    from decal.training.runner import lora_config, training_arguments

    cfg = TrainConfig(method="sft", model="m", task="t", out="o", lora_target_modules=["q_proj", "v_proj"]).resolve()
    args = training_arguments(cfg, progress=False)
    assert (args.learning_rate, args.num_train_epochs) == (2e-4, 5.0)
    assert (args.per_device_train_batch_size * args.gradient_accumulation_steps) == 32
    assert args.train_sampling_strategy == "group_by_length" and args.remove_unused_columns is False
    lora = lora_config(cfg)
    assert (lora.r, lora.lora_alpha, lora.lora_dropout, sorted(lora.target_modules)) == (16, 32, 0.1, ["q_proj", "v_proj"])


@pytest.mark.parametrize(("value", "enabled"), [(None, True), (True, True), (False, False)])
def test_gradient_checkpointing_auto_enables_it_for_the_trainer(value, enabled):
    """None (the default, auto) turns checkpointing on in the trainer, which then switches it per micro-batch."""
    from decal.training.runner import training_arguments

    assert TrainConfig().gradient_checkpointing is None
    for method in ("sft", "grpo"):
        cfg = TrainConfig(method=method, model="m", task="t", out="o", gradient_checkpointing=value).resolve()
        assert training_arguments(cfg, progress=False).gradient_checkpointing is enabled
