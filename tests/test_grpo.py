"""GRPO and calibration-aware GRPO on TRL 1.16 with the tiny random Qwen3 (issues #5 item 3, #6).

Sizes are shrunk for a 2-core CPU: 4 prompts x 2 generations (the smallest batch with groups
that can disagree), completions of at most 6-8 tokens (the decision is the first token in
non-reasoning mode), LoRA rank 4, one or two steps.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from conftest import build_tiny_qwen3
from decal.errors import ConfigError
from decal.tasks.schema import DecisionExample, PromptTemplate, Task
from decal.training import _trl_compat
from decal.training.grpo import DecalGRPOConfig, DecalGRPOTrainer, build_grpo_trainer, grpo_dataset
from decal.training.losses import decision_ce

LABELS = ("Safe", "Unsafe")
TEMPLATE = PromptTemplate(
    name="toy",
    version="1",
    non_reasoning="Is this safe? {input}\nAnswer {labels}.",
    reasoning="Is this safe? {input}\nThink, then answer {labels}.",
)


def _task(n: int = 4) -> Task:
    examples = tuple(
        DecisionExample(id=f"ex-{i}", labels=LABELS, label=LABELS[i % 2], input=f"message number {i}") for i in range(n)
    )
    return Task(name="toy", split="train", examples=examples, template=TEMPLATE)


def _args(tmp_path, **overrides) -> DecalGRPOConfig:
    base = dict(
        output_dir=str(tmp_path / "out"),
        per_device_train_batch_size=4,  # 2 prompts x 2 generations per step
        num_generations=2,
        max_completion_length=6,  # non-reasoning: the decision is token 0; a few more show the mask
        max_steps=1,
        learning_rate=5e-2,  # large so one step visibly moves a rank-4 LoRA
        temperature=1.0,
        bf16=False,  # CPU fp32 (docs/design.md, "Measured costs": train in fp32)
        use_cpu=True,
        gradient_checkpointing=False,  # tiny model: recomputation only costs time
        report_to="none",
        logging_steps=1,
        save_strategy="no",
        reasoning=False,
        seed=0,
    )
    base.update(overrides)
    return DecalGRPOConfig(**base)


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _option_bias(tokenizer, value: float = 14.0) -> dict:
    # A random model spreads its mass over 151k tokens (entropy ~ln V), so it would almost never
    # emit a decision token; a generation-time bias makes both options likely, which gives groups
    # with right and wrong rollouts. The bias only affects sampling, not the training logps.
    return {"sequence_bias": [[[tokenizer.convert_tokens_to_ids(t)], value] for t in LABELS]}


@pytest.fixture()
def tiny(qwen3_tokenizer):
    return build_tiny_qwen3(qwen3_tokenizer, seed=0), qwen3_tokenizer


@pytest.fixture()
def tiny64(qwen3_tokenizer):
    """The tiny Qwen3 in float64, for the exactness test of the loss (issue #20 item 7)."""
    return build_tiny_qwen3(qwen3_tokenizer, seed=0).to(torch.float64), qwen3_tokenizer


# --- TRL private API, config, dataset -------------------------------------------------------


def test_trl_private_api_is_what_decal_relies_on():
    import trl
    from trl import GRPOTrainer

    _trl_compat.check_trl()
    assert trl.__version__ == _trl_compat.TRL_VERSION
    for name, params in _trl_compat.HOOK_SIGNATURES.items():
        assert tuple(inspect.signature(getattr(GRPOTrainer, name)).parameters)[: len(params)] == params
    source = inspect.getsource(GRPOTrainer._generate_and_score_completions)
    for key in _trl_compat.GENERATION_KEYS:
        assert f'"{key}": ' in source, key
    # the base accepts (B, T) advantages: it only unsqueezes 1-D ones
    assert "if advantages.dim() == 1:" in inspect.getsource(GRPOTrainer._compute_loss)
    assert "current_gradient_accumulation_steps" in inspect.getsource(GRPOTrainer._compute_loss)
    from trl.trainer import utils

    assert _trl_compat._COMPACT_SOURCE in inspect.getsource(utils.add_fused_lm_head)


def test_fused_head_projects_only_the_scored_positions_on_a_cpu(tiny, monkeypatch):
    """TRL's fused head under `completion_positions_only`: the same log-probs from the scored rows only (issue #13)."""
    from trl.trainer import utils

    model, _ = tiny
    utils.add_fused_lm_head(model)
    seen, original = [], utils._ChunkedLogProbFunction

    class Counting:  # what the fused forward calls, counting the hidden-state rows it projects
        @staticmethod
        def apply(hidden, *args):
            seen.append(hidden.shape[0])
            return original.apply(hidden, *args)

    input_ids = torch.randint(0, 1000, (2, 12), generator=torch.Generator().manual_seed(0))
    labels = input_ids.clone()
    labels[:, :-3] = -100  # 3 scored tokens per row, as TRL labels the completion
    with monkeypatch.context() as patch:
        patch.setattr(utils, "_ChunkedLogProbFunction", Counting)
        full = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs  # (2, 11)
        with _trl_compat.completion_positions_only():
            compact = model(input_ids=input_ids, labels=labels, fused_lm_head=True).log_probs
    assert seen == [2 * 11, 2 * 3]  # every shifted position, then only the scored ones
    assert torch.allclose(full, compact, rtol=1e-5, atol=1e-6) and full[:, -3:].abs().min() > 0
    assert (compact[:, :-3] == 0).all()


@pytest.mark.parametrize(
    "overrides, match",
    [(dict(cal_lambda=-0.1), "cal_lambda"), (dict(cal_lambda=float("nan")), "cal_lambda"), (dict(cal_target="entropy"), "Unknown cal_target")],
)
def test_config_rejects_bad_calibration_options(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        _args(tmp_path, calibration=True, **overrides)


def test_config_defaults_follow_the_paper(tmp_path):
    args = _args(tmp_path)
    assert (args.loss_type, args.beta, args.epsilon, args.cal_lambda, args.cal_target) == ("bnpo", 0.0, 0.2, 0.001, "uniform")


def test_grpo_dataset_holds_rendered_prompts(qwen3_tokenizer):
    ds = grpo_dataset(_task(3), qwen3_tokenizer, reasoning=False)
    assert ds.column_names == ["prompt", "id", "label", "labels", "option_token_ids"]
    assert ds[0]["option_token_ids"] == list(qwen3_tokenizer.convert_tokens_to_ids(list(LABELS)))
    assert ds[1]["label"] == "Unsafe" and ds[1]["labels"] == list(LABELS)
    assert ds[0]["prompt"].startswith("<|im_start|>user\nIs this safe? message number 0")
    assert ds[0]["prompt"].endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_grpo_dataset_rejects_mixed_label_sets(qwen3_tokenizer):
    ex = list(_task(2).examples) + [DecisionExample(id="odd", labels=("A", "B"), label="A", input="x")]
    task = Task(name="toy", split="train", examples=tuple(ex), template=TEMPLATE)
    with pytest.raises(ValueError, match="one label set"):
        grpo_dataset(task, qwen3_tokenizer)


def test_prompts_over_a_limit_stop_the_build_naming_the_example(tiny, tmp_path):
    from decal.training.memory import PromptTooLongError

    model, tok = tiny
    task = _task(4)
    task = Task(name="toy", split="train", template=TEMPLATE, examples=task.examples[:3] + (
        DecisionExample(id="long-one", labels=LABELS, label="Safe", input="word " * 40),))
    prompts = list(grpo_dataset(task, tok, reasoning=False)["prompt"])
    lengths = [len(ids) for ids in tok(text=prompts)["input_ids"]]
    short, longest = max(lengths[:3]), lengths[3]
    with pytest.raises(PromptTooLongError, match=f"^example 'long-one' has a prompt of {longest} tokens, over "
                       f"`max_prompt_length` \\({short} tokens\\)\\. Raise --max-prompt-length"):
        build_grpo_trainer(model=model, tokenizer=tok, task=task, args=_args(tmp_path), peft_config=_lora(),
                           max_prompt_length=short)
    # the prompt and max_completion_length tokens must fit in the model's context (2048 for the tiny Qwen3)
    context = model.config.max_position_embeddings
    with pytest.raises(PromptTooLongError, match=f"^example 'long-one' has a prompt of {longest} tokens, too long to "
                       f"fit with {context - short} completion tokens in the model's context of {context} tokens\\."):
        build_grpo_trainer(model=model, tokenizer=tok, task=task, args=_args(tmp_path, max_completion_length=context - short),
                           peft_config=_lora())


# --- the exact loss on a hand-made batch ----------------------------------------------------


# Four completions per mode: correct, wrong, invalid (no decision), correct; DECISIONS gives
# the decision index of each valid row (rows 0, 1, 3), written by hand from the ids below.
DECISIONS = {False: [0, 0, 0], True: [4, 3, 4]}
GOLD = ["Safe", "Unsafe", "Safe", "Unsafe"]
ADVANTAGES = [1.0, -1.0, -0.5, 0.7]


def _hand_completions(tokenizer, reasoning: bool):
    tid = tokenizer.convert_tokens_to_ids
    safe, unsafe, eos, pad, hello = tid("Safe"), tid("Unsafe"), tid("<|im_end|>"), tokenizer.pad_token_id, tid("Hello")
    if not reasoning:  # the decision is the first token
        ids = [[safe, eos, pad, pad, pad, pad], [safe, hello, hello, eos, pad, pad],
               [hello, hello, hello, hello, hello, hello], [unsafe, unsafe, safe, eos, pad, pad]]
        mask = [[1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1] * 6, [1, 1, 1, 1, 0, 0]]
    else:  # the first non-whitespace token after </think>
        think, end, nl = tid("<think>"), tid("</think>"), tokenizer.encode("\n\n")[0]
        ids = [[think, hello, end, nl, safe, eos], [think, end, nl, safe, eos, pad],
               [think, hello, hello, hello, hello, hello], [think, hello, hello, end, unsafe, eos]]
        mask = [[1] * 6, [1, 1, 1, 1, 1, 0], [1] * 6, [1] * 6]
    return torch.tensor(ids), torch.tensor(mask)


def _hand_batch(trainer, tokenizer, reasoning: bool = False, gold=GOLD):
    """A generation batch as `_generate_and_score_completions` would hand it to the loss."""
    pad = tokenizer.pad_token_id
    prompt_ids = torch.tensor([[pad, 40, 41, 42], [43, 44, 45, 46], [pad, pad, 47, 48], [49, 50, 51, 52]])
    prompt_mask = (prompt_ids != pad).long()
    completion_ids, completion_mask = _hand_completions(tokenizer, reasoning)
    # the reward parses the same rows, as TRL calls it inside generation
    trainer.decision_reward(completion_ids=[c[m.bool()].tolist() for c, m in zip(completion_ids, completion_mask)], label=list(gold))
    batch = {
        "prompt_ids": prompt_ids,
        "prompt_mask": prompt_mask,
        "completion_ids": completion_ids,
        "completion_mask": completion_mask,
        "advantages": torch.tensor(ADVANTAGES),
        "num_items_in_batch": completion_mask.sum(),
    }
    return trainer._add_decisions(batch)


def _independent_loss(model, batch, *, lam, eps, accum, old_shift, decisions):
    """Teacher-forced forward with full logits -> bnpo loss with A_d = 0, plus lam * CE at d."""
    p = batch["prompt_ids"].size(1)
    input_ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
    attention = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
    logits = model(input_ids=input_ids, attention_mask=attention).logits[:, p - 1 : -1]  # (B, T, V)
    logps = torch.log_softmax(logits, -1).gather(2, batch["completion_ids"].unsqueeze(2)).squeeze(2)  # (B, T)
    old = logps.detach() + old_shift
    ratio = torch.exp(logps - old)
    adv = torch.tensor(ADVANTAGES).unsqueeze(1).expand_as(logps).clone()
    valid_rows, d = torch.tensor([0, 1, 3]), torch.tensor(decisions)
    adv[valid_rows, d] = 0.0
    per_token = -torch.min(ratio * adv, torch.clamp(ratio, 1 - eps, 1 + eps) * adv)
    mask = batch["completion_mask"].float()
    grpo = (per_token * mask).sum() / mask.sum() / accum
    # q: one-hot on gold when correct (rows 0, 3), uniform when wrong (row 1); row 2 has no CE
    q = torch.tensor([[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 1.0]])
    ids = batch["option_token_ids"][0]
    rows_d = torch.tensor([decisions[0], decisions[1], 0, decisions[2]])
    ce = decision_ce(logits[torch.arange(4), rows_d], ids, q)
    return grpo + lam * ce / accum, grpo, ce


def _trainer(tiny, tmp_path, **overrides):
    model, tok = tiny
    return build_grpo_trainer(model=model, tokenizer=tok, task=_task(), args=_args(tmp_path, **overrides), peft_config=_lora())


def _perturb_lora(model, seed=1):
    # LoRA B starts at zero; give it values so the adapter contributes to the gradients compared
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=g))


# The trainer's loss against `_independent_loss`, in float64 (issue #20 item 7): the backbone, the
# decision CE and the reference are float64 (u = 1.1e-16), so their sums in other orders agree to far
# below the tolerances. What stays float32 is TRL's fused log-prob kernel (trl/kernels/chunked_logprob.py
# keeps its softmax normaliser in float32 whatever the input), which the trainer uses and the reference
# does not: each completion token's log-prob is off by about log2(V) * u32 = 18 * 6e-8 = 1e-6, so the
# loss by a relative 1e-6 or less and the gradients likewise (measured: loss 2e-8, gradients 9e-7 in
# norm). rel 1e-5 and rtol 1e-4 leave 10-100x; a zeroed advantage at another position or a CE at the
# wrong token moves the loss by more than 1e-3.
@pytest.mark.parametrize("lam, reasoning", [(0.5, False), (0.5, True), (0.0, True)])
def test_trainer_loss_equals_grpo_with_zeroed_decision_advantage_plus_lambda_ce(tiny64, tmp_path, lam, reasoning):
    tiny = tiny64
    trainer = _trainer(tiny, tmp_path, calibration=True, cal_lambda=lam, reasoning=reasoning)
    model = trainer.model
    _perturb_lora(model)
    model.train()
    trainer.current_gradient_accumulation_steps = 2  # set by Trainer's loop; exercises the scaling
    batch = _hand_batch(trainer, tiny[1], reasoning=reasoning)
    decisions = DECISIONS[reasoning]
    assert batch["decision_index"].tolist() == [decisions[0], decisions[1], -1, decisions[2]]
    assert batch["advantages"].shape == batch["completion_ids"].shape
    expected_adv = torch.tensor(ADVANTAGES).unsqueeze(1).expand(-1, 6).clone()
    expected_adv[[0, 1, 3], decisions] = 0.0  # zeroed at d for valid rows only
    assert torch.equal(batch["advantages"], expected_adv)
    assert batch["decision_targets"].tolist() == [[1.0, 0.0], [0.5, 0.5], [0.0, 0.0], [0.0, 1.0]]
    # old logps = current logps + shift, so the ratio and the clipping are exercised
    shift = 0.3 * torch.randn(batch["completion_ids"].shape, generator=torch.Generator().manual_seed(2))
    p = batch["prompt_ids"].size(1)
    with torch.no_grad():
        ids = torch.cat([batch["prompt_ids"], batch["completion_ids"]], 1)
        att = torch.cat([batch["prompt_mask"], batch["completion_mask"]], 1)
        cur = torch.log_softmax(model(input_ids=ids, attention_mask=att).logits[:, p - 1 : -1], -1)
        batch["old_per_token_logps"] = cur.gather(2, batch["completion_ids"].unsqueeze(2)).squeeze(2) + shift

    params = [q for q in model.parameters() if q.requires_grad]
    loss = _trl_compat.compute_loss(trainer, model, batch)
    grads = torch.autograd.grad(loss, params)
    expected, grpo_only, ce = _independent_loss(model, batch, lam=lam, eps=0.2, accum=2.0, old_shift=shift, decisions=decisions)
    expected_grads = torch.autograd.grad(expected, params)
    assert loss.dtype == expected.dtype == ce.dtype == torch.float64
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert ce.item() > 0
    if lam:
        assert abs(expected.item() - grpo_only.item()) > 1e-3  # the CE term is really there
    assert len(grads) == len(expected_grads) > 0
    for g, e in zip(grads, expected_grads, strict=True):
        assert torch.allclose(g, e, rtol=1e-4, atol=1e-7)
    metrics = trainer._metrics["train"]
    assert metrics["cal/ce"][-1] == pytest.approx(ce.item(), rel=1e-5)
    assert 0 < metrics["decision/prob_correct"][-1] < 1 and 0 < metrics["decision/prob_wrong"][-1] < 1


def _decision_hidden_grad(trainer, batch):
    """Gradient of the loss w.r.t. the final hidden states, (B, L, H)."""
    model = trainer.model
    backbone = _trl_compat.backbone(trainer, model)
    kept = {}

    def hook(module, args, output):
        output.last_hidden_state.retain_grad()
        kept["h"] = output.last_hidden_state

    handle = backbone.register_forward_hook(hook)
    try:
        _trl_compat.compute_loss(trainer, model, batch).backward()
    finally:
        handle.remove()
    return kept["h"].grad


@pytest.mark.parametrize("calibration, lam, decision_grad", [(True, 0.0, False), (True, 0.5, True), (False, 0.001, True)])
def test_decision_position_gradient(tiny, tmp_path, calibration, lam, decision_grad):
    trainer = _trainer(tiny, tmp_path, calibration=calibration, cal_lambda=lam, reasoning=True)
    trainer.model.train()
    trainer.current_gradient_accumulation_steps = 1
    batch = _hand_batch(trainer, tiny[1], reasoning=True)
    grad = _decision_hidden_grad(trainer, batch)  # (B, L, H)
    p = batch["prompt_ids"].size(1)
    rows, d = [0, 1, 3], torch.tensor(DECISIONS[True])
    at_decision = grad[rows, p + d - 1].abs().sum()  # the hidden states that score the decision tokens
    before = grad[rows, p + d - 2].abs().sum()  # the reasoning token before it keeps its advantage
    assert before > 0
    assert (at_decision > 0) == decision_grad
    assert grad[2, p + 3].abs().sum() > 0  # the invalid row keeps its advantage at every token


def test_group_accuracy_targets_use_the_share_of_correct_rollouts_per_group(tiny, tmp_path):
    trainer = _trainer(tiny, tmp_path, calibration=True, cal_target="group-accuracy")
    trainer.model.train()
    # groups of 2 (num_generations): rows (0, 1) and (2, 3)
    assert trainer._group_accuracy(torch.tensor([True, False, True, True])).tolist() == [0.5, 0.5, 1.0, 1.0]
    # rows emit Safe, Safe, nothing, Unsafe; gold Safe, Safe, Unsafe, Unsafe
    batch = _hand_batch(trainer, tiny[1], gold=["Safe", "Safe", "Unsafe", "Unsafe"])
    # group (0, 1): a = 1 -> all mass on the emitted option; group (2, 3): a = 0.5 = 1/K
    assert batch["decision_targets"].tolist() == [[1.0, 0.0], [1.0, 0.0], [0.0, 0.0], [0.5, 0.5]]
    batch = _hand_batch(trainer, tiny[1], gold=["Unsafe", "Unsafe", "Unsafe", "Safe"])
    # all wrong: a = 0 -> max(0, 1/K) = 0.5 on the emitted option
    assert batch["decision_targets"].tolist() == [[0.5, 0.5], [0.5, 0.5], [0.0, 0.0], [0.5, 0.5]]


# --- a few real training steps --------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize("calibration, beta", [(False, 0.0), (True, 0.05)])  # GRPO; cal-GRPO with the KL variant
def test_training_steps_change_lora_and_save_an_adapter(tiny, tmp_path, calibration, beta):
    model, tok = tiny
    args = _args(tmp_path, max_steps=2, calibration=calibration, beta=beta, generation_kwargs=_option_bias(tok))
    trainer = build_grpo_trainer(model=model, tokenizer=tok, task=_task(), args=args, peft_config=_lora())
    assert isinstance(trainer, DecalGRPOTrainer)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad and "lora_B" in n}
    trainer.train()
    changed = [n for n, p in trainer.model.named_parameters() if n in before and not torch.equal(p, before[n])]
    assert changed, "no LoRA parameter changed"
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 2 and all(math.isfinite(h["loss"]) for h in logs)
    for key in ("decision/invalid_rate", "decision/frac_prob_above_0.99"):
        assert all(key in h for h in logs), key
    assert any("decision/prob_correct" in h or "decision/prob_wrong" in h for h in logs)
    assert all(("cal/ce" in h) == calibration for h in logs)
    assert all(("kl" in h) == (beta > 0) for h in logs)  # the KL variant runs against the adapter-free base
    assert all(h["decision/invalid_rate"] < 1.0 for h in logs)
    trainer.save_model(str(tmp_path / "adapter"))
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert (tmp_path / "adapter" / "adapter_config.json").exists()


@pytest.mark.slow
def test_generation_runs_in_chunks_of_one_micro_batch(tiny, tmp_path, monkeypatch):
    """A generation batch of micro-batch x grad-accum rows is generated one micro-batch at a time (issue #13)."""
    from transformers import Qwen3ForCausalLM

    model, tok = tiny
    calls, original = [], Qwen3ForCausalLM.generate

    def generate(self, *args, **kwargs):
        calls.append(kwargs["input_ids"].shape[0])
        return original(self, *args, **kwargs)

    monkeypatch.setattr(Qwen3ForCausalLM, "generate", generate)
    # 2 prompts x 2 generations per step, micro-batches of 2 completions, 2 accumulation steps
    args = _args(tmp_path, per_device_train_batch_size=2, gradient_accumulation_steps=2, num_generations=2,
                 max_completion_length=4, max_steps=1, generation_kwargs=_option_bias(tok))
    trainer = build_grpo_trainer(model=model, tokenizer=tok, task=_task(), args=args, peft_config=_lora())
    trainer.train()
    assert calls == [2, 2]
    logs = [h for h in trainer.state.log_history if "reward" in h]
    assert len(logs) == 1 and math.isfinite(logs[0]["loss"]) and logs[0]["decision/invalid_rate"] < 1.0


_TWO_PROCESS_SCRIPT = '''
import sys
sys.path.insert(0, {tests!r})
from conftest import build_tiny_qwen3
from test_grpo import _args, _lora, _option_bias, _task
from pathlib import Path
from transformers import AutoTokenizer
from decal.training.grpo import build_grpo_trainer

tok = AutoTokenizer.from_pretrained({tokenizer!r})
# 2 processes x 2 rows x 2 accumulation steps with groups of 4: groups span both processes, so
# the group-accuracy targets need the cross-process gather
args = _args(Path({tmp!r}), per_device_train_batch_size=2, num_generations=4, max_completion_length=4,
             max_steps=1, gradient_accumulation_steps=2, calibration=True, cal_target="group-accuracy", generation_kwargs=_option_bias(tok))
trainer = build_grpo_trainer(model=build_tiny_qwen3(tok), tokenizer=tok, task=_task(), args=args, peft_config=_lora())
trainer.train()
trainer.save_model({tmp!r} + "/adapter")
# rank r holds rows [r, r] of one group of 4 (rank 0 wrong, rank 1 right): the share is 0.5 on both
import torch
share = trainer._group_accuracy(torch.full((2,), trainer.accelerator.process_index, dtype=torch.bool))
# one file per rank: two processes printing to one pipe can interleave their lines
import json
rank = trainer.accelerator.process_index
with open({tmp!r} + f"/rank{{rank}}.json", "w") as f:
    json.dump({{"share": share.tolist(), "world": trainer.accelerator.num_processes, "rank": rank,
               "loss": trainer.state.log_history[0]["loss"], "ce": trainer.state.log_history[0].get("cal/ce")}}, f)
# as decal.training.runner.train does: exiting with the gloo group alive can abort the process
trainer.accelerator.end_training()
'''


@pytest.mark.slow
def test_two_process_cpu_run_with_gloo(tmp_path, qwen3_tokenizer_dir):
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = str(Path(__file__).parent)
    script = tmp_path / "two.py"
    script.write_text(_TWO_PROCESS_SCRIPT.format(tests=tests, tokenizer=str(qwen3_tokenizer_dir), tmp=str(tmp_path)))
    accelerate = Path(sys.executable).with_name("accelerate")
    # --multi_gpu picks torchrun's launcher; with no GPU, accelerate falls back to CPU and gloo
    # (`--cpu` alone starts one process)
    cmd = [str(accelerate), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", str(script)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [w["rank"] for w in ranks] == [0, 1] and all(w["world"] == 2 for w in ranks)
    assert all(math.isfinite(w["loss"]) and math.isfinite(w["ce"]) for w in ranks)
    assert (tmp_path / "adapter" / "adapter_model.safetensors").exists()
    assert [w["share"] for w in ranks] == [[0.5, 0.5]] * 2
