"""Supervised fine-tuning on the decision token: the loss is `-log p(gold | x)` at one position.

Each training row is the non-reasoning prompt (`render_chat(..., reasoning=False)`) followed by
the gold option's decision token (`decision.option_token_ids` in the prompt's context). The
collator masks every label except that last token, so the causal-LM loss of transformers'
`Trainer` (which shifts labels by one) is the cross-entropy of the first position after the
prompt, the decision position of DESIGN.md, against the gold decision token, over the full
vocabulary. With gradient accumulation the Trainer divides by the number of unmasked labels in
the whole effective batch, so the loss is the mean over the paper's 32 examples.

Rows carry a `length` column so `train_sampling_strategy="group_by_length"` batches prompts of
similar length together (DESIGN.md: random-order padding made CPU steps several times slower).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Sequence

from ..decision import option_token_ids
from ..tasks.prompts import render_chat

__all__ = ["IGNORE_INDEX", "sft_rows", "sft_dataset", "DecisionTokenCollator", "build_sft_trainer"]

logger = logging.getLogger(__name__)

# The label value transformers' loss ignores.
IGNORE_INDEX = -100


def sft_rows(task, tokenizer, *, max_prompt_length: int | None = None) -> list[dict[str, Any]]:
    """Tokenize a task into SFT rows: prompt ids followed by the gold decision token.

    Args:
        task: a `decal.tasks.Task`; its examples' `label` is the target.
        tokenizer: the model's tokenizer (with its chat template).
        max_prompt_length: keep only the last N prompt tokens (the end holds the generation
            prompt, which must stay next to the decision); None keeps all.

    Returns:
        One dict per example: `id`, `input_ids` (prompt ids + [gold decision token id]),
        `length` (len of input_ids), `target_id` (the gold decision token id).
    """
    rows = []
    for example in task.examples:
        prompt = render_chat(tokenizer, task.template.user_message(example, reasoning=False), reasoning=False)
        decision_tokens = option_token_ids(tokenizer, example.labels, context=prompt)
        target_id = decision_tokens.token_ids[example.label_index]
        prompt_ids = list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        if max_prompt_length is not None and len(prompt_ids) > max_prompt_length:
            prompt_ids = prompt_ids[-max_prompt_length:]
        input_ids = prompt_ids + [int(target_id)]
        rows.append({"id": example.id, "input_ids": input_ids, "length": len(input_ids), "target_id": int(target_id)})
    return rows


def sft_dataset(task, tokenizer, *, max_prompt_length: int | None = None):
    """`sft_rows` as a `datasets.Dataset` (columns id, input_ids, length, target_id)."""
    import datasets

    rows = sft_rows(task, tokenizer, max_prompt_length=max_prompt_length)
    if not rows:
        raise ValueError(f"task {task.name!r} split {task.split!r} has no examples to train on")
    return datasets.Dataset.from_list(rows)


@dataclass(frozen=True)
class DecisionTokenCollator:
    """Pad rows on the right and keep the label of the last real token only.

    Returns tensors `input_ids` (B, T), `attention_mask` (B, T) and `labels` (B, T), where
    `labels[i, j] = IGNORE_INDEX` except `labels[i, L_i - 1] = input_ids[i, L_i - 1]`, the gold
    decision token of row i (L_i = its length).
    """

    pad_token_id: int

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, Any]:
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


def build_sft_trainer(*, model, tokenizer, task, args, peft_config=None, callbacks=None,
                      max_prompt_length: int | None = None):
    """A transformers `Trainer` that trains `model` (with LoRA when `peft_config`) on the decision token.

    Args:
        model: a causal LM (float32 recommended, DESIGN.md).
        tokenizer: its tokenizer.
        task: the training `Task` (non-reasoning prompts are rendered whatever `task.reasoning`).
        args: `transformers.TrainingArguments`; `remove_unused_columns` must be False (the rows
            carry columns the model does not take) and `train_sampling_strategy` should be
            "group_by_length".
        peft_config: a `peft.LoraConfig`, or None to train `model` as given (e.g. already a
            PeftModel).
        callbacks: extra `TrainerCallback`s.
        max_prompt_length: see `sft_rows`.

    Returns:
        The `Trainer`, ready for `.train(resume_from_checkpoint=...)`.
    """
    from transformers import Trainer

    if getattr(args, "remove_unused_columns", False):
        raise ValueError("`remove_unused_columns` must be False for decision-token SFT; the collator reads "
                         "`input_ids` from rows that also carry id, length and target_id")
    if peft_config is not None:
        from peft import get_peft_model

        if getattr(args, "gradient_checkpointing", False):
            # LoRA leaves the embeddings frozen; checkpointed blocks need an input that requires grad.
            model.enable_input_require_grads()
        model = get_peft_model(model, peft_config)
    dataset = sft_dataset(task, tokenizer, max_prompt_length=max_prompt_length)
    logger.info("SFT on %d examples of %s/%s, mean length %.0f tokens", len(dataset), task.name, task.split,
                sum(dataset["length"]) / len(dataset))
    return Trainer(
        model=model,
        args=args,
        train_dataset=dataset,
        data_collator=DecisionTokenCollator(_pad_token_id(tokenizer)),
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
    )
