"""Decision tokens and decision positions: the one implementation that evaluation, training
rewards and analysis all call (docs/design.md, "Decision token" and "Decision position").

- `option_token_ids` tokenizes each option label in context (after the text that precedes the
  decision) and takes, for every option, the token at the first position where the option
  sequences differ. Those tokens must be distinct; a collision raises an error that names the
  options and the shared token. It is the one function every caller uses (evaluation, the
  analyses, the server, training), with one cache: the result is a pure function of the
  tokenizer, the labels and the last `CONTEXT_TAIL` characters of the context, and exactly that
  is the key.
- `check_decision_positions` checks, before scoring, that each prompt's decision token sits
  where the scorer reads it: the prompt's ids are a prefix of the tokenization of its context
  plus each label, and the label's decision token comes right after them.
- `find_decision` locates the decision position in a generated completion: the first
  non-whitespace token after the end-of-reasoning marker, whether the marker is one special
  token (`</think>` in Qwen3) or plain text spread over several tokens (SmolLM2).
"""

from __future__ import annotations

import weakref
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

from .errors import DecisionPositionError, DecisionTokenCollisionError

__all__ = [
    "END_OF_REASONING",
    "CONTEXT_TAIL",
    "DecisionTokens",
    "Decision",
    "option_token_ids",
    "check_decision_positions",
    "find_decision",
    "marker_token_id",
    "stop_token_ids",
    "forced_decision_suffix",
]

END_OF_REASONING = "</think>"
# Characters of the context that `option_token_ids` reads: enough for any BPE merge across the
# label boundary, few enough that the cost does not grow with the prompt.
CONTEXT_TAIL = 256
# Distinct (labels, context tail) entries kept per tokenizer; a task's prompts share a handful.
_CACHE_SIZE = 1024


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


# tokenizer -> LRU of (vocabulary size, labels, context tail) -> DecisionTokens. Weak keys: a
# tokenizer's entries go with it. The vocabulary size is in the key because adding tokens to a
# tokenizer changes how it splits text.
_TOKENS_CACHE: "weakref.WeakKeyDictionary[object, OrderedDict]" = weakref.WeakKeyDictionary()


def option_token_ids(tokenizer, labels: Sequence[str], *, context: str = "") -> DecisionTokens:
    """Find each option's decision token, in context (cached, see the module docstring).

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
    tail = context[-CONTEXT_TAIL:]
    try:
        cache = _TOKENS_CACHE.setdefault(tokenizer, OrderedDict())
    except TypeError:  # a tokenizer that cannot be weakly referenced: computed every time
        return _option_token_ids(tokenizer, labels, tail)
    key = (len(tokenizer), labels, tail)
    found = cache.get(key)
    if found is None:
        found = cache[key] = _option_token_ids(tokenizer, labels, tail)
        if len(cache) > _CACHE_SIZE:
            cache.popitem(last=False)
    else:
        cache.move_to_end(key)
    return found


def _option_token_ids(tokenizer, labels: tuple[str, ...], tail: str) -> DecisionTokens:
    if len(labels) < 2:
        raise ValueError(f"`labels` must hold at least two options; got {list(labels)!r}")
    if len(set(labels)) != len(labels):
        raise ValueError(f"`labels` must be distinct; got {list(labels)!r}")
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


def check_decision_positions(
    tokenizer,
    prompt_ids: Sequence[Sequence[int]],
    contexts: Sequence[str],
    decision_tokens: Sequence[DecisionTokens],
    *,
    names: Sequence[str],
) -> None:
    """Check that each prompt's decision token sits where a scorer reads it: right after its ids.

    For every prompt and label, the tokenization of `context + label` must start with the
    prompt's ids and continue with that label's decision token. Where it does not, the label
    merges with the end of the prompt (a template ending in a space before the label) or the
    labels share their first token, and the option probabilities read after the prompt would be
    those of other tokens.

    Args:
        tokenizer: the tokenizer that produced `prompt_ids`.
        prompt_ids: (N,) the token ids after which the decision is read.
        contexts: (N,) the text those ids encode (`decal.tasks.prompts.decision_context`).
        decision_tokens: (N,) each prompt's `DecisionTokens` (from `option_token_ids`).
        names: (N,) what the message calls each prompt (an example id, ``inputs[3]``).

    Raises:
        DecisionPositionError: one line naming the first prompt that fails, the label and the
            token where the two tokenizations part.
    """
    if not (len(prompt_ids) == len(contexts) == len(decision_tokens) == len(names)):
        raise ValueError("`prompt_ids`, `contexts`, `decision_tokens` and `names` must have one entry per prompt")
    texts = [context + label for context, tokens in zip(contexts, decision_tokens) for label in tokens.labels]
    encoded = iter(tokenizer(texts, add_special_tokens=False)["input_ids"]) if texts else iter(())
    for ids, tokens, name in zip(prompt_ids, decision_tokens, names):
        ids = [int(i) for i in ids]
        n = len(ids)
        for label, token_id, token in zip(tokens.labels, tokens.token_ids, tokens.tokens):
            full = list(next(encoded))
            if full[:n] != ids:
                at = next((j for j, (a, b) in enumerate(zip(full, ids)) if a != b), min(len(full), n))
                got = tokenizer.convert_ids_to_tokens(full[at]) if at < len(full) else "(end)"
                raise DecisionPositionError(
                    f"example {name!r}: the prompt's {n} token ids are not a prefix of the tokenization of the "
                    f"prompt + label {label!r} (they part at token {at}: {tokenizer.convert_ids_to_tokens(ids[at])!r} "
                    f"vs {got!r}), so the decision would be read at the wrong position; end the prompt "
                    f"template with a newline or other text that does not merge with the label", name=name
                )
            if len(full) <= n or full[n] != token_id:
                after = tokenizer.convert_ids_to_tokens(full[n]) if len(full) > n else "(nothing)"
                raise DecisionPositionError(
                    f"example {name!r}: the first token after the prompt for label {label!r} is {after!r}, not its "
                    f"decision token {token!r}, so the decision would be read at the wrong position; give the "
                    f"labels different first tokens", name=name
                )


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
