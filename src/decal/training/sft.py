"""Supervised fine-tuning on the decision token: the loss is `-log p(gold | x)` at one position.

Each training row is the non-reasoning prompt (`render_chat(..., reasoning=False)`) followed by
the gold option's decision token (`decision.option_token_ids` in the prompt's context). The loss
of a row is the cross-entropy, over the full vocabulary, of the logits at the decision position
(docs/design.md, "Decision position": the first position after the prompt) against the gold decision token.

Only that position goes through the output head (issue #13 item 1): `DecisionTokenCollator`
left-pads the prompts (without the gold token), so every row's decision is predicted from the
last column, with position ids counted from each row's first real token; `DecisionTokenTrainer`
calls the model with ``logits_to_keep=1``, so the logits are (B, 1, V), never (B, T, V) (at
Qwen3's 151,936-token vocabulary, batch 32 x 512 tokens, those were 10 GB in float32). The gold
tokens travel as ``labels`` / ``shift_labels`` of shape (B, 1), aligned with the kept logits,
and the model's causal-LM loss sums their cross-entropy and divides by ``num_items_in_batch``:
with gradient accumulation the Trainer counts the rows of the whole effective batch (across
processes too), so the loss is the mean over the paper's 32 examples.

``loss_impl="full_logits"`` keeps the implementation this replaced (right padding, (B, T) labels
masked except the gold token, full (B, T, V) logits) for `tests/test_sft.py`, which checks that
both give the same loss and gradients, and for `benchmarks/bench_training.py`.

Rows carry a `length` column so `train_sampling_strategy="group_by_length"` batches prompts of
similar length together: a micro-batch is padded to its own longest prompt, so its memory grows
with that prompt, not the data set's longest (docs/design.md, "Measured costs": random-order padding made CPU steps
several times slower). Prompts over ``max_prompt_length`` or the model's context stop the run
before training (`decal.training.memory`), unless ``truncate_prompts`` keeps their last tokens.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Literal, Sequence

from transformers import Trainer

from ..decision import option_token_ids
from ..models import keep_head_input_contiguous
from ..scoring import context_length
from ..tasks.prompts import render_chat
from ..engines.base import check_lengths
from .memory import AutoCheckpointing

__all__ = ["IGNORE_INDEX", "LOSS_IMPLS", "sft_rows", "sft_dataset", "DecisionTokenCollator", "DecisionTokenTrainer",
           "build_sft_trainer"]

logger = logging.getLogger(__name__)

# The label value transformers' loss ignores.
IGNORE_INDEX = -100
#: "decision": logits at the decision position only; "full_logits": the (B, T, V) reference.
LOSS_IMPLS = ("decision", "full_logits")
LossImpl = Literal["decision", "full_logits"]


def sft_rows(task, tokenizer, *, max_prompt_length: int | None = None, truncate_prompts: bool = False,
             context: int | None = None) -> list[dict[str, Any]]:
    """Tokenize a task into SFT rows: prompt ids followed by the gold decision token.

    Args:
        task: a `decal.tasks.Task`; its examples' `label` is the target.
        tokenizer: the model's tokenizer (with its chat template).
        max_prompt_length: the longest prompt allowed, in tokens; None: no limit.
        truncate_prompts: cut prompts over `max_prompt_length` to their last `max_prompt_length`
            tokens (the end holds the generation prompt, which must stay next to the decision)
            instead of failing.
        context: the model's context (`decal.scoring.context_length`); a prompt plus its decision
            token must fit. None: not checked.

    Returns:
        One dict per example: `id`, `input_ids` (prompt ids + [gold decision token id]),
        `length` (len of input_ids), `target_id` (the gold decision token id).

    Raises:
        PromptTooLongError: a prompt is over `max_prompt_length` (without `truncate_prompts`) or
            does not fit in `context`; the message names the longest such example.
        ValueError: `truncate_prompts` without `max_prompt_length`.
    """
    if truncate_prompts and max_prompt_length is None:
        raise ValueError("`truncate_prompts` needs `max_prompt_length`: the number of prompt tokens to keep")
    rows = []
    for example in task.examples:
        prompt = render_chat(tokenizer, task.template.user_message(example, reasoning=False), reasoning=False)
        decision_tokens = option_token_ids(tokenizer, example.labels, context=prompt)
        target_id = decision_tokens.token_ids[example.label_index]
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if truncate_prompts and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
        input_ids = prompt_ids + [int(target_id)]
        rows.append({"id": example.id, "input_ids": input_ids, "length": len(input_ids), "target_id": int(target_id)})
    check_lengths(context, [r["length"] - 1 for r in rows], names=[r["id"] for r in rows], reserve=1,
                  reserve_name="the decision token", max_prompt_length=None if truncate_prompts else max_prompt_length,
                  fix="Raise --max-prompt-length, or add --truncate-prompts to keep the end of longer prompts.")
    return rows


def sft_dataset(task, tokenizer, *, max_prompt_length: int | None = None, truncate_prompts: bool = False,
                context: int | None = None):
    """`sft_rows` as a `datasets.Dataset` (columns id, input_ids, length, target_id)."""
    import datasets

    rows = sft_rows(task, tokenizer, max_prompt_length=max_prompt_length, truncate_prompts=truncate_prompts,
                    context=context)
    if not rows:
        raise ValueError(f"task {task.name!r} split {task.split!r} has no examples to train on")
    return datasets.Dataset.from_list(rows)


@dataclass(frozen=True)
class DecisionTokenCollator:
    """Batch SFT rows for `DecisionTokenTrainer`.

    With ``loss_impl="decision"`` (default) it returns the prompts without their gold token,
    padded on the left: `input_ids` and `attention_mask` (B, T), `position_ids` (B, T) counted
    from each row's first real token (so a padded row sees the positions it has alone), and
    `labels` = `shift_labels` (B, 1), the gold decision token of each row, which the logits of
    the last column predict.

    With ``loss_impl="full_logits"`` it returns the whole rows padded on the right, and `labels`
    (B, T) with ``labels[i, j] = IGNORE_INDEX`` except ``labels[i, L_i - 1] = input_ids[i, L_i - 1]``,
    the gold decision token of row i (L_i = its length).
    """

    pad_token_id: int
    loss_impl: LossImpl = "decision"

    def __post_init__(self):
        if self.loss_impl not in LOSS_IMPLS:
            raise ValueError(f"`loss_impl` must be one of {list(LOSS_IMPLS)}; got {self.loss_impl!r}.")

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if self.loss_impl == "full_logits":
            return self._full_logits(features)
        import torch

        lengths = [len(f["input_ids"]) - 1 for f in features]  # prompt lengths
        n_rows, width = len(features), max(lengths)
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T)
        targets = torch.empty((n_rows, 1), dtype=torch.long)  # (B, 1)
        for i, (feature, length) in enumerate(zip(features, lengths)):
            ids = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            input_ids[i, width - length:] = ids[:-1]
            attention_mask[i, width - length:] = 1
            targets[i, 0] = ids[-1]
        position_ids = (attention_mask.cumsum(dim=1) - 1).clamp(min=0)  # (B, T), 0 on the padding
        return {"input_ids": input_ids, "attention_mask": attention_mask, "position_ids": position_ids,
                "labels": targets, "shift_labels": targets}

    def _full_logits(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
        import torch

        lengths = [len(f["input_ids"]) for f in features]
        n_rows, width = len(features), max(lengths)
        input_ids = torch.full((n_rows, width), self.pad_token_id, dtype=torch.long)  # (B, T)
        attention_mask = torch.zeros((n_rows, width), dtype=torch.long)  # (B, T)
        labels = torch.full((n_rows, width), IGNORE_INDEX, dtype=torch.long)  # (B, T)
        for i, (feature, length) in enumerate(zip(features, lengths)):
            input_ids[i, :length] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            attention_mask[i, :length] = 1
            labels[i, length - 1] = input_ids[i, length - 1]
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _pad_token_id(tokenizer) -> int:
    if tokenizer.pad_token_id is not None:
        return int(tokenizer.pad_token_id)
    if tokenizer.eos_token_id is not None:
        return int(tokenizer.eos_token_id)
    raise ValueError(f"tokenizer {type(tokenizer).__name__} has neither a pad nor an EOS token; set one")


class DecisionTokenTrainer(Trainer):
    """transformers' `Trainer` whose causal-LM loss projects one position per row through the head.

    The only change w.r.t. Trainer is that `compute_loss` passes ``logits_to_keep=1`` to the
    model when ``loss_impl="decision"``; the loss itself (the model's, on the (B, 1) labels of
    `DecisionTokenCollator`) and its normalisation by ``num_items_in_batch`` are the Trainer's.
    With ``auto_checkpointing`` (and ``args.gradient_checkpointing``), gradient checkpointing is
    switched on only for the micro-batches that need it (`memory.AutoCheckpointing`).
    """

    def __init__(self, *args, loss_impl: LossImpl = "decision", auto_checkpointing: bool = False, **kwargs):
        if loss_impl not in LOSS_IMPLS:
            raise ValueError(f"`loss_impl` must be one of {list(LOSS_IMPLS)}; got {loss_impl!r}.")
        super().__init__(*args, **kwargs)
        if loss_impl == "decision" and not self.model_accepts_loss_kwargs:
            raise ValueError(f"{type(self.model).__name__}.forward takes no loss keyword arguments "
                             f"(`shift_labels`, `num_items_in_batch`), which decision-token SFT needs")
        self.loss_impl = loss_impl
        self.auto_checkpointing = (AutoCheckpointing(self.model) if auto_checkpointing
                                   and self.args.gradient_checkpointing else None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if self.auto_checkpointing is not None and model.training:
            self.auto_checkpointing(model, inputs["input_ids"].numel())
        if self.loss_impl == "decision":
            inputs = {**inputs, "logits_to_keep": 1}  # logits (B, 1, V): the decision position only
        return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                    num_items_in_batch=num_items_in_batch)


def build_sft_trainer(*, model, tokenizer, task, args, peft_config=None, callbacks=None,
                      max_prompt_length: int | None = None, truncate_prompts: bool = False,
                      loss_impl: LossImpl = "decision", auto_checkpointing: bool = False):
    """A `DecisionTokenTrainer` that trains `model` (with LoRA when `peft_config`) on the decision token.

    Args:
        model: a causal LM (float32 recommended: docs/design.md, "Measured costs").
        tokenizer: its tokenizer.
        task: the training `Task` (non-reasoning prompts are rendered whatever `task.reasoning`).
        args: `transformers.TrainingArguments`; `remove_unused_columns` must be False (the rows
            carry columns the model does not take) and `train_sampling_strategy` should be
            "group_by_length".
        peft_config: a `peft.LoraConfig`, or None to train `model` as given (e.g. already a
            PeftModel).
        callbacks: extra `TrainerCallback`s.
        max_prompt_length, truncate_prompts: see `sft_rows`; the model's context is checked too.
        loss_impl: "decision" (default); "full_logits" only to compare against the old
            implementation (tests, benchmarks).
        auto_checkpointing: with ``args.gradient_checkpointing``, checkpoint only the
            micro-batches whose activations would exceed a quarter of the memory.

    Returns:
        The `Trainer`, ready for `.train(resume_from_checkpoint=...)`.

    Raises:
        PromptTooLongError: a prompt does not fit (see `sft_rows`), before any training.
    """
    if getattr(args, "remove_unused_columns", False):
        raise ValueError("`remove_unused_columns` must be False for decision-token SFT; the collator reads "
                         "`input_ids` from rows that also carry id, length and target_id")
    dataset = sft_dataset(task, tokenizer, max_prompt_length=max_prompt_length, truncate_prompts=truncate_prompts,
                          context=context_length(model))
    logger.info("SFT on %d examples of %s/%s, mean length %.0f tokens, longest %d", len(dataset), task.name,
                task.split, sum(dataset["length"]) / len(dataset), max(dataset["length"]))
    # The head's input is the (B, 1, H) slice of the (B, T, H) hidden states; strided, its backward runs
    # B matrix-vector products over the vocabulary, whose float32 sums drift (LoRA gradients 1e-5 off the
    # float64 ones on the tiny Qwen3, against 1e-6 when contiguous). A second hook (load_model adds one)
    # finds the input contiguous and does nothing.
    keep_head_input_contiguous(model)
    if peft_config is not None:
        from peft import get_peft_model

        if getattr(args, "gradient_checkpointing", False):
            # LoRA leaves the embeddings frozen; checkpointed blocks need an input that requires grad.
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config)
    return DecisionTokenTrainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DecisionTokenCollator(_pad_token_id(tokenizer), loss_impl=loss_impl),
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
        loss_impl=loss_impl,
        auto_checkpointing=auto_checkpointing,
    )
