"""`POST /v1/moderations`: OpenAI's moderation request and response, for two-label safety tasks.

Request (OpenAI's): ``{"input": TEXT | [TEXT, ...] | [{"type": "text", "text": TEXT}, ...],
"model": NAME}``; ``model`` is optional and does not change which model answers (the response
names the served one). An array of content parts is one input, its text parts joined by
newlines, as OpenAI treats a multi-modal input as one; image parts are refused (422).

Response (OpenAI's ``ModerationCreateResponse``): ``{"id", "model", "results": [{"flagged",
"categories", "category_scores", "category_applied_input_types"}]}``, one result per input.
A two-label task makes one decision for all of OpenAI's categories, so every category carries
it: ``flagged`` and each ``categories[c]`` are true when the decision is the unsafe label, and
each ``category_scores[c]`` is the calibrated probability of the unsafe label (the raw
full-vocabulary one when no calibrator is loaded). Each result adds a ``decal`` object (the
decision, confidences, label mass, ``defer`` and why, the guarantees, ``valid``, and the
``decision_id`` that `/v1/feedback` takes), which OpenAI's clients keep as an extra field.
"""

from __future__ import annotations

import uuid
from typing import Sequence

from .decider import Answer, InputError, json_type

__all__ = ["OPENAI_CATEGORIES", "unsafe_label_of", "parse_moderation", "moderation_response"]

# OpenAI's moderation categories (API reference, "The moderation object").
OPENAI_CATEGORIES = (
    "harassment", "harassment/threatening", "hate", "hate/threatening", "illicit", "illicit/violent",
    "self-harm", "self-harm/instructions", "self-harm/intent", "sexual", "sexual/minors", "violence",
    "violence/graphic",
)
_REQUEST_KEYS = ("input", "model")


def unsafe_label_of(labels: Sequence[str], unsafe_label: str | None = None) -> str | None:
    """The label `/v1/moderations` flags: `unsafe_label`, else the one spelled "unsafe" (any case).

    Returns None when the task has no such label or not exactly two labels (no moderation endpoint).

    Raises:
        ValueError: `unsafe_label` given but not one of two labels.

    Example:
        >>> unsafe_label_of(("Safe", "Unsafe")), unsafe_label_of(("A", "B", "C"))
        ('Unsafe', None)
    """
    labels = tuple(labels)
    if unsafe_label is not None:
        if len(labels) != 2 or unsafe_label not in labels:
            raise ValueError(
                f"`--unsafe-label` must be one of a two-label task's labels; got {unsafe_label!r} for labels {list(labels)}"
            )
        return unsafe_label
    if len(labels) != 2:
        return None
    return next((lab for lab in labels if lab.strip().lower() == "unsafe"), None)


def _content_parts(parts: list, param: str) -> str:
    texts = []
    for j, part in enumerate(parts):
        where = f"{param}[{j}]"
        if not isinstance(part, dict):
            raise InputError(where, f"must be an object {{\"type\": \"text\", \"text\": ...}}; got {json_type(part)}")
        kind = part.get("type")
        if kind == "image_url":
            raise InputError(f"{where}.type", "image inputs are not supported; send text")
        if kind != "text":
            raise InputError(f"{where}.type", f"must be \"text\"; got {kind!r}" if isinstance(kind, str) else "missing or not a string")
        unknown = set(part) - {"type", "text"}
        if unknown:
            raise InputError(f"{where}.{sorted(unknown)[0]}", "unknown field")
        text = part.get("text")
        if not isinstance(text, str):
            raise InputError(f"{where}.text", f"must be a string; got {json_type(text)}")
        texts.append(text)
    return "\n".join(texts)


def parse_moderation(body: dict) -> list[str]:
    """The input texts of a moderation request; raises `InputError` naming the field and index."""
    for key in body:
        if key not in _REQUEST_KEYS:
            raise InputError(key, f"unknown field; a moderation request takes {', '.join(_REQUEST_KEYS)}")
    if "model" in body and not isinstance(body["model"], str):
        raise InputError("model", f"must be a string; got {json_type(body['model'])}")
    if "input" not in body:
        raise InputError("input", "missing")
    value = body["input"]
    if isinstance(value, str):
        return [value]
    if not isinstance(value, list):
        raise InputError("input", f"must be a string, an array of strings, or an array of content parts; got {json_type(value)}")
    if value and all(isinstance(v, dict) for v in value):
        return [_content_parts(value, "input")]
    for i, v in enumerate(value):
        if not isinstance(v, str):
            raise InputError(f"input[{i}]", f"must be a string (do not mix strings and content parts); got {json_type(v)}")
    return list(value)


def moderation_response(answers: Sequence[Answer], *, model: str, unsafe_label: str,
                        decision_ids: Sequence[str] | None = None) -> dict:
    """OpenAI's moderation response for `answers` (module docstring)."""
    results = []
    for i, a in enumerate(answers):
        flagged = a.record.prediction == unsafe_label
        score = a.calibrated_probs[a.record.labels.index(unsafe_label)]
        results.append({
            "flagged": flagged,
            "categories": {c: flagged for c in OPENAI_CATEGORIES},
            "category_scores": {c: score for c in OPENAI_CATEGORIES},
            "category_applied_input_types": {c: ["text"] for c in OPENAI_CATEGORIES},
            "decal": {
                "decision": a.record.prediction,
                "unsafe_label": unsafe_label,
                "confidence": a.record.confidence,
                "calibrated_confidence": a.calibrated_confidence,
                "label_mass": a.record.label_mass,
                "defer": a.defer,
                "deferred_because": list(a.verdict.reasons),
                "guarantees": list(a.verdict.guarantees),
                "valid": a.record.valid,
                "decision_id": decision_ids[i] if decision_ids is not None else None,
            },
        })
    return {"id": f"modr-{uuid.uuid4().hex}", "model": model, "results": results}
