"""GRPO with a verifiable decision reward, and calibration-aware GRPO, on TRL's GRPOTrainer.

- GRPO (issue #5 item 3): reward 1 when the decision parsed by `decal.decision` equals the gold
  label, else 0 (`decal.training.rewards`); TRL's clipped objective with ``loss_type="bnpo"`` and
  no KL by default (``beta=0``, no reference model).
- Calibration-aware GRPO (issue #6, docs/design.md, "Calibration-aware GRPO"): the same, with the advantage of the decision
  token set to 0 and ``cal_lambda * CE`` added, where CE is the decision-token cross-entropy of
  `decal.training.losses` (targets: the paper's "uniform" rule, or decal's "group-accuracy"
  extension). The CE reuses the training forward pass: a forward hook on the backbone keeps the
  final hidden state at the B decision positions, and only those B rows go through the LM head,
  so the ``(B, T, V)`` logits are never built and no second forward runs.

Per step the trainer logs, besides TRL's ``reward``: ``timing/generate_s`` (seconds spent sampling the
step's completions), ``decision/invalid_rate``,
``decision/prob_correct`` and ``decision/prob_wrong`` (the mean full-vocabulary probability of the
emitted decision token over correct / wrong rollouts), ``decision/frac_prob_above_0.99`` (over
rollouts with a valid decision) and, for calibration-aware GRPO, ``cal/ce``.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

import torch
from trl import GRPOConfig, GRPOTrainer

from ..errors import ConfigError
from ..decision import DecisionTokens, option_token_ids, stop_token_ids
from ..scoring import context_length
from ..tasks.prompts import decision_context, render_chat
from . import _trl_compat
from .losses import CAL_TARGETS, decision_ce, decision_targets
from ..engines.base import check_lengths
from .memory import AutoCheckpointing
from .rewards import DecisionReward

__all__ = ["DecalGRPOConfig", "DecalGRPOTrainer", "grpo_dataset", "build_grpo_trainer"]

logger = logging.getLogger(__name__)

# Confidence above which a decision counts as overconfident (docs/design.md, "Metrics": overconfidence ratio).
_OVERCONFIDENT = 0.99


@dataclass
class DecalGRPOConfig(GRPOConfig):
    """TRL's GRPOConfig plus the decision-token calibration options (fields documented in `help`)."""

    calibration: bool = field(
        default=False,
        metadata={"help": "Calibration-aware GRPO: zero the decision token's advantage and add cal_lambda * CE at it."},
    )
    cal_lambda: float = field(
        default=0.001,
        metadata={"help": "Weight of the decision-token CE (paper: 0.001; sensitivity 0.0005-0.005). Must be >= 0."},
    )
    cal_target: str = field(
        default="uniform",
        metadata={
            "help": "CE target: 'uniform' (paper: one-hot on gold when correct, uniform when wrong) or "
            "'group-accuracy' (decal extension: the emitted option gets max(group accuracy, 1/K))."
        },
    )
    reasoning: bool = field(
        default=True,
        metadata={"help": "Completions reason first and decide after </think>; False: the first token decides."},
    )
    loss_type: str = field(
        default="bnpo",
        metadata={"help": "TRL loss aggregation; the paper uses 'bnpo' (issue #5 item 3)."},
    )

    def __post_init__(self):
        super().__post_init__()
        if not isinstance(self.cal_lambda, (int, float)) or not math.isfinite(self.cal_lambda) or self.cal_lambda < 0:
            raise ConfigError(f"`cal_lambda` must be a finite number >= 0; got {self.cal_lambda!r}. The paper uses 0.001.")
        if self.cal_target not in CAL_TARGETS:
            raise ConfigError(f"Unknown cal_target {self.cal_target!r}. Available: {', '.join(CAL_TARGETS)}.")


def grpo_dataset(task, tokenizer, *, reasoning: bool | None = None):
    """The training prompts as a `datasets.Dataset` for TRL.

    Args:
        task: a `decal.tasks.Task`; every example must share the same option labels.
        tokenizer: renders each prompt with its chat template.
        reasoning: which template variant to render; default `task.reasoning`.

    Returns:
        A Dataset with columns ``prompt`` (the fully rendered chat prompt string, so TRL does not
        apply a template again), ``id``, ``label``, ``labels`` and ``option_token_ids`` (each
        example's decision token ids, found in its own context by `decal.decision.option_token_ids`;
        TRL hands them to the reward, so examples whose contexts tokenize differently are parsed
        and trained on their own tokens).

    Raises:
        ValueError: the task is empty or its examples have different label sets.
    """
    from datasets import Dataset

    reasoning = task.reasoning if reasoning is None else reasoning
    examples = list(task.examples)
    if not examples:
        raise ValueError(f"task {task.name!r} split {task.split!r} has no examples to train on")
    labels = examples[0].labels
    for ex in examples:
        if ex.labels != labels:
            raise ValueError(
                f"task {task.name!r}: example {ex.id!r} has labels {list(ex.labels)} but {examples[0].id!r} has "
                f"{list(labels)}; GRPO needs one label set per task"
            )
    prompts = [render_chat(tokenizer, task.template.user_message(ex, reasoning=reasoning), reasoning=reasoning)
               for ex in examples]
    rows = {
        "prompt": prompts,
        "id": [ex.id for ex in examples],
        "label": [ex.label for ex in examples],
        "labels": [list(ex.labels) for ex in examples],
        "option_token_ids": [list(option_token_ids(tokenizer, ex.labels, context=decision_context(p, reasoning=reasoning)).token_ids)
                             for ex, p in zip(examples, prompts, strict=True)],
    }
    return Dataset.from_dict(rows)


class _DecisionHidden:
    """Forward hook on the backbone that keeps the final hidden state at given positions.

    The hidden state at input position ``P + d - 1`` is the one TRL's fused head projects to score
    completion token ``d`` (P = padded prompt length). Rows arrive in chunks when TRL splits the
    batch, so an offset tracks which rows each call holds.
    """

    def __init__(self, module: torch.nn.Module, positions: torch.Tensor):
        self.positions = positions  # (B,)
        self.rows: list[torch.Tensor] = []
        self._offset = 0
        self._handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        hidden = output.last_hidden_state if hasattr(output, "last_hidden_state") else output[0]  # (b, L, H)
        b = hidden.size(0)
        pos = self.positions[self._offset : self._offset + b].to(hidden.device)
        self.rows.append(hidden[torch.arange(b, device=hidden.device), pos])  # (b, H)
        self._offset += b

    def remove(self) -> None:
        self._handle.remove()

    def hidden(self) -> torch.Tensor:
        if self._offset != self.positions.numel():
            raise RuntimeError(
                f"the decision hook saw {self._offset} rows for {self.positions.numel()} completions; "
                f"TRL's forward changed (see decal.training._trl_compat)"
            )
        return torch.cat(self.rows, dim=0)  # (B, H)


class DecalGRPOTrainer(GRPOTrainer):
    """TRL's GRPOTrainer with decision-token bookkeeping and the calibration-aware loss.

    The only change w.r.t. GRPOTrainer is that each generation batch carries its parsed decisions
    (``decision_index``, ``decision_option``, ``decision_gold`` (B,), ``option_token_ids`` (B, K)
    and, with ``args.calibration``, ``decision_targets`` (B, K) and (B, T) advantages that are 0 at
    the decision token), and that the loss adds ``args.cal_lambda * decision_ce`` computed from the
    hidden states of TRL's own forward pass. Without ``args.calibration`` the loss is TRL's, and
    the decision metrics are only logged. For bounded memory (issue #13) both hooks run TRL with its
    fused LM head projecting only the completion positions on a CPU too
    (`_trl_compat.completion_positions_only`), generation without vLLM runs in chunks of one
    micro-batch (`_generate_single_turn`), and with ``auto_checkpointing`` only the micro-batches
    that need it are checkpointed (`memory.AutoCheckpointing`). With a ``sampler``
    (`decal.training.vllm_sampler.VLLMSampler`, ``--engine vllm``) the completions are drawn on decal's
    vLLM engine instead of TRL's `generate`, and TRL's importance-sampling correction covers the
    difference (`_trl_compat.sample_externally`).
    """

    def __init__(self, *args, decision_tokens: DecisionTokens, auto_checkpointing: bool = False, sampler=None,
                 **kwargs):
        _trl_compat.check_trl()
        super().__init__(*args, **kwargs)
        # decal's vLLM sampler (`--engine vllm`) draws the completions; TRL corrects for it as for its own vLLM
        self.sampler = sampler
        if sampler is not None:
            _trl_compat.sample_externally(self)
            # start the engine now, with the initial adapter: a failure shows before any training step
            sampler.sync(self.accelerator.unwrap_model(self.model), self.state.global_step)
        self.auto_checkpointing = (AutoCheckpointing(self.model) if auto_checkpointing
                                   and self.args.gradient_checkpointing else None)
        rewards = [f for f in self.reward_funcs if isinstance(f, DecisionReward)]
        if len(rewards) != 1:
            raise ValueError("DecalGRPOTrainer needs exactly one DecisionReward among `reward_funcs`")
        self.decision_reward = rewards[0]
        self.decision_tokens = decision_tokens  # the labels and K; each row's ids come from the reward

    # 1. generation: parse decisions once, build targets, zero the decision advantage
    def _generate_and_score_completions(self, inputs):
        with _trl_compat.completion_positions_only():  # the old and reference log-probs, when TRL needs them
            return self._add_decisions(super()._generate_and_score_completions(inputs))

    def _generate_single_turn(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images=False):
        """TRL's generation, in chunks of at most one micro-batch of rows on the transformers path.

        TRL generates a whole generation batch (micro-batch x grad-accum rows) in one `generate`
        call, so its KV cache and prefill grew with the effective batch (the paper's 256
        completions of 2,102 + 256 tokens: 28 GB on SmolLM2). In chunks the peak is one
        micro-batch's, like the training pass's (issue #13). vLLM and multimodal inputs keep
        TRL's single call.
        """
        started = time.perf_counter()
        try:
            if self.sampler is not None:
                return self._sample_on_engine(prompt_ids, num_generations)
            return self._generate_in_chunks(prompt_ids, images, multimodal_fields, num_generations, has_tool_images)
        finally:  # where a step's time goes (benchmarks/bench_training.py --suite engines)
            _trl_compat.log_metric(self, "timing/generate_s", time.perf_counter() - started)

    def _generate_in_chunks(self, prompt_ids, images, multimodal_fields, num_generations, has_tool_images):
        rows = self.args.per_device_train_batch_size
        if (self.use_vllm or getattr(self, "use_transformers_continuous_batching", False) or images is not None
                or multimodal_fields or len(prompt_ids) <= rows):
            return super()._generate_single_turn(prompt_ids, images, multimodal_fields, num_generations,
                                                 has_tool_images)
        completion_ids, logprobs = [], []
        for start in range(0, len(prompt_ids), rows):
            ids, chunk_logprobs = super()._generate_single_turn(prompt_ids[start : start + rows], images,
                                                                multimodal_fields, num_generations, has_tool_images)
            completion_ids += ids
            logprobs = None if chunk_logprobs is None or logprobs is None else logprobs + list(chunk_logprobs)
        return completion_ids, logprobs

    def _sample_on_engine(self, prompt_ids, num_generations):
        """(completion_ids, logprobs) from decal's vLLM sampler, serving the adapter as of this optimizer step."""
        if self.state.global_step != self.sampler.step:  # once per optimizer step, as TRL syncs its vLLM
            self.sampler.sync(self.accelerator.unwrap_model(self.model), self.state.global_step)
        return self.sampler.sample(
            prompt_ids, num_generations, max_new_tokens=self.max_completion_length, stop_ids=self.eos_token_ids,
            temperature=self.temperature, top_p=self.top_p, top_k=self.top_k, min_p=self.min_p,
            repetition_penalty=self.repetition_penalty,
        )

    def _add_decisions(self, output: dict) -> dict:
        """Add the decision keys to a generation batch, from the reward's parse of the same rows."""
        completion_ids = output["completion_ids"]  # (B, T)
        b, t = completion_ids.shape
        device = completion_ids.device
        decisions, gold = self.decision_reward.last_decisions, self.decision_reward.last_gold
        if len(decisions) != b:
            raise RuntimeError(f"the reward saw {len(decisions)} completions, the batch has {b}; see _trl_compat")
        index = torch.tensor([d.index if d.valid else -1 for d in decisions], dtype=torch.long, device=device)
        option = torch.tensor([d.option if d.valid else -1 for d in decisions], dtype=torch.long, device=device)
        gold_t = torch.tensor(gold, dtype=torch.long, device=device)
        output["decision_index"] = index  # (B,)
        output["decision_option"] = option  # (B,)
        output["decision_gold"] = gold_t  # (B,)
        # (B, K) rather than (K,): each row's own decision tokens, and TRL shuffles and splits every
        # tensor of the dict along dim 0
        output["option_token_ids"] = torch.tensor(self.decision_reward.last_option_ids, dtype=torch.long, device=device)
        invalid = self.accelerator.gather((index < 0).float())
        _trl_compat.log_metric(self, "decision/invalid_rate", invalid.mean().item())
        if self.args.calibration:
            accuracy = self._group_accuracy(option == gold_t) if self.args.cal_target == "group-accuracy" else None
            output["decision_targets"] = decision_targets(
                gold_t, option, len(self.decision_tokens.token_ids), kind=self.args.cal_target, group_accuracy=accuracy
            )
            advantages = output["advantages"]
            if advantages.dim() == 1:
                advantages = advantages.unsqueeze(1).expand(-1, t).clone()  # (B, T)
            rows = torch.nonzero(index >= 0).squeeze(1)
            advantages[rows, index[rows]] = 0.0  # no policy-gradient signal at the decision token (paper)
            output["advantages"] = advantages
        return output

    def _group_accuracy(self, correct: torch.Tensor) -> torch.Tensor:
        """(B,) share of correct rollouts in each row's group; groups may span processes."""
        b = correct.numel()
        everyone = self.accelerator.gather(correct.float())  # (N,) in TRL's global order
        g = _trl_compat.group_size(self)
        per_group = everyone.view(-1, g).mean(dim=1).repeat_interleave(g)  # (N,)
        start = self.accelerator.process_index * b
        return per_group[start : start + b]

    # 2. loss: TRL's loss plus lambda * CE from the same forward
    def _compute_loss(self, model, inputs):
        if self.auto_checkpointing is not None and model.training:
            self.auto_checkpointing(model, inputs["prompt_ids"].numel() + inputs["completion_ids"].numel())
        index = inputs["decision_index"]  # (B,)
        prompt_len = inputs["prompt_ids"].size(1)
        positions = (prompt_len + index.clamp(min=0) - 1).clamp(min=0)  # (B,); invalid rows are masked later
        hook = _DecisionHidden(_trl_compat.backbone(self, model), positions)
        try:
            with _trl_compat.completion_positions_only():
                loss = super()._compute_loss(model, inputs)
        finally:
            hook.remove()
        hidden = hook.hidden()  # (B, H)
        lam = float(self.args.cal_lambda) if self.args.calibration else 0.0
        head = _trl_compat.output_head(self, model)
        with torch.set_grad_enabled(torch.is_grad_enabled() and lam > 0):
            logits = head(hidden)  # (B, V), temperature 1, only B rows of the head
        ce = None
        if self.args.calibration:
            ce = decision_ce(logits, inputs["option_token_ids"], inputs["decision_targets"])
            if lam > 0:
                # scaled for gradient accumulation like TRL's bnpo loss (issue #6 item 2)
                loss = loss + lam * ce / _trl_compat.accumulation_normalizer(self)
        self._log_decisions(logits.detach(), inputs, ce)
        return loss

    def _log_decisions(self, logits: torch.Tensor, inputs: dict, ce: torch.Tensor | None) -> None:
        option, gold = inputs["decision_option"], inputs["decision_gold"]
        valid = option >= 0  # (B,)
        emitted = inputs["option_token_ids"].gather(1, option.clamp(min=0).unsqueeze(1)).squeeze(1)  # (B,)
        prob = torch.softmax(logits.float(), dim=-1).gather(1, emitted.unsqueeze(1)).squeeze(1)  # (B,)
        correct = valid & (option == gold)
        wrong = valid & (option != gold)
        n_valid = valid.float().sum()
        stats = torch.stack([
            (prob * correct).sum(), correct.float().sum(),
            (prob * wrong).sum(), wrong.float().sum(),
            ((prob > _OVERCONFIDENT) & valid).float().sum(), n_valid,
            (ce.detach().float() * n_valid) if ce is not None else n_valid.new_zeros(()),
        ])
        s = self.accelerator.reduce(stats, reduction="sum").tolist()
        if s[1] > 0:
            _trl_compat.log_metric(self, "decision/prob_correct", s[0] / s[1])
        if s[3] > 0:
            _trl_compat.log_metric(self, "decision/prob_wrong", s[2] / s[3])
        if s[5] > 0:
            _trl_compat.log_metric(self, "decision/frac_prob_above_0.99", s[4] / s[5])
            if ce is not None:
                _trl_compat.log_metric(self, "cal/ce", s[6] / s[5])


def _check_prompts(dataset, tokenizer, model, args: DecalGRPOConfig, max_prompt_length: int | None) -> None:
    """Fail before training when a prompt is over the limits (`decal.training.memory`); log the longest."""
    lengths = [len(ids) for ids in tokenizer(text=list(dataset["prompt"]))["input_ids"]]  # as TRL tokenizes them
    logger.info("GRPO on %d prompts, mean length %.0f tokens, longest %d", len(lengths), sum(lengths) / len(lengths),
                max(lengths))
    check_lengths(context_length(model), lengths, names=list(dataset["id"]), reserve=args.max_completion_length,
                  reserve_name=f"{args.max_completion_length} completion tokens", max_prompt_length=max_prompt_length,
                  fix="Raise --max-prompt-length; GRPO prompts are never cut.")


def build_grpo_trainer(*, model, tokenizer, task, args: DecalGRPOConfig, peft_config=None, callbacks=None,
                       max_prompt_length: int | None = None, auto_checkpointing: bool = False,
                       sampler=None) -> DecalGRPOTrainer:
    """A ready-to-train `DecalGRPOTrainer` for `task` (GRPO, or calibration-aware with ``args.calibration``).

    Args:
        model: a causal LM (a `PreTrainedModel`), not yet wrapped by PEFT.
        tokenizer: its tokenizer; a missing pad token is set to the EOS token.
        task: the training `decal.tasks.Task`.
        args: the trainer configuration.
        peft_config: a `peft.LoraConfig`, or None to train all weights.
        callbacks: extra `transformers.TrainerCallback`s.
        max_prompt_length: the longest prompt allowed, in tokens (None: no limit); prompts are
            never cut.
        auto_checkpointing: with ``args.gradient_checkpointing``, checkpoint only the
            micro-batches whose activations would exceed a quarter of the memory.
        sampler: a `decal.training.vllm_sampler.VLLMSampler` that draws the completions on vLLM
            (None: TRL's own generation).

    Raises:
        PromptTooLongError: a prompt is over `max_prompt_length`, or a prompt and
            ``args.max_completion_length`` tokens do not fit in the model's context.
        DecisionTokenCollisionError: two options share their decision token under `tokenizer`.
        RuntimeError: the installed TRL is not the pinned one.
    """
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    text_config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    scaled = [k for k in ("final_logit_softcapping", "logit_scale", "logits_scaling") if getattr(text_config, k, None)]
    if scaled:
        # the decision logits are the LM head's raw output; TRL's fused head also applies these
        logger.warning("model config sets %s; decision probabilities and the CE ignore it", ", ".join(scaled))
    dataset = grpo_dataset(task, tokenizer, reasoning=args.reasoning)
    _check_prompts(dataset, tokenizer, model, args, max_prompt_length)
    # each example's decision tokens are in the dataset; the first example's name the options in logs
    first = dataset[0]
    tokens = option_token_ids(tokenizer, first["labels"], context=decision_context(first["prompt"], reasoning=args.reasoning))
    logger.info("decision tokens %s for options %s (first example)", tokens.tokens, tokens.labels)
    reward = DecisionReward(tokenizer, tokens, reasoning=args.reasoning, stop_ids=stop_token_ids(tokenizer, model))
    return DecalGRPOTrainer(
        model=model,
        reward_funcs=[reward],
        args=args,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=callbacks,
        decision_tokens=tokens,
        auto_checkpointing=auto_checkpointing,
        sampler=sampler,
    )
