"""`decal train` end to end on the tiny Qwen3: run folder, adapter loading, resume (also after SIGKILL),
checkpoint selection, GRPO and cal-GRPO, and a two-process CPU run."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from decal.cli import main
from decal.training.callbacks import read_train_log
from decal.training.checkpoints import last_checkpoint, list_checkpoints

ROOT = Path(__file__).resolve().parents[1]
# Small and fast: 8 builtin examples, micro-batch 4, LoRA rank 4.
SFT_FLAGS = ["--method", "sft", "--task", "builtin", "--split", "train", "--limit", "8", "--batch-size", "4",
             "--grad-accum", "1", "--lora-r", "4", "--lora-alpha", "8", "--save-steps", "1"]
GRPO_FLAGS = ["--task", "builtin", "--split", "train", "--limit", "4", "--batch-size", "4", "--grad-accum", "1",
              "--num-generations", "2", "--max-completion-length", "6", "--lora-r", "4", "--lora-alpha", "8",
              "--save-steps", "1"]


def _train(model_dir, out, *flags) -> int:
    return main(["train", "--model", str(model_dir), "--out", str(out), *flags])


def _lora_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(folder / "adapter_model.safetensors"))


def _logged_steps(out: Path) -> list[int]:
    return [e["step"] for e in read_train_log(out) if "loss" in e]


def _count_end_training(monkeypatch) -> list[int]:
    """Counts Accelerator.end_training calls: a multi-process run that exits with its gloo group
    alive can abort at interpreter teardown, so `train` must release it, on success and failure."""
    from accelerate import Accelerator

    calls, original = [], Accelerator.end_training
    monkeypatch.setattr(Accelerator, "end_training", lambda self: (calls.append(1), original(self))[1])
    return calls


def test_sft_run_folder_and_adapter_loads(tiny_qwen3_dir, tmp_path, monkeypatch):
    out = tmp_path / "sft"
    ended = _count_end_training(monkeypatch)
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "2") == 0
    assert len(ended) == 1
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert resolved["method"] == "sft" and resolved["learning_rate"] == 2e-4 and resolved["reasoning"] is False
    assert json.loads((out / "DONE").read_text())["global_step"] == 2
    assert [s for s, _ in list_checkpoints(out)] == [1, 2]
    assert _logged_steps(out) == [1, 2]
    assert (out / "env.json").is_file()
    # the final adapter equals the last checkpoint's and loads through decal.models.load_model
    final, last = _lora_state(out / "adapter"), _lora_state(out / "checkpoint-2")
    assert final.keys() == last.keys() and all(torch.equal(final[k], last[k]) for k in final)
    assert any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in final.items())
    from decal.models import load_model

    model, _ = load_model(str(tiny_qwen3_dir), adapter=str(out / "adapter"))
    assert any("lora_" in n for n, _ in model.named_parameters())
    # and `decal evaluate --adapter` scores with it
    runs = tmp_path / "eval"
    assert main(["evaluate", "--model", str(tiny_qwen3_dir), "--task", "builtin", "--split", "validation",
                 "--limit", "2", "--adapter", str(out / "adapter"), "--out", str(runs), "--no-progress"]) == 0
    records = [json.loads(line) for p in runs.rglob("predictions.jsonl") for line in p.read_text().splitlines()]
    assert len(records) == 2 and all(r["adapter"] == str(out / "adapter") for r in records)


@pytest.mark.slow
def test_checkpoint_selection(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "sft"
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "2", "--learning-rate", "0.05",
                  "--select-split", "validation", "--select-limit", "6") == 0
    selection = json.loads((out / "selection.json").read_text())
    assert selection["split"] == "validation" and selection["criterion"] == "accuracy"
    rows = {r["step"]: r for r in selection["checkpoints"]}
    assert sorted(rows) == [1, 2] and all(r["n_examples"] == 6 for r in rows.values())
    for step, row in rows.items():
        lines = (out / "selection" / f"checkpoint-{step}" / "predictions.jsonl").read_text().splitlines()
        correct = [json.loads(line)["correct"] for line in lines]
        assert row["accuracy"] == pytest.approx(sum(correct) / len(correct))
        assert 0.0 <= row["ece"] <= 1.0
    best = selection["best"]
    assert rows[best]["accuracy"] == max(r["accuracy"] for r in rows.values())
    chosen, source = _lora_state(out / "best_adapter"), _lora_state(out / f"checkpoint-{best}")
    assert all(torch.equal(chosen[k], source[k]) for k in source)


def test_rerun_without_resume_is_refused(tiny_qwen3_dir, tmp_path, capsys):
    out = tmp_path / "sft"
    (out / "checkpoint-1").mkdir(parents=True)  # what an earlier (interrupted) run leaves
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "1") == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "already holds a training run; pass --resume" in err
    assert not (out / "config.resolved.yaml").exists()  # refused before writing anything


@pytest.mark.slow
def test_resume_continues_from_the_saved_step(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "sft"
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "2") == 0
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "4", "--resume") == 0
    done = json.loads((out / "DONE").read_text())
    assert done["global_step"] == 4 and done["resumed_from"].endswith("checkpoint-2")
    begins = [e for e in read_train_log(out) if e.get("event") == "train_begin"]
    assert [(b["step"], b["resumed"]) for b in begins] == [(0, False), (2, True)]
    assert _logged_steps(out) == [1, 2, 3, 4]


def test_read_train_log_drops_replayed_steps(tmp_path):
    lines = [{"event": "train_begin", "step": 0}, {"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0},
             {"step": 3, "loss": 1.0}, {"event": "train_begin", "step": 2}, {"step": 3, "loss": 1.5}]
    path = tmp_path / "train_log.jsonl"
    path.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"step": 4, "lo')  # torn last line
    steps = [(e["step"], e["loss"]) for e in read_train_log(path) if "loss" in e]
    assert steps == [(1, 3.0), (2, 2.0), (3, 1.5)]


def test_last_checkpoint_skips_a_half_written_one(tmp_path):
    for step, state in ((2, "{}"), (4, '{"glob')):
        folder = tmp_path / f"checkpoint-{step}"
        folder.mkdir()
        (folder / "adapter_config.json").write_text("{}")
        (folder / "trainer_state.json").write_text(state)
    (tmp_path / "checkpoint-6").mkdir()  # killed before anything was written
    assert last_checkpoint(tmp_path) == tmp_path / "checkpoint-2"
    assert [s for s, _ in list_checkpoints(tmp_path, complete_only=False)] == [2, 4, 6]


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT / "src") + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


@pytest.mark.slow
def test_resume_after_sigkill(tiny_qwen3_dir, tmp_path):
    out = tmp_path / "killed"
    command = [sys.executable, "-m", "decal", "train", "--model", str(tiny_qwen3_dir), "--out", str(out),
               *SFT_FLAGS, "--max-steps", "12", "--save-steps", "2"]
    process = subprocess.Popen(command, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 120
        while last_checkpoint(out) is None and process.poll() is None and time.time() < deadline:
            time.sleep(0.05)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "DONE").exists()
    killed_at = int(last_checkpoint(out).name.split("-")[1])
    assert 2 <= killed_at < 12
    assert _train(tiny_qwen3_dir, out, *SFT_FLAGS, "--max-steps", "12", "--save-steps", "2", "--resume") == 0
    done = json.loads((out / "DONE").read_text())
    assert done["global_step"] == 12 and done["resumed_from"].endswith(f"checkpoint-{killed_at}")
    begins = [e["step"] for e in read_train_log(out) if e.get("event") == "train_begin"]
    assert begins[0] == 0 and begins[-1] == killed_at
    assert _logged_steps(out) == list(range(1, 13))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")
def test_grpo_sampling_on_vllm_finishes_as_a_command(tiny_qwen3_32_dir, tmp_path):
    # `decal train --engine vllm` as a user runs it, in a process of its own: the vLLM engine core
    # then runs in that process and opens its torch.distributed group. Closing the trainer's group
    # before the sampler made vLLM's shutdown fail every such run after its last step
    # ("error: Invalid process group specified", exit 1, seen on the reasoning grid's grpo-commit).
    out = tmp_path / "grpo-vllm"
    command = [sys.executable, "-m", "decal", "train", "--model", str(tiny_qwen3_32_dir), "--out", str(out),
               "--method", "grpo", *GRPO_FLAGS, "--max-steps", "1", "--engine", "vllm"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "DONE").read_text())["global_step"] == 1
    assert [e["step"] for e in read_train_log(out) if "reward" in e] == [1]
    assert not (out / ".vllm-adapters").exists()  # the step adapters are removed with the engine


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "cal-grpo"])
def test_grpo_runs_and_saves_a_loadable_adapter(method, tiny_qwen3_dir, tmp_path):
    out = tmp_path / method
    assert _train(tiny_qwen3_dir, out, "--method", method, *GRPO_FLAGS, "--max-steps", "1", "--cal-lambda", "0.01") == 0
    resolved = yaml.safe_load((out / "config.resolved.yaml").read_text())
    assert (resolved["method"], resolved["reasoning"], resolved["learning_rate"]) == (method, True, 1e-3)
    assert json.loads((out / "DONE").read_text())["global_step"] == 1
    entries = [e for e in read_train_log(out) if "reward" in e]
    assert [e["step"] for e in entries] == [1] and 0.0 <= entries[0]["reward"] <= 1.0
    from decal.models import load_model

    model, _ = load_model(str(tiny_qwen3_dir), adapter=str(out / "adapter"))
    assert any("lora_" in n for n, _ in model.named_parameters())


@pytest.mark.slow
@pytest.mark.parametrize("method", ["grpo", "cal-grpo"])
def test_two_process_cpu_run(method, tiny_qwen3_dir, tmp_path):
    """torchrun with two CPU processes (gloo): the processes share the data and log once."""
    out = tmp_path / method
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "decal", "train",
               "--model", str(tiny_qwen3_dir), "--out", str(out), "--method", method, *GRPO_FLAGS,
               "--batch-size", "2", "--max-steps", "2"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((out / "DONE").read_text())["global_step"] == 2
    assert json.loads((out / "env.json").read_text())["world_size"] == 2
    log = read_train_log(out)
    assert [e["step"] for e in log if e.get("event") == "train_begin"] == [0]  # main process only
    # 4 prompts x 2 generations = 8 completions per epoch; 2 processes x 2 completions per step
    assert [e["epoch"] for e in log if "reward" in e] == [0.5, 1.0]
    assert (out / "adapter" / "adapter_model.safetensors").is_file()


@pytest.mark.slow
def test_two_process_sft_loss_is_the_mean_over_the_effective_batch(tiny_qwen3_dir, tmp_path):
    """torchrun with two CPU processes: decision-position SFT over 2 processes x 2 rows x grad-accum 2 logs the same
    loss as one process x 2 rows x grad-accum 4 on the same 8 examples, the mean NLL over all 8 (issue #13)."""
    # no LoRA dropout: its masks would differ between the runs
    flags = ["--method", "sft", "--task", "builtin", "--split", "train", "--limit", "8", "--batch-size", "2",
             "--lora-r", "4", "--lora-alpha", "8", "--lora-dropout", "0", "--max-steps", "1", "--learning-rate", "0.05"]
    one = tmp_path / "one"
    assert _train(tiny_qwen3_dir, one, *flags, "--grad-accum", "4") == 0
    two = tmp_path / "two"
    torchrun = Path(sys.executable).with_name("torchrun")
    command = [str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "decal", "train",
               "--model", str(tiny_qwen3_dir), "--out", str(two), *flags, "--grad-accum", "2"]
    result = subprocess.run(command, env=_env(), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert json.loads((two / "env.json").read_text())["world_size"] == 2
    losses = [[e["loss"] for e in read_train_log(out) if "loss" in e and "train_runtime" not in e] for out in (one, two)]
    assert len(losses[0]) == len(losses[1]) == 1
    # float32 is the point (the CLI's two-process path): the same 8 NLLs of the 2-layer tiny Qwen3, summed
    # in another order across the processes, are a few u = 6e-8 apart (relative). The adapters: Adam's first
    # step is lr * g / (|g| + eps), about +-lr whatever float32 rounding does to g.
    assert losses[1][0] == pytest.approx(losses[0][0], rel=1e-5)
    # and both changed the adapter the same way (the gradients were the same mean over the 8 rows)
    a, b = _lora_state(one / "adapter"), _lora_state(two / "adapter")
    assert a.keys() == b.keys() and any(k.endswith("lora_B.weight") and v.abs().sum() > 0 for k, v in a.items())
    for key in a:
        assert torch.allclose(a[key], b[key], rtol=1e-4, atol=1e-6), key


@pytest.mark.parametrize(("name", "kind"), [("ddp", "MULTI_GPU"), ("deepspeed_zero2", "DEEPSPEED")])
def test_accelerate_configs_load(name, kind):
    from accelerate.commands.config.config_args import load_config_from_file

    config = load_config_from_file(str(ROOT / "configs" / "accelerate" / f"{name}.yaml"))
    assert config.distributed_type.name == kind and config.mixed_precision == "no"
    if kind == "DEEPSPEED":
        assert config.deepspeed_config["zero_stage"] == 2


def test_a_run_too_small_for_one_step_fails_instead_of_saving_the_base(tiny_qwen3_dir, tmp_path, capsys, monkeypatch):
    # 4 prompts cannot fill a generation batch of 4 x 8 completions (16 prompts of 2 generations),
    # so TRL would run zero steps; the run must say so rather than write an untrained adapter.
    out = tmp_path / "tiny"
    flags = [f if f != "1" or GRPO_FLAGS[i - 1] != "--grad-accum" else "8" for i, f in enumerate(GRPO_FLAGS)]
    ended = _count_end_training(monkeypatch)
    assert _train(tiny_qwen3_dir, out, "--method", "grpo", *flags, "--max-steps", "2") == 1
    assert len(ended) == 1  # the process group is released on the error path too
    last = capsys.readouterr().err.strip().splitlines()[-1]  # after the progress bars
    assert last.startswith("error: no optimizer step ran: 4 training examples") and "grad-accum 8" in last
    assert not (out / "DONE").exists() and not (out / "adapter").exists()
