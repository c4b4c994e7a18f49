"""The built-in generated task: sentiment of short templated reviews, with adjustable difficulty.

`load_task("builtin", split)` needs no download. Each example is a one-sentence review of a
thing ("The soup was not tasty.") and the decision is its sentiment, `Positive` or `Negative`
(one token each under the Qwen3 and SmolLM2 tokenizers, checked in the tests). The user message
stays under about 60 tokens so that GRPO on a CPU stays affordable.

Difficulty (an int, 0-4; default 2) sets which sentence forms appear:

- 0: plain statements, "The soup was tasty."
- 1: half the sentences are negated: "The soup was not tasty." (gold flips).
- 2: level 1, plus half the sentences open with a misleading expectation of the opposite
  polarity: "I expected the soup to be awful, but it was tasty."
- 3: level 2, plus negations spread over more forms ("was far from", "was never",
  "I would not call the soup tasty") and expectations that agree with the outcome.
- 4: level 3, plus half the sentences open with another thing of the opposite polarity:
  "The tea was lovely, but the soup was hardly tasty."

Measured SmolLM2-135M-Instruct non-reasoning accuracy (`decal.models.load_model(
"smollm2-135m-instruct", dtype="bfloat16")`, constrained argmax over the two decision tokens,
seed 0; `benchmarks/bench_builtin_task.py` prints these numbers):

| difficulty | 0 | 1 | 2 (default) | 3 | 4 |
| --- | --- | --- | --- | --- | --- |
| validation, first 100 | 1.00 | 0.87 | 0.90 | 0.86 | 0.83 |
| test, all 200 | | | 0.86 | 0.82 | 0.81 |

It ranks the two labels almost perfectly on most wordings but puts only about 15 % of the
probability on them, so its confidence is far too low: a task with room for calibration. The
demo config uses the default (2) in-domain and difficulty 3 as its harder out-of-domain set.

Drawing rule (deterministic across runs and platforms): one generator
`numpy.random.default_rng([seed, difficulty])` draws candidate sentences one after another;
a sentence already drawn is skipped, so every text occurs once. The first 500 distinct sentences
form `train`, the next 200 `validation`, the next 200 `test`; the splits are therefore disjoint
and a split never depends on how many examples of another split were asked for. Within a split
the gold labels are balanced by construction: example i is Positive exactly when i is even. `n=` takes the first n examples of a split.

Ids are `"{split}-{i:04d}"` (0-based position in the split).

Spec strings: `"builtin"`, `"builtin:difficulty=1"`, `"builtin:difficulty=3,seed=7,n=100"`;
the same options are keyword arguments of `load_builtin`.
"""

from __future__ import annotations

import numpy as np

from .schema import DecisionExample, PromptTemplate, Task

__all__ = [
    "BUILTIN_NAME",
    "BUILTIN_LABELS",
    "BUILTIN_SPLITS",
    "BUILTIN_TEMPLATE",
    "BUILTIN_OPTIONS",
    "DESCRIPTION",
    "DEFAULT_DIFFICULTY",
    "DEFAULT_SEED",
    "load_builtin",
]

BUILTIN_NAME = "builtin"
BUILTIN_LABELS = ("Positive", "Negative")
# Split sizes, in drawing order (see the module docstring).
BUILTIN_SPLITS = {"train": 500, "validation": 200, "test": 200}
BUILTIN_OPTIONS = ("difficulty", "seed", "n")
DESCRIPTION = "generated sentiment of one-sentence reviews (no download; options difficulty=0-4, seed=, n=)"
DEFAULT_DIFFICULTY = 2
DEFAULT_SEED = 0
MAX_DIFFICULTY = 4

# The wording was chosen by measurement: SmolLM2-135M-Instruct ranks the two labels almost
# perfectly on most wordings but adds a large label-specific offset, so most wordings give a
# constant answer; this one keeps its non-reasoning accuracy between chance and perfect.
_NON_REASONING = "Is the following review Negative or Positive? Reply with one word.\nReview: {input}"
_REASONING = (
    "Is the following review Negative or Positive? Think briefly between <think> and </think>, "
    "then reply with one word on its own line: Negative or Positive.\nReview: {input}"
)

BUILTIN_TEMPLATE = PromptTemplate(
    name="builtin-sentiment", version="1", non_reasoning=_NON_REASONING, reasoning=_REASONING
)

_THINGS = (
    "soup", "movie", "hotel", "service", "concert", "book", "coffee", "game", "trip", "phone",
    "pizza", "show", "room", "lecture", "car", "album", "meal", "staff", "camera", "park",
    "bread", "film", "song", "class", "bike", "museum", "tea", "laptop", "flight", "salad",
)
_POSITIVE = (
    "great", "excellent", "wonderful", "lovely", "fantastic", "delightful", "superb", "pleasant",
    "amazing", "brilliant", "enjoyable", "perfect", "charming", "impressive", "good",
)
_NEGATIVE = (
    "terrible", "awful", "horrible", "dreadful", "boring", "disappointing", "poor", "bad",
    "unpleasant", "mediocre", "dull", "annoying", "disgusting", "useless", "miserable",
)


def _adjective(rng: np.random.Generator, positive: bool) -> str:
    words = _POSITIVE if positive else _NEGATIVE
    return words[int(rng.integers(len(words)))]


def _sentence(rng: np.random.Generator, *, positive: bool, difficulty: int) -> tuple[str, bool]:
    """One review whose sentiment is `positive` (before negation); returns (text, gold positive)."""
    thing = _THINGS[int(rng.integers(len(_THINGS)))]
    # 1. negation flips the gold polarity: the adjective shown has the opposite polarity
    negated = difficulty >= 1 and bool(rng.integers(2))
    shown_positive = positive != negated
    adj = _adjective(rng, shown_positive)
    if not negated:
        claim = f"was {adj}"
    elif difficulty >= 3:
        claim = ("was not", "was far from", "was never", "was hardly")[int(rng.integers(4))] + f" {adj}"
    else:
        claim = f"was not {adj}"
    # 2. a clause of the opposite polarity that does not decide the label (a distractor)
    if difficulty >= 4 and bool(rng.integers(2)):
        other = _THINGS[int(rng.integers(len(_THINGS)))]
        if other != thing:
            return f"The {other} was {_adjective(rng, not positive)}, but the {thing} {claim}.", positive
    if difficulty >= 2 and bool(rng.integers(2)):
        agree = difficulty >= 3 and bool(rng.integers(3) == 0)
        expected = _adjective(rng, positive if agree else not positive)
        link = "and" if agree else "but"
        return f"I expected the {thing} to be {expected}, {link} it {claim}.", positive
    if negated and difficulty >= 3 and bool(rng.integers(2)):
        return f"I would not call the {thing} {adj}.", positive
    return f"The {thing} {claim}.", positive


def _draw(seed: int, difficulty: int) -> dict[str, list[tuple[str, bool]]]:
    rng = np.random.default_rng([seed, difficulty])
    seen: set[str] = set()
    splits: dict[str, list[tuple[str, bool]]] = {}
    for split, size in BUILTIN_SPLITS.items():
        rows: list[tuple[str, bool]] = []
        attempts = 0
        while len(rows) < size:
            attempts += 1
            if attempts > 100 * size:  # the sentence space is far larger; this guards a bad edit
                raise RuntimeError(f"could not draw {size} distinct sentences for split {split!r}")
            text, positive = _sentence(rng, positive=len(rows) % 2 == 0, difficulty=difficulty)
            if text in seen:
                continue
            seen.add(text)
            rows.append((text, positive))
        splits[split] = rows
    return splits


def load_builtin(
    split: str,
    *,
    difficulty: int = DEFAULT_DIFFICULTY,
    seed: int = DEFAULT_SEED,
    n: int | None = None,
    reasoning: bool = False,
) -> Task:
    """Generate one split of the built-in sentiment task (see the module docstring).

    Args:
        split: "train" (500), "validation" (200) or "test" (200).
        difficulty: int in [0, 4]; higher adds negations and misleading clauses. Default 2.
        seed: int; the same seed and difficulty always give the same examples.
        n: keep only the first n examples of the split (1 <= n <= split size); None keeps all.
        reasoning: whether the task renders the reasoning prompt variant.

    Returns:
        A `Task` named "builtin" with labels ("Positive", "Negative").

    Raises:
        ValueError: unknown split, or difficulty / n out of range.
    """
    if split not in BUILTIN_SPLITS:
        raise ValueError(
            f"`split` must be one of {list(BUILTIN_SPLITS)} for task 'builtin'; got {split!r}"
        )
    if not isinstance(difficulty, int) or not 0 <= difficulty <= MAX_DIFFICULTY:
        raise ValueError(f"`difficulty` must be an integer in [0, {MAX_DIFFICULTY}]; got {difficulty!r}")
    size = BUILTIN_SPLITS[split]
    if n is not None and (not isinstance(n, int) or not 1 <= n <= size):
        raise ValueError(f"`n` must be an integer in [1, {size}] for split {split!r}; got {n!r}")
    rows = _draw(int(seed), difficulty)[split][: n or size]
    examples = tuple(
        DecisionExample(
            id=f"{split}-{i:04d}",
            labels=BUILTIN_LABELS,
            label=BUILTIN_LABELS[0] if positive else BUILTIN_LABELS[1],
            input=text,
            meta={"difficulty": difficulty, "seed": int(seed)},
        )
        for i, (text, positive) in enumerate(rows)
    )
    return Task(name=BUILTIN_NAME, split=split, examples=examples, template=BUILTIN_TEMPLATE, reasoning=reasoning)
