"""Decision-token SFT: rows, the label mask, the loss value, and a short training run on the tiny Qwen3."""

from __future__ import annotations

import math

import pytest
import torch

from decal.decision import option_token_ids
from decal.tasks.builtin import load_builtin
from decal.tasks.prompts import render_chat
from decal.tasks.schema import DecisionExample, PromptTemplate, Task
from decal.training.sft import IGNORE_INDEX, DecisionTokenCollator, build_sft_trainer, sft_rows


@pytest.fixture(scope="module")
def small_task():
    return load_builtin("train", difficulty=0, n=8)


def _varied_task(n: int = 8) -> Task:
    """Prompts of n different lengths (the built-in task's are all alike), both labels."""
    template = PromptTemplate(name="toy", version="1", non_reasoning="Is this message safe? {input}\nAnswer {labels}.",
                              reasoning="Is this message safe? {input}\nThink, then answer {labels}.")
    words = "the quick brown fox jumps over a lazy dog while it rains".split()
    examples = tuple(DecisionExample(id=f"ex-{i}", labels=("Safe", "Unsafe"), label=("Safe", "Unsafe")[i % 2],
                                     input=" ".join(words[: 1 + (3 * i) % len(words)])) for i in range(n))
    return Task(name="toy", split="train", examples=examples, template=template)


def test_rows_are_prompt_then_gold_decision_token(small_task, qwen3_tokenizer):
    rows = sft_rows(small_task, qwen3_tokenizer)
    assert len(rows) == len(small_task)
    for row, example in zip(rows, small_task.examples, strict=True):
        prompt = render_chat(qwen3_tokenizer, small_task.template.user_message(example, reasoning=False),
                             reasoning=False)
        prompt_ids = qwen3_tokenizer(prompt, add_special_tokens=False)["input_ids"]
        gold = option_token_ids(qwen3_tokenizer, example.labels, context=prompt).token_ids[example.label_index]
        assert row["input_ids"] == list(prompt_ids) + [gold]
        assert row["target_id"] == gold and row["length"] == len(prompt_ids) + 1
    # both labels occur, so the test would catch a constant target
    assert len({r["target_id"] for r in rows}) == 2


def test_prompt_truncation_keeps_the_end(small_task, qwen3_tokenizer):
    full = sft_rows(small_task, qwen3_tokenizer)
    cut = sft_rows(small_task, qwen3_tokenizer, max_prompt_length=10, truncate_prompts=True)
    for a, b in zip(full, cut, strict=True):
        assert len(b["input_ids"]) == 11
        assert b["input_ids"] == a["input_ids"][-11:]


def test_a_prompt_over_the_limit_is_an_error_naming_the_longest(qwen3_tokenizer):
    from decal.errors import DecalError
    from decal.training.memory import PromptTooLongError

    small_task = _varied_task()
    rows = sft_rows(small_task, qwen3_tokenizer)
    lengths = sorted((r["length"] - 1, r["id"]) for r in rows)
    longest, longest_id = lengths[-1]  # ties: the last id among the longest
    limit = lengths[0][0]
    n_over = sum(n > limit for n, _ in lengths)
    assert 1 < n_over < len(rows)
    with pytest.raises(PromptTooLongError) as e:
        sft_rows(small_task, qwen3_tokenizer, max_prompt_length=limit)
    message = str(e.value)
    assert isinstance(e.value, DecalError) and "\n" not in message
    assert message.startswith(f"example {longest_id!r} has a prompt of {longest} tokens, over `max_prompt_length` "
                              f"({limit} tokens) ({n_over} of {len(rows)} prompts are).")
    assert "--truncate-prompts" in message
    assert len(sft_rows(small_task, qwen3_tokenizer, max_prompt_length=longest)) == len(rows)  # at the limit: fine
    # the model's context must hold the prompt and the decision token
    with pytest.raises(PromptTooLongError, match=f"example {longest_id!r} has a prompt of {longest} tokens, too long "
                       f"to fit with the decision token in the model's context of {longest} tokens"):
        sft_rows(small_task, qwen3_tokenizer, context=longest)
    assert len(sft_rows(small_task, qwen3_tokenizer, context=longest + 1)) == len(rows)
    with pytest.raises(ValueError, match="`truncate_prompts` needs `max_prompt_length`"):
        sft_rows(small_task, qwen3_tokenizer, truncate_prompts=True)


def test_collator_left_pads_the_prompts_and_labels_the_decision():
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}, {"input_ids": [11, 12, 13]}]
    batch = DecisionTokenCollator(pad_token_id=0)(rows)
    # the gold token (last id) is not fed: the last column's logits predict it
    assert batch["input_ids"].tolist() == [[5, 6, 7], [0, 0, 9], [0, 11, 12]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1], [0, 1, 1]]
    assert batch["position_ids"].tolist() == [[0, 1, 2], [0, 0, 0], [0, 0, 1]]
    assert batch["labels"].tolist() == [[8], [10], [13]]
    assert batch["shift_labels"] is batch["labels"]


def test_full_logits_collator_keeps_only_the_decision_label():
    rows = [{"input_ids": [5, 6, 7, 8]}, {"input_ids": [9, 10]}, {"input_ids": [11, 12, 13]}]
    batch = DecisionTokenCollator(pad_token_id=0, loss_impl="full_logits")(rows)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8], [9, 10, 0, 0], [11, 12, 13, 0]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]
    expected = torch.full((3, 4), IGNORE_INDEX)
    expected[0, 3], expected[1, 1], expected[2, 2] = 8, 10, 13
    assert torch.equal(batch["labels"], expected)


def _args(tmp_path, **overrides):
    from transformers import TrainingArguments

    values = dict(output_dir=str(tmp_path), per_device_train_batch_size=4, gradient_accumulation_steps=1,
                  learning_rate=5e-3, max_steps=1, logging_steps=1, save_strategy="no", report_to="none",
                  remove_unused_columns=False, disable_tqdm=True, seed=0,
                  train_sampling_strategy="group_by_length", length_column_name="length")
    values.update(overrides)
    return TrainingArguments(**values)


def _fresh_model(tokenizer, seed=0):
    from conftest import build_tiny_qwen3

    return build_tiny_qwen3(tokenizer, seed=seed)


def learnable_tiny_qwen3(tokenizer, seed=0):
    """The tiny Qwen3 with its tied embeddings scaled up 25x (std 0.5 instead of 0.02).

    With the default init and a frozen final norm, no LoRA update can lift any logit above about
    1.3, so the loss is stuck near log(vocab); larger embeddings make the labels learnable.
    """
    model = _fresh_model(tokenizer, seed=seed)
    with torch.no_grad():
        model.get_input_embeddings().weight.mul_(25.0)
    return model


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear", task_type="CAUSAL_LM")


def _row_nll(model, row) -> torch.Tensor:
    """-log p(gold | prompt) from a forward pass of the row's prompt alone (no padding, full logits),
    in the model's dtype (at least float32)."""
    prompt = torch.tensor([row["input_ids"][:-1]])
    logits = model(input_ids=prompt).logits[0, -1]  # (V,)
    return -torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)[row["target_id"]]


def test_loss_is_the_decision_token_nll_only(qwen3_tokenizer, tmp_path):
    trainer = build_sft_trainer(model=_fresh_model(qwen3_tokenizer), tokenizer=qwen3_tokenizer, task=_varied_task(),
                                args=_args(tmp_path), peft_config=_lora())
    rows = [trainer.train_dataset[i] for i in range(4)]
    assert len({r["length"] for r in rows}) > 1  # the batch is padded
    batch = trainer.data_collator(rows)
    model = trainer.model.eval()
    with torch.no_grad():
        loss, outputs = trainer.compute_loss(model, dict(batch), return_outputs=True)
        expected = torch.stack([_row_nll(model, row) for row in rows]).mean()
        full = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits  # (B, T, V)
    assert outputs.logits.shape == (4, 1, full.size(-1))  # only the decision position reached the head
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # a loss over all tokens would differ: the random model is far from uniform-free on the prompt
    all_tokens = torch.nn.functional.cross_entropy(full[:, :-1].reshape(-1, full.size(-1)),
                                                   batch["input_ids"][:, 1:].reshape(-1), reduction="mean")
    assert abs(all_tokens.item() - loss.item()) > 1e-3


class _Recorder:
    """Records each micro-batch loss and, at the optimizer step, the LoRA gradients."""

    def __init__(self, trainer):
        from transformers import TrainerCallback

        self.losses, self.grads, self.batches = [], None, []
        original = trainer.compute_loss
        recorder = self

        def compute_loss(model, inputs, **kwargs):
            recorder.batches.append(inputs["input_ids"].shape)
            loss = original(model, inputs, **kwargs)
            recorder.losses.append(loss.detach().double())
            return loss

        class _Grads(TrainerCallback):
            def on_pre_optimizer_step(self, args, state, control, **kwargs):
                recorder.grads = {n: p.grad.detach().clone() for n, p in trainer.model.named_parameters()
                                  if p.requires_grad}

        trainer.compute_loss = compute_loss
        trainer.add_callback(_Grads())


def _one_accumulated_step(model, tokenizer, task, tmp_path, loss_impl):
    """One optimizer step of grad-accum 2 (the task fills it) through Trainer.train(); returns the recorder."""
    args = _args(tmp_path / loss_impl, per_device_train_batch_size=len(task) // 2, gradient_accumulation_steps=2,
                 max_grad_norm=0.0, learning_rate=0.0)
    torch.manual_seed(0)  # PEFT draws the LoRA A init from the global generator
    trainer = build_sft_trainer(model=model, tokenizer=tokenizer, task=task, args=args, peft_config=_lora(),
                                loss_impl=loss_impl)
    _perturb_lora(trainer.model)
    recorder = _Recorder(trainer)
    trainer.train()
    return recorder, trainer


def _perturb_lora(model, seed=1):
    # LoRA B starts at zero; give it values so the adapter takes part in the gradients compared
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(0.05 * torch.randn(param.shape, generator=g))


# Exactness in float64 (issue #20 item 7). The two implementations sum in different orders (other
# paddings, a (B, 1, V) head against a (B, T, V) one): in float32 their LoRA gradients were 8.4e-5
# apart (relative) on SmolLM2 on an AMD EPYC with AVX512-BF16 and 1e-6 on the tiny Qwen3 here, so
# no float32 tolerance both holds on every CPU and catches a wrong position. In float64 (unit
# roundoff u = 1.1e-16) the deepest sum, over the vocabulary (V = 151,936) in the head's backward,
# is off by at most V * u = 1.7e-11 of its terms' magnitude; measured here 6e-16. transformers'
# float32 islands do not add to it: RoPE's cos/sin tables are element-wise float32 on the same
# positions in both paths (the same values), and the causal-LM loss, which rounds the logits to
# float32 (`ForCausalLMLoss`: `logits.float()`), is replaced by the float64 copy below. 1e-9 is
# 50x the worst-case bound; a decision read one position off changes the loss by about 1e-2.
EXACT_RTOL = 1e-9
# The logged loss against one unpadded row at a time: there the row's tokens sit at other absolute
# positions than in the left-padded batch, where RoPE's float32 cos/sin tables (u = 6e-8) are
# the likely cause (not verified): measured 4.8e-9 relative on an Intel Xeon with AVX512-BF16
# (passed at 1e-9 on AMD EPYC AVX2). 1e-6 still fails on a decision read one
# position off (about 1e-2).
ROW_RTOL = 1e-6


def _causal_lm_loss_float64(logits, labels, vocab_size, num_items_in_batch=None, ignore_index=IGNORE_INDEX,
                            shift_labels=None, **kwargs):
    """transformers' `ForCausalLMLoss` without its `logits.float()` (a rounding to float32 here)."""
    from transformers.loss.loss_utils import fixed_cross_entropy

    if shift_labels is None:
        labels = torch.nn.functional.pad(labels, (0, 1), value=ignore_index)
        shift_labels = labels[..., 1:].contiguous()
    return fixed_cross_entropy(logits.view(-1, vocab_size), shift_labels.view(-1).to(logits.device), num_items_in_batch,
                               ignore_index, **kwargs)


def test_float64_loss_is_transformers_causal_lm_loss():
    """The copy computes what transformers' loss does (on float32 logits, where `.float()` changes nothing)."""
    from transformers.loss.loss_utils import ForCausalLMLoss

    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 5, 11, generator=g)  # (B, T, V)
    labels = torch.randint(0, 11, (3, 5), generator=g)
    labels[0, :2] = IGNORE_INDEX
    for kwargs in ({}, {"num_items_in_batch": torch.tensor(7)}, {"shift_labels": labels[:, :1].clone()}):
        logits_in = logits[:, :1] if "shift_labels" in kwargs else logits
        assert torch.equal(_causal_lm_loss_float64(logits_in, labels, 11, **kwargs),
                           ForCausalLMLoss(logits_in, labels, 11, **kwargs))


def _exact(model):
    """`model` in float64 with the float64 causal-LM loss."""
    model = model.to(torch.float64)
    model.loss_function = _causal_lm_loss_float64
    return model


def _assert_same_step(build_model, tokenizer, task, tmp_path):
    """Decision-position SFT equals the full-logits implementation, in float64: micro-batch losses, their sum
    (the logged loss, the mean NLL over the examples of the effective batch) and every LoRA gradient."""
    new, trainer = _one_accumulated_step(_exact(build_model()), tokenizer, task, tmp_path, "decision")
    old, _ = _one_accumulated_step(_exact(build_model()), tokenizer, task, tmp_path, "full_logits")
    assert len(new.losses) == len(old.losses) == 2
    # the new path feeds the prompts only (one column less), the old one prompt + gold token
    assert [s[1] + 1 for s in new.batches] == [s[1] for s in old.batches]
    for a, b in zip(new.losses, old.losses, strict=True):
        assert a.item() == pytest.approx(b.item(), rel=EXACT_RTOL)
    model = trainer.model.eval()
    with torch.no_grad():  # LoRA unchanged (lr 0): the mean over the rows, one unpadded row at a time
        expected = torch.stack([_row_nll(model, row) for row in trainer.train_dataset]).mean()
    assert expected.dtype == torch.float64
    assert sum(new.losses).item() == pytest.approx(expected.item(), rel=ROW_RTOL)
    assert new.grads.keys() == old.grads.keys() and len(new.grads) > 0
    for name, g in new.grads.items():
        reference = old.grads[name]
        assert g.dtype == reference.dtype == torch.float64, name
        assert reference.norm() > 0, name
        assert ((g - reference).norm() / reference.norm()).item() < EXACT_RTOL, name


def test_decision_position_sft_equals_full_logits_on_tiny_qwen3(qwen3_tokenizer, tmp_path):
    _assert_same_step(lambda: _fresh_model(qwen3_tokenizer), qwen3_tokenizer, _varied_task(), tmp_path)


@pytest.mark.slow
def test_decision_position_sft_equals_full_logits_on_smollm2(smollm2, tmp_path):
    import copy

    model, tokenizer = smollm2

    def first_layers():
        # SmolLM2's real weights, tokenizer, tied head and Llama blocks, cut to its first 4 of 30 layers:
        # the two loss paths differ only after the last layer, so depth adds nothing to what is compared,
        # and in float64 the 30 layers took 81 s of the suite on an AVX2-only AMD EPYC (issue #20 item 10)
        copy_ = copy.deepcopy(model)
        copy_.model.layers = copy_.model.layers[:4]
        copy_.config.num_hidden_layers = 4
        return copy_

    # 2 micro-batches of 2: SmolLM2's chat template alone is about 120 tokens per prompt
    _assert_same_step(first_layers, tokenizer, _varied_task(4), tmp_path)


def test_auto_checkpointing_checkpoints_only_the_long_micro_batches(qwen3_tokenizer, tmp_path, monkeypatch):
    import decal.training.memory as memory

    task = _varied_task()
    widths = sorted({r["length"] - 1 for r in sft_rows(task, qwen3_tokenizer)})
    model = _fresh_model(qwen3_tokenizer)
    # a budget between the two micro-batches of 4 rows: only the one with the longer prompts exceeds it
    budget_tokens = 4 * (widths[0] + widths[-1]) // 2
    monkeypatch.setattr(memory, "checkpoint_budget_bytes", lambda device: budget_tokens * memory.activation_bytes_per_token(model))
    args = _args(tmp_path, gradient_accumulation_steps=2, gradient_checkpointing=True, learning_rate=0.0)
    trainer = build_sft_trainer(model=model, tokenizer=qwen3_tokenizer, task=task, args=args, peft_config=_lora(),
                                auto_checkpointing=True)
    seen = []
    layer = next(m for m in trainer.model.modules() if type(m).__name__ == "Qwen3DecoderLayer")
    layer.register_forward_pre_hook(lambda module, args: seen.append(module.gradient_checkpointing)
                                    if torch.is_grad_enabled() else None)
    recorder = _Recorder(trainer)
    trainer.train()
    shapes = [s[0] * s[1] for s in recorder.batches]
    # longest first (length-grouped); a checkpointed layer also runs again in the backward pass
    assert shapes[0] > budget_tokens >= shapes[1]
    assert seen[0] is True and seen[-1] is False and True in seen and False in seen


def test_remove_unused_columns_is_rejected(small_task, qwen3_tokenizer, tmp_path):
    with pytest.raises(ValueError, match="remove_unused_columns"):
        build_sft_trainer(model=_fresh_model(qwen3_tokenizer), tokenizer=qwen3_tokenizer, task=small_task,
                          args=_args(tmp_path, remove_unused_columns=True), peft_config=_lora())


def test_sft_loss_falls_and_only_lora_changes(qwen3_tokenizer, tmp_path):
    task = load_builtin("train", difficulty=0, n=16)
    trainer = build_sft_trainer(model=learnable_tiny_qwen3(qwen3_tokenizer), tokenizer=qwen3_tokenizer, task=task,
                                args=_args(tmp_path, max_steps=8, learning_rate=2e-2), peft_config=_lora())
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 8 and all(math.isfinite(v) for v in losses)
    # measured: about 27 -> 1 over these 8 steps as the model learns to answer with the labels
    assert sum(losses[-2:]) / 2 < 0.5 * sum(losses[:2]) / 2
    after = dict(trainer.model.named_parameters())
    changed = {n for n in before if not torch.equal(before[n], after[n].detach())}
    assert changed and all("lora_" in n for n in changed)
