"""The verdicts task: a generated decision whose answer probability is known for every example.

`load_task("verdicts", split)` needs no download. Each example lists short reviewer verdicts on
an item ("great, poor, fine, awful, superb") and the decision is the overall verdict, `Positive`
or `Negative` (one token each under the Qwen3 and SmolLM2 tokenizers, as for `builtin`). Unlike
every other task, the gold label is not a fact about the text: it is drawn from a probability the
generator knows and stores, so a model's confidence can be compared with the right confidence of
each example (`DecisionExample.true_probs`, carried into every prediction record; the truth
metrics of `decal.metrics` read it).

Truth. With ``n_pos`` positive and ``n_neg`` negative verdicts (neutral ones count 0),

    P(Positive | verdicts) = sigmoid(BETA * (n_pos - n_neg)),   BETA = 1,

rounded to 6 decimals (`PRECISION`); the gold label is drawn from it. Each verdict is positive with
probability 2/5, negative 2/5 and neutral 1/5; its word is drawn uniformly from that kind's words.

| variant | verdicts | words | Bayes accuracy (exact) | true P(chosen option) |
| --- | --- | --- | --- | --- |
| `in` (default) | 5 | in-domain lexicon | 0.776 | 0.5 (18 %), 0.73, 0.88, 0.95, 0.98, 0.99 |
| `ood` | 7 | other words, same kinds | 0.800 | 0.5 (16 %) to 0.999 |

(The exact Bayes accuracy is ``E[max(p, 1 - p)]`` under the verdict distribution; the measured
value of each split is within its sampling error, see the tests.) A model that has learned to
count signs transfers to `ood`; one that memorised the in-domain words does not, and the longer
lists shift the counts.

Warm-start rationale (`DecisionExample.reasoning`): each verdict with its sign, then the counts,
e.g. ``"great +, poor -, fine 0, awful -, superb +: 2 positive, 2 negative."``; the reasoning
warm start (`decal train --method sft --reasoning`) trains on it.

Drawing rule (deterministic across runs and platforms: integer draws only). One generator
`numpy.random.default_rng([seed, variant_code])` draws, per example, each verdict's kind and word
and then an integer ``u`` in [0, 10^6); the label is Positive exactly when ``u < round(10^6 p)``.
A verdict list already drawn is skipped, so every text occurs once. The first 1,000 distinct
examples form `train`, the next 500 `validation`, the next 500 `test`: the splits are disjoint and
a split never depends on how many examples of another were asked for. `n=` keeps the first n.

Ids are ``"{split}-{i:04d}"``. Spec strings: ``"verdicts"``, ``"verdicts:variant=ood"``,
``"verdicts:seed=3,n=100"``; the same options are keyword arguments of `load_verdicts`.
"""

from __future__ import annotations

import math

import numpy as np

from .schema import DecisionExample, PromptTemplate, Task

__all__ = [
    "VERDICTS_NAME",
    "VERDICTS_LABELS",
    "VERDICTS_SPLITS",
    "VERDICTS_OPTIONS",
    "VERDICTS_TEMPLATE",
    "VARIANTS",
    "BETA",
    "PRECISION",
    "DESCRIPTION",
    "true_probability",
    "rationale",
    "load_verdicts",
]

VERDICTS_NAME = "verdicts"
VERDICTS_LABELS = ("Positive", "Negative")
VERDICTS_SPLITS = {"train": 1000, "validation": 500, "test": 500}
VERDICTS_OPTIONS = ("variant", "seed", "n")
DESCRIPTION = (
    "generated reviewer verdicts with a known answer probability, sigmoid(#positive - #negative) "
    "(no download; options variant=in|ood, seed=, n=)"
)
BETA = 1.0
#: Decimals of the stored probabilities; the label draw uses the same rounded value.
PRECISION = 6
_SCALE = 10**PRECISION


class _Variant:
    def __init__(self, code: int, n_verdicts: int, positive: tuple, negative: tuple, neutral: tuple):
        self.code, self.n_verdicts = code, n_verdicts
        self.words = {1: positive, -1: negative, 0: neutral}


VARIANTS = {
    "in": _Variant(
        0, 5,
        positive=("great", "excellent", "good", "superb", "lovely", "brilliant"),
        negative=("poor", "awful", "bad", "terrible", "dreadful", "weak"),
        neutral=("fine", "okay", "average"),
    ),
    "ood": _Variant(
        1, 7,
        positive=("wonderful", "fantastic", "splendid", "outstanding", "marvelous"),
        negative=("horrible", "dismal", "lousy", "abysmal", "atrocious"),
        neutral=("so-so", "passable", "middling", "fair"),
    ),
}
# Verdict kind from one draw in [0, 5): two fifths positive, two negative, one neutral.
_KIND = (1, 1, -1, -1, 0)
_SIGN = {1: "+", -1: "-", 0: "0"}

_QUESTION = "Reviewers gave an item these verdicts: {input}.\nIs the overall verdict Negative or Positive?"
VERDICTS_TEMPLATE = PromptTemplate(
    name="verdicts",
    version="1",
    non_reasoning=_QUESTION + " Reply with one word.",
    reasoning=_QUESTION + (
        " Think briefly between <think> and </think>: mark each verdict +, - or 0 and count them. "
        "Then reply with one word on its own line: Negative or Positive."
    ),
)


def true_probability(n_positive: int, n_negative: int) -> float:
    """P(Positive) of a verdict list, rounded to `PRECISION` decimals (the module docstring's formula).

    Example:
        >>> true_probability(3, 2), true_probability(1, 1), true_probability(0, 3)
        (0.731059, 0.5, 0.047426)
    """
    return round(1.0 / (1.0 + math.exp(-BETA * (n_positive - n_negative))), PRECISION)


def rationale(words, kinds) -> str:
    """The warm-start reasoning: each verdict with its sign, then the counts.

    Example:
        >>> rationale(["great", "poor", "fine"], [1, -1, 0])
        'great +, poor -, fine 0: 1 positive, 1 negative.'
    """
    marks = ", ".join(f"{w} {_SIGN[k]}" for w, k in zip(words, kinds))
    return f"{marks}: {sum(k == 1 for k in kinds)} positive, {sum(k == -1 for k in kinds)} negative."


def _draw_one(rng: np.random.Generator, variant: _Variant) -> tuple[list[str], list[int], int, bool]:
    """(words, kinds, probability numerator out of 10^6, gold positive) of one example."""
    kinds = [_KIND[int(rng.integers(5))] for _ in range(variant.n_verdicts)]
    words = [variant.words[k][int(rng.integers(len(variant.words[k])))] for k in kinds]
    numerator = round(_SCALE * true_probability(kinds.count(1), kinds.count(-1)))
    positive = int(rng.integers(_SCALE)) < numerator
    return words, kinds, numerator, positive


def _draw(seed: int, variant: _Variant, sizes: dict[str, int]) -> dict[str, list[tuple]]:
    rng = np.random.default_rng([seed, variant.code])
    seen: set[str] = set()
    splits: dict[str, list[tuple]] = {}
    for split, size in sizes.items():
        rows: list[tuple] = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 100 * size:  # the verdict space is far larger; this guards a bad edit
                raise RuntimeError(f"could not draw {size} distinct verdict lists for split {split!r}")
            words, kinds, numerator, positive = _draw_one(rng, variant)
            text = ", ".join(words)
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, words, kinds, numerator, positive))
        splits[split] = rows
    return splits


def load_verdicts(
    split: str,
    *,
    variant: str = "in",
    seed: int = 0,
    n: int | None = None,
    reasoning: bool = False,
) -> Task:
    """Generate one split of the verdicts task (see the module docstring).

    Args:
        split: "train" (1,000), "validation" (500) or "test" (500).
        variant: "in" (5 verdicts, the in-domain words) or "ood" (7 verdicts, other words).
        seed: int >= 0; the same seed and variant always give the same examples.
        n: keep only the first n examples of the split (1 <= n <= split size); None keeps all.
        reasoning: whether the task renders the reasoning prompt variant.

    Returns:
        A `Task` named "verdicts" with labels ("Positive", "Negative"); every example carries
        `true_probs` (P(Positive), P(Negative)) and the warm-start `reasoning`.

    Raises:
        ValueError: unknown split or variant, or seed / n out of range.
    """
    if split not in VERDICTS_SPLITS:
        raise ValueError(f"`split` must be one of {list(VERDICTS_SPLITS)} for task 'verdicts'; got {split!r}")
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)} for task 'verdicts'; got {variant!r}")
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise ValueError(f"`seed` must be an integer >= 0; got {seed!r}")
    size = VERDICTS_SPLITS[split]
    if n is not None and (not isinstance(n, int) or not 1 <= n <= size):
        raise ValueError(f"`n` must be an integer in [1, {size}] for split {split!r}; got {n!r}")
    rows = _draw(seed, VARIANTS[variant], VERDICTS_SPLITS)[split][: n or size]
    examples = tuple(
        DecisionExample(
            id=f"{split}-{i:04d}",
            labels=VERDICTS_LABELS,
            label=VERDICTS_LABELS[0] if positive else VERDICTS_LABELS[1],
            input=text,
            true_probs=(numerator / _SCALE, (_SCALE - numerator) / _SCALE),
            reasoning=rationale(words, kinds),
            meta={"variant": variant, "seed": seed, "n_positive": kinds.count(1), "n_negative": kinds.count(-1)},
        )
        for i, (text, words, kinds, numerator, positive) in enumerate(rows)
    )
    return Task(name=VERDICTS_NAME, split=split, examples=examples, template=VERDICTS_TEMPLATE, reasoning=reasoning)
