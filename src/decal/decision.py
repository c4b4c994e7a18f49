"""Decision tokens and decision positions: the one implementation that evaluation, training
rewards and analysis all call (docs/design.md, "Decision token" and "Decision position").

- `option_token_ids` tokenizes each option label in context (after the text that precedes the
  decision) and takes, for every option, the token at the first position where the option
  sequences differ. Those tokens must be distinct; a collision raises an error that names the
  options and the shared token.
- `find_decision` locates the decision position in a generated completion: the first
  non-whitespace token after the end-of-reasoning marker, whether the marker is one special
  token (`</think>` in Qwen3) or plain text spread over several tokens (SmolLM2).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from .errors import DecisionTokenCollisionError

__all__ = [
    "END_OF_REASONING",
    "DecisionTokens",
    "Decision",
    "option_token_ids",
    "find_decision",
    "marker_token_id",
    "stop_token_ids",
    "forced_decision_suffix",
]

END_OF_REASONING = "</think>"


@dataclass(frozen=True)
class DecisionTokens:
    """The decision token of each option under one tokenizer.

    labels: the option labels, in task order (K,).
    token_ids: the decision token id of each option (K,).
    tokens: those tokens as strings, for records and messages (K,).
    """

    labels: tuple[str, ...]
    token_ids: tuple[int, ...]
    tokens: tuple[str, ...]

    def option_of(self, token_id: int) -> int:
        """The option index whose decision token is `token_id`, or -1."""
        try:
            return self.token_ids.index(int(token_id))
        except ValueError:
            return -1


def _encode(tokenizer, text: str) -> list[int]:
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def option_token_ids(tokenizer, labels: Sequence[str], *, context: str = "") -> DecisionTokens:
    """Find each option's decision token, in context.

    Args:
        tokenizer: a Hugging Face tokenizer.
        labels: the option labels, e.g. ``["A", "B", "C", "D", "E"]`` or ``["Safe", "Unsafe"]``.
        context: the text that precedes the decision (the rendered prompt, or the prompt plus
            reasoning and end-of-reasoning marker). Only its tail can affect the result; pass the
            real one so merges across the boundary are seen.

    Returns:
        DecisionTokens with one distinct token per option.

    Raises:
        ValueError: fewer than two labels, or duplicate labels.
        DecisionTokenCollisionError: two options share their decision token, or one option's
            tokens are a prefix of another's.
    """
    labels = tuple(labels)
    if len(labels) < 2:
        raise ValueError(f"`labels` must hold at least two options; got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"`labels` must be distinct; got {list(labels)!r}")
    # Only the tail of a long prompt can merge with the label; keep enough characters for any
    # BPE merge while keeping the cost independent of prompt length.
    tail = context[-256:]
    sequences = [_encode(tokenizer, tail + label) for label in labels]
    # 1. first position at which the option sequences are not all equal
    position = 0
    while all(position < len(s) for s in sequences) and len({s[position] for s in sequences}) == 1:
        position += 1
    name = type(tokenizer).__name__
    short = [lab for lab, s in zip(labels, sequences) if position >= len(s)]
    if short:
        raise DecisionTokenCollisionError(
            f"options {short} are a prefix of other options under tokenizer {name}, "
            f"so no single token tells them apart; rename the labels"
        )
    ids = [s[position] for s in sequences]
    # 2. each option's token at that position must be its own
    by_id: dict[int, list[str]] = {}
    for lab, tid in zip(labels, ids):
        by_id.setdefault(tid, []).append(lab)
    clashes = {tid: labs for tid, labs in by_id.items() if len(labs) > 1}
    if clashes:
        tid, labs = next(iter(clashes.items()))
        token = tokenizer.convert_ids_to_tokens(tid)
        raise DecisionTokenCollisionError(
            f"options {labs} share the decision token {token!r} (id {tid}) under tokenizer {name}; "
            f"give them labels that differ in their first token"
        )
    tokens = tuple(tokenizer.convert_ids_to_tokens(ids))
    return DecisionTokens(labels=labels, token_ids=tuple(ids), tokens=tokens)


@dataclass(frozen=True)
class Decision:
    """Where the decision sits in a completion, and what was emitted there.

    index: position in the completion of the first non-whitespace token after the marker, or -1
        when the completion has no marker or nothing after it (truncated).
    option: the option index whose decision token was emitted at `index`, or -1.
    """

    index: int
    option: int

    @property
    def valid(self) -> bool:
        return self.index >= 0 and self.option >= 0


def marker_token_id(tokenizer, marker: str = END_OF_REASONING) -> int | None:
    """The id of `marker` when the tokenizer has it as one (special/added) token, else None."""
    ids = _encode(tokenizer, marker)
    return ids[0] if len(ids) == 1 else None


def stop_token_ids(tokenizer, model=None) -> list[int]:
    """The ids that end a completion, for `find_decision(stop_ids=...)`: the tokenizer's EOS and
    padding, plus the model's generation-config EOS ids when a model is given (Qwen3 and SmolLM2
    end chat turns with `<|im_end|>`, which may differ from `tokenizer.eos_token`)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(eos if isinstance(eos, (list, tuple)) else [eos])
    ids.update({tokenizer.eos_token_id, tokenizer.pad_token_id})
    return sorted(int(i) for i in ids if i is not None)


def forced_decision_suffix(completion: str, marker: str | None = END_OF_REASONING) -> str:
    """The text appended to a completion that reached no decision, to force one (docs/design.md, "Forced decision"):
    the marker and the newline before the label; nothing when the completion already holds the
    marker (it stopped right after it, at the decision position) or there is no marker."""
    if marker is None or marker in completion:
        return ""
    return marker + "\n"


def _piece_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    # Decoding token by token keeps a 1:1 map from tokens to text pieces. The marker and the
    # whitespace test only look at ASCII, which byte-level BPE never splits inside a piece.
    return [tokenizer.decode([int(i)], skip_special_tokens=False) for i in ids]


def find_decision(
    completion_ids: Sequence[int],
    tokenizer,
    decision_tokens: DecisionTokens,
    *,
    marker: str | None = END_OF_REASONING,
    stop_ids: Sequence[int] = (),
) -> Decision:
    """Locate the decision in a generated completion (token ids after the prompt).

    Args:
        completion_ids: generated token ids, without the prompt; padding after an EOS is allowed.
        tokenizer: the tokenizer that produced them.
        decision_tokens: from `option_token_ids`.
        marker: the end-of-reasoning marker; None for non-reasoning mode, where the decision is
            the first generated token.
        stop_ids: ids that end the completion (EOS, padding): tokens after the first of them
            are ignored.

    Returns:
        A `Decision`; `Decision.valid` is False when there is no marker, nothing after it, or the
        token there is not an option's decision token.

    Example:
        >>> from types import SimpleNamespace
        >>> # a toy tokenizer: one character per token
        >>> tok = SimpleNamespace(decode=lambda ids, **k: "".join(chr(i) for i in ids))
        >>> dt = DecisionTokens(labels=("A", "B"), token_ids=(65, 66), tokens=("A", "B"))
        >>> ids = [ord(c) for c in "think</think>\\n B"]
        >>> find_decision(ids, tok, dt, marker="</think>", stop_ids=())
        Decision(index=15, option=1)
    """
    ids = [int(i) for i in completion_ids]
    stops = {int(s) for s in stop_ids}
    end = next((j for j, t in enumerate(ids) if t in stops), len(ids))
    if marker is None:
        return Decision(index=0, option=decision_tokens.option_of(ids[0])) if end > 0 else Decision(-1, -1)
    pieces = _piece_texts(tokenizer, ids[:end])
    # 1. find where the marker ends, as the index of the first token after it
    text, offsets = "", []
    for piece in pieces:
        offsets.append(len(text))
        text += piece
    at = text.find(marker)
    if at < 0:
        return Decision(-1, -1)
    marker_end = at + len(marker)
    # 2. the first token holding text after the marker, skipping whitespace-only text; a token
    #    that straddles the marker end counts by its part after the marker
    for j in range(len(pieces)):
        after = pieces[j][max(0, marker_end - offsets[j]):] if offsets[j] + len(pieces[j]) > marker_end else ""
        if after.strip():
            return Decision(index=j, option=decision_tokens.option_of(ids[j]))
    return Decision(-1, -1)
