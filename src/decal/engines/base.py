"""The engine interface: what every inference engine gives decal, and the options it is built with.

An engine holds one model (and, for vLLM, the LoRA adapters served on it) and answers two
questions on prompts that decal rendered and tokenized itself (docs/design.md, "Inference engines"):

- `Engine.score`: the option distribution at the position right after each token-id prompt
  (non-reasoning scoring, and any "decide here" read such as the reasoning swap);
- `Engine.generate`: completions (greedy or sampled) with the decision found by `decal.decision`
  on the generated ids and the option distribution read at that position; a completion with no
  decision gets the forced decision (docs/design.md, "Forced decision").

`option_probs[k]` is always the full-vocabulary probability at temperature 1 of option k's
decision token, whatever the sampling temperature, never a top-k list.

Both also give the unconstrained top token at the decision position (`top_token_id`), which
`decal.recording` turns into the record's `argmax_is_option`, and list in `Engine.fallbacks`
anything they fell back on (one line each; `run.json` records them).

The pieces both engines share (cutting a completion at its stop token and finding its
decision, the forced-decision suffix ids, the prompt-length check) live here, once. The
prompt-length check, `check_lengths`, is the only one in decal: engines, engine recipes and the
training runs all call it.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

from ..decision import END_OF_REASONING, Decision, DecisionTokens, find_decision, forced_decision_suffix
from ..errors import ConfigError, PromptTooLongError

__all__ = [
    "Engine",
    "EngineOptions",
    "OptionScores",
    "GeneratedDecision",
    "parse_engine_args",
    "tokens_per_prompt",
    "prompt_seeds",
    "length_sorted_batches",
    "check_lengths",
    "decide",
    "forced_suffix_ids",
]

logger = logging.getLogger(__name__)

@dataclass(frozen=True)
class OptionScores:
    """The distribution at a decision position (non-reasoning scoring).

    option_probs: (K,) full-vocabulary probabilities of the options' decision tokens.
    top_token, top_token_id: the unconstrained argmax token there.
    top_is_option: whether that token is one of the options' decision tokens.
    """

    option_probs: list[float]
    top_token: str
    top_token_id: int
    top_is_option: bool


@dataclass(frozen=True)
class GeneratedDecision:
    """One reasoning rollout and its decision.

    completion_ids: generated ids, cut at the first stop token (EOS/padding).
    completion: their text (special tokens kept, so `</think>` shows in Qwen3).
    decision: where the decision sits in `completion_ids` (`Decision.index == -1` if nowhere).
    option_probs: (K,) at the decision position, or at the forced decision when `forced`.
    emitted_token: the token emitted at the decision position, None when forced.
    valid: a decision position exists and its token is an option's decision token.
    forced: no decision position; `option_probs` come from appending the marker.
    top_token, top_token_id: the unconstrained argmax token (temperature 1, full vocabulary) at the
        position `option_probs` were read at; with sampling it can differ from `emitted_token`.
    """

    completion_ids: list[int]
    completion: str
    decision: Decision
    option_probs: list[float]
    emitted_token: str | None
    valid: bool
    forced: bool
    top_token: str
    top_token_id: int


_NAMED = ("tensor_parallel_size", "data_parallel_size", "gpu_memory_utilization", "max_model_len")


@dataclass(frozen=True, kw_only=True)
class EngineOptions:
    """Options an engine is built with; None leaves the engine's own default.

    tensor_parallel_size: GPUs (vLLM ranks) one model copy is split over, on one node.
    data_parallel_size: model copies; each serves part of the requests (across nodes too).
    gpu_memory_utilization: vLLM's share of device memory (on the CPU build: of RAM) it may claim.
    max_model_len: the longest prompt + completion the engine accepts (vLLM sizes its KV cache by it).
    extra: the engine's other options, as the registry names them (`decal.engines.registry`): any
        vLLM engine argument (`--engine-arg KEY=VALUE`, passed through as is), or the remote
        engine's `server_urls`, `served_model_name`, `max_concurrency`, ...
    """

    tensor_parallel_size: int | None = None
    data_parallel_size: int | None = None
    gpu_memory_utilization: float | None = None
    max_model_len: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name, flag in (("tensor_parallel_size", "--tensor-parallel-size"), ("data_parallel_size", "--data-parallel-size"),
                           ("max_model_len", "--max-model-len")):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{flag} must be a positive integer; got {value!r}")
        u = self.gpu_memory_utilization
        if u is not None and (isinstance(u, bool) or not isinstance(u, (int, float)) or not 0.0 < u <= 1.0):
            raise ConfigError(f"--gpu-memory-utilization must be in (0, 1]; got {u!r}")

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any] | None) -> "EngineOptions":
        """Options from one flat mapping (a config's `engine_options`): named fields, the rest in `extra`."""
        options = dict(options or {})
        named = {k: options.pop(k) for k in _NAMED if k in options}
        return cls(**named, extra=options)

    def as_dict(self) -> dict[str, Any]:
        """The options that were set, flat (`extra` merged in), for run.json and the engine's kwargs."""
        named = {k: getattr(self, k) for k in _NAMED}
        return {**{k: v for k, v in named.items() if v is not None}, **dict(self.extra)}

    @property
    def is_empty(self) -> bool:
        return not self.as_dict()


def parse_engine_args(items: Sequence[str]) -> dict[str, Any]:
    """`--engine-arg KEY=VALUE` items as a dict; values are read as YAML scalars (1, 0.5, true, [a, b]).

    Raises:
        ConfigError: an item without `=` or with an empty key.
    """
    import yaml

    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = str(item).partition("=")
        key = key.strip().replace("-", "_")
        if not sep or not key:
            raise ConfigError(f"--engine-arg takes KEY=VALUE; got {item!r}")
        try:
            out[key] = yaml.safe_load(value) if value.strip() else ""
        except yaml.YAMLError:
            out[key] = value
    return out


def tokens_per_prompt(decision_tokens, n: int) -> list[DecisionTokens]:
    """One `DecisionTokens` per prompt, from one shared value or a list of `n`."""
    if isinstance(decision_tokens, DecisionTokens):
        return [decision_tokens] * n
    decision_tokens = list(decision_tokens)
    if len(decision_tokens) != n:
        raise ValueError(f"`decision_tokens` must be one DecisionTokens or one per prompt ({n}); got {len(decision_tokens)}")
    return decision_tokens


def prompt_seeds(seed: int | Sequence[int], n: int) -> list[int]:
    """One seed per prompt: the given list, or 31-bit seeds derived from one int and each prompt's
    index (sha256, stable across processes), so a prompt's seed does not depend on the call's other prompts
    when the caller keeps the index."""
    import hashlib

    if isinstance(seed, int):
        return [int.from_bytes(hashlib.sha256(f"{int(seed)}:prompt-{i}".encode()).digest()[:4], "big") & 0x7FFFFFFF
                for i in range(n)]
    seeds = [int(s) for s in seed]
    if len(seeds) != n:
        raise ValueError(f"`seed` must be one int or one per prompt ({n}); got {len(seeds)}")
    return seeds


def length_sorted_batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (so the peak memory shows early).

    The sort is stable, so equal lengths keep their order and the batches are deterministic.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be at least 1; got {batch_size!r}")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def check_lengths(limit: int | None, lengths: Sequence[int], *, reserve: int = 1, names: Sequence[str] | None = None,
                  what: str = "the model's context", reserve_name: str | None = None,
                  max_prompt_length: int | None = None, fix: str = "") -> None:
    """The prompt-length check: raise `PromptTooLongError` naming the longest prompt over a limit.

    Args:
        limit: the longest prompt + following tokens allowed (the context); None: no stated limit.
        lengths: prompt lengths in tokens.
        reserve: tokens that follow each prompt and must fit in `limit` too.
        names: one per prompt (example ids, ``inputs[3]``); default "prompt <index>".
        what: names `limit` in the message ("the model's context", "--max-model-len").
        reserve_name: names the `reserve` tokens ("the decision token"); default "N new tokens".
        max_prompt_length: a limit on the prompt alone (training's ``--max-prompt-length``).
        fix: the advice after a `max_prompt_length` message.

    Raises:
        PromptTooLongError: one line: the longest offending prompt, its length, the limit, and how
            many prompts are over it.
    """
    who = [f"prompt {i}" for i in range(len(lengths))] if names is None else [f"example {n!r}" for n in names]
    if len(who) != len(lengths):
        raise ValueError(f"`names` must have one entry per prompt ({len(lengths)}); got {len(who)}")
    checks = []
    if max_prompt_length is not None:
        checks.append((max_prompt_length, f"over `max_prompt_length` ({max_prompt_length} tokens)", fix))
    if limit is not None:
        following = reserve_name or f"{reserve} new token{'s' if reserve != 1 else ''}"
        checks.append((limit - reserve, f"too long to fit with {following} in {what} of {limit} tokens",
                       "Shorten the prompt, or use a model with a longer context"
                       + ("" if reserve_name else " or fewer new tokens (--max-new-tokens)") + "."))
    for bound, rule, advice in checks:
        over = [(n, who[i], i) for i, n in enumerate(lengths) if n > bound]
        if over:
            n, _, i = max(over)  # the longest; among equals, the last name
            others = f" ({len(over)} of {len(lengths)} prompts are)" if len(over) > 1 else ""
            raise PromptTooLongError(f"{who[i]} has a prompt of {n} tokens, {rule}{others}. {advice}".rstrip())


def decide(tokenizer, new_ids: Sequence[int], decision_tokens: DecisionTokens, marker: str | None, stops):
    """(completion ids cut at the first stop token, its text, its `Decision`), for any engine's output."""
    new_ids = [int(t) for t in new_ids]
    decision = find_decision(new_ids, tokenizer, decision_tokens, marker=marker, stop_ids=stops)
    end = next((j for j, t in enumerate(new_ids) if t in stops), len(new_ids))
    return new_ids[:end], tokenizer.decode(new_ids[:end], skip_special_tokens=False), decision


def forced_suffix_ids(tokenizer, completion: str, marker: str | None) -> list[int]:
    """Token ids of the forced-decision suffix (`decal.decision.forced_decision_suffix`) of a completion."""
    suffix = forced_decision_suffix(completion, marker)
    return list(tokenizer(suffix, add_special_tokens=False)["input_ids"]) if suffix else []


class Engine:
    """One model (and its adapter) that scores token-id prompts and generates decisions.

    Attributes:
        name: "hf" or "vllm".
        tokenizer: the model's tokenizer (left padding, with a pad token), from `decal.models`.
        model_name: what the engine was built from (alias, folder, GGUF file or hub id).
        adapter: the LoRA adapter this engine applies, or None for the base model.
        dtype: the weights' dtype as the CLI spells it ("float32", "bfloat16", ...).
        dtype_reason: why that dtype (`decal.dtypes.ResolvedDtype.reason`), recorded in run.json.
        stop_ids: the ids that end a completion (`decal.decision.stop_token_ids`).
        fallbacks: what the engine fell back on when built (one line each), or ().

    Engines are context managers; `close()` frees the model (and vLLM's engine processes).
    """

    name: str = ""
    tokenizer: Any = None
    model_name: str = ""
    adapter: str | None = None
    dtype: str = ""
    dtype_reason: str | None = None
    stop_ids: list[int]
    #: what the engine fell back on while being built, one line each (issue #20 item 5); `run.json`
    #: and the analyses' summaries record them, and each was logged as a warning when it happened
    fallbacks: tuple[str, ...] = ()

    # -- what every engine implements --------------------------------------------------------

    def context_length(self) -> int | None:
        """The longest prompt + completion this engine accepts, in tokens (None: no stated limit)."""
        raise NotImplementedError

    def score(self, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8) -> list[OptionScores]:
        """Non-reasoning scoring: the option distribution at the position after each token-id prompt.

        Args:
            sequences: (N,) prompts as token id lists (rendered and tokenized by decal).
            decision_tokens: one `DecisionTokens` for all prompts, or one per prompt.
            batch_size: prompts per forward pass (the hf engine; vLLM schedules its own batches).

        Returns:
            (N,) `OptionScores`, in the order of `sequences`.
        """
        raise NotImplementedError

    def generate(
        self,
        sequences: Sequence[Sequence[int]],
        decision_tokens,
        *,
        num_samples: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        batch_size: int = 8,
        marker: str | None = END_OF_REASONING,
    ) -> list[list[GeneratedDecision]]:
        """Reasoning scoring: generate, find the decision, and read the option distribution there.

        Args:
            sequences: (N,) prompts as token id lists.
            decision_tokens: one `DecisionTokens` for all prompts, or one per prompt, computed in the
                context after the marker (`decal.tasks.prompts.decision_context(..., reasoning=True)`).
            num_samples: rollouts per prompt.
            temperature: 0 is greedy; above 0 samples from the full distribution at that temperature.
            max_new_tokens: generation budget; a completion cut off before its decision is forced.
            seed: the seed of this call's sampling, or one seed per prompt (then each prompt samples
                as if generated alone with its seed); the same call with the same seed gives the
                same completions where the engine can (see `reproducible_sampling`).
            batch_size: sequences generated together (the hf engine).
            marker: the end-of-reasoning marker; None makes the first generated token the decision.

        Returns:
            For each prompt, its `num_samples` `GeneratedDecision`s.
        """
        raise NotImplementedError

    def with_adapter(self, adapter: str | None) -> "Engine":
        """An engine for the same base model with `adapter` applied (None: the base model).

        vLLM serves it from the same engine (a `LoRARequest`); the hf engine loads the model again.
        """
        raise NotImplementedError

    def info(self) -> dict[str, Any]:
        """What run.json records about the engine: {"engine", "engine_version", "engine_options"}."""
        raise NotImplementedError

    def close(self) -> None:
        """Free the model; the engine cannot be used afterwards."""

    # -- shared ------------------------------------------------------------------------------

    #: whether a sampled call with the same seed gives the same completions on this platform
    reproducible_sampling: bool = True

    def call_size(self, batch_size: int) -> int:
        """How many sequences a caller should hand over in one call, given the user's batch size.

        The hf engine runs what it is given as one batch; vLLM schedules its own batches and is
        fastest when it sees much of the work at once.
        """
        return batch_size

    def check_prompt_lengths(self, lengths: Sequence[int], *, reserve: int = 1, names: Sequence[str] | None = None) -> None:
        """`check_lengths` against this engine's context: `PromptTooLongError` (a ValueError) if a
        prompt of `lengths` tokens plus `reserve` new tokens does not fit.

        `names` (one per prompt, e.g. example ids) goes into the message.
        """
        check_lengths(self.context_length(), lengths, reserve=reserve, names=names, what=self._limit_name())

    def _limit_name(self) -> str:
        return "the model's context"

    def __enter__(self) -> "Engine":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
