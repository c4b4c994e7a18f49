"""GRPO generation on decal's vLLM engine (`--engine vllm`, issue #22 item 3), on the real SmolLM2.

One trainer samples on vLLM (the LoRA adapter served each step), a second one takes the same
completions on the hf path; their rewards and decisions must be equal, and the sampler's token
log-probabilities must match the trainer's own (LoRA dropout off, so the importance-sampling
ratio is 1 up to the kernels' float32 rounding). Then one real optimizer step runs on vLLM samples.
Sizes: 4 prompts x 4 completions of at most 8 tokens of the built-in task in non-reasoning mode: the
base model puts a label first in most completions there (on `verdicts`, in 1 of 16; in reasoning
mode it never closes </think>), so the decisions compared are mostly valid ones.
"""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch

from decal.errors import ConfigError
from decal.tasks import load_task
from decal.training.config import TrainConfig
from decal.training.grpo import DecalGRPOConfig, build_grpo_trainer
from decal.training.vllm_sampler import ADAPTERS_DIR, VLLMSampler, group_prompts

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vllm is not installed")

G = 4  # completions per prompt


def _args(out, **overrides) -> DecalGRPOConfig:
    base = dict(output_dir=str(out), per_device_train_batch_size=16, num_generations=G, max_completion_length=8,
                max_steps=1, learning_rate=1e-3, temperature=1.0, bf16=False, use_cpu=True,
                gradient_checkpointing=False, report_to="none", logging_steps=1, save_strategy="no",
                reasoning=False, seed=0)
    base.update(overrides)
    return DecalGRPOConfig(**base)


def _lora():
    from peft import LoraConfig

    # dropout 0: the sampler (vLLM) and the trainer then compute the same distribution
    return LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _trainer(out, sampler=None):
    from decal.models import load_model

    model, tokenizer = load_model("smollm2-135m-instruct", dtype="float32")
    task = load_task("builtin", "train", n=4, reasoning=False)
    return build_grpo_trainer(model=model, tokenizer=tokenizer, task=task, args=_args(out), peft_config=_lora(),
                              sampler=sampler)


def _inputs(trainer):
    rows = [trainer.train_dataset[i] for i in range(len(trainer.train_dataset))]
    return [row for row in rows for _ in range(G)]  # TRL's layout: each prompt G times in a row


def _nudge_lora(model):
    # a new adapter has lora_B = 0; random values make the served adapter change the outputs
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.add_(0.02 * torch.randn(param.shape, generator=g))


@pytest.mark.slow
def test_vllm_sampling_matches_the_hf_path_on_the_same_completions_and_trains_a_step(tmp_path, smollm2):
    sampler = VLLMSampler(model="smollm2-135m-instruct", out_dir=tmp_path / "v", seed=0,
                          engine_args={"kv_cache_memory_bytes": 1 << 30})
    on_vllm = _trainer(tmp_path / "v", sampler)
    on_hf = _trainer(tmp_path / "h")
    try:
        assert sampler.step == 0  # the engine started with the trainer, serving the initial adapter
        _nudge_lora(on_vllm.model)
        on_hf.model.load_state_dict(on_vllm.model.state_dict())
        sampler.sync(on_vllm.model, 0)  # serve the nudged adapter
        on_vllm.model.train(), on_hf.model.train()  # as in a training step (TRL logs under "train")
        inputs = _inputs(on_vllm)
        out_v = on_vllm._generate_and_score_completions(inputs)
        decisions_v = list(on_vllm.decision_reward.last_decisions)
        assert sampler.step == 0 and (tmp_path / "v" / ADAPTERS_DIR / "step-0" / "adapter_config.json").is_file()
        completions = [c[m.bool()].tolist() for c, m in zip(out_v["completion_ids"], out_v["completion_mask"])]
        assert len(completions) == 4 * G and all(0 < len(c) <= 8 for c in completions)

        # the hf path on the very same completions
        on_hf._generate_single_turn = lambda prompt_ids, *a, **k: (completions, None)
        out_h = on_hf._generate_and_score_completions(inputs)
        for key in ("completion_ids", "completion_mask", "decision_index", "decision_option", "decision_gold"):
            assert torch.equal(out_v[key], out_h[key]), key
        assert on_hf.decision_reward.last_decisions == decisions_v
        assert on_vllm._metrics["train"]["reward"] == on_hf._metrics["train"]["reward"]
        # rewards are equal row by row: the advantages derived from them are the same numbers
        assert torch.allclose(out_v["advantages"], out_h["advantages"], atol=0, rtol=0)
        valid = [d.valid for d in decisions_v]
        assert sum(valid) >= 4, "too few valid first-token decisions to compare"

        # sampler vs trainer: the log-probabilities of the sampled tokens. Both are float32 over a
        # 49,152-token softmax through 30 layers; different kernels (oneDNN vs ATen) round
        # differently, by ~1e-5 relative per matmul, measured at most ~2e-3 nats per token here;
        # 2e-2 leaves room and still fails on a wrong token, position or adapter (> 0.1 nats).
        mask = out_v["completion_mask"].bool()
        gap = (out_v["old_per_token_logps"] - out_v["sampling_per_token_logps"]).abs()[mask]
        assert gap.max().item() < 2e-2, gap.max().item()
        ratio = out_v["importance_sampling_ratio"]
        assert torch.all((ratio - 1).abs() < 0.2)
        assert "old_per_token_logps" not in out_h  # the hf path samples on-policy: no correction

        # one real optimizer step on vLLM samples: finite loss, the LoRA weights move
        before = {n: p.detach().clone() for n, p in on_vllm.model.named_parameters() if p.requires_grad}
        on_vllm.train()
        logged = [e for e in on_vllm.state.log_history if "loss" in e]
        assert logged and math.isfinite(logged[0]["loss"])
        assert any("importance_sampling_ratio" in k for k in logged[0]), sorted(logged[0])
        moved = [n for n, p in on_vllm.model.named_parameters() if p.requires_grad and not torch.equal(p, before[n])]
        assert moved, "no LoRA parameter changed"
    finally:
        sampler.close()
    assert not (tmp_path / "v" / ADAPTERS_DIR).exists()


def test_grouping_keeps_trls_row_layout():
    assert group_prompts([[1], [1], [2], [2]], 2) == [[1], [2]]
    assert group_prompts([[1], [2], [1], [2]], 2) is None  # not grouped: sampled one completion per row
    assert group_prompts([[1], [1], [1]], 2) is None


@pytest.mark.parametrize("values, match", [
    ({"method": "sft", "engine": "vllm"}, "samples nothing"),
    ({"method": "grpo", "engine": "vllm", "use_vllm": True}, "two routes"),
    ({"method": "grpo", "engine": "tpu"}, "Unknown `engine`"),
])
def test_engine_config_errors_are_one_line(values, match):
    with pytest.raises(ConfigError, match=match):
        TrainConfig(**values)
