"""The decision pipeline behind `decal serve`: request inputs -> prompts -> engine -> calibrator -> answers.

`Decider` holds the task (its labels and prompt template), the engine, the calibrator and the
threshold, and splits the work in three steps so the HTTP layer can answer bad input before
anything is queued:

1. `parse` checks the JSON inputs against the fields the task's template uses and builds
   `DecisionExample`s; an input is a string (for templates with one text field: ``input`` or
   ``question``) or an object with exactly the template's fields (``question``, ``options``,
   ``fact``, ``input``) and an optional ``id``. Errors name the field and index
   (``inputs[3].options``).
2. `prepare` renders, tokenizes and checks each prompt with `decal.recording.prepare_prompts`
   (its decision tokens in its own context, cached, and their position), then checks it against
   the model's context, exactly as `decal evaluate` does.
3. `decide` (blocking; the server runs it on its worker thread) scores a batch through the
   engine and builds its records with `decal.recording.score_records`, `decal evaluate`'s own
   path, applies the calibrator with `decal.calibrators.apply_calibrator` and the deferral rules
   (`decal.serve.policy`: threshold, option set, label mass) to the calibrated records.

Served examples carry no gold label: their records have ``label`` and ``correct`` None.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Any, Sequence

from ..decision import END_OF_REASONING
from ..errors import DecisionPositionError
from ..records import PredictionRecord
from ..recording import PreparedPrompt, RunFields, prepare_prompts, score_records
from ..tasks.schema import DecisionExample, Task
from .policy import DeferralPolicy, Verdict
from .settings import CalibratorInfo, ThresholdInfo

__all__ = ["InputError", "Answer", "Decider", "template_fields", "json_type"]

_TEXT_FIELDS = ("question", "input", "fact")
_ID_MAX = 256


class InputError(ValueError):
    """A request input that cannot be decided; `param` names the field and index (``inputs[2].options``)."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param, self.message = param, message


@dataclass(frozen=True)
class Answer:
    """One decision: the raw record (as `decal evaluate` writes it), the calibrated one, and the
    policy's verdict (`defer`, why, the guarantees that apply, the option set)."""

    record: PredictionRecord
    calibrated: PredictionRecord
    verdict: Verdict

    @property
    def defer(self) -> bool:
        return self.verdict.defer

    @property
    def calibrated_probs(self) -> list[float]:
        """After the calibrator; the raw option probabilities when the server has none."""
        c = self.calibrated
        return c.option_probs if c.calibrated_probs is None else c.calibrated_probs

    @property
    def calibrated_confidence(self) -> float:
        c = self.calibrated
        return c.confidence if c.calibrated_confidence is None else c.calibrated_confidence

    def to_dict(self, *, reasoning: bool) -> dict[str, Any]:
        labels = self.record.labels
        out = {
            "id": self.record.id,
            "decision": self.record.prediction,
            "option_probs": dict(zip(labels, self.record.option_probs)),
            "confidence": self.record.confidence,
            "label_mass": self.record.label_mass,
            "calibrated_option_probs": dict(zip(labels, self.calibrated_probs)),
            "calibrated_confidence": self.calibrated_confidence,
            "defer": self.defer,
            "deferred_because": list(self.verdict.reasons),
            "guarantees": list(self.verdict.guarantees),
            "valid": self.record.valid,
            "emitted_token": self.record.emitted_token,
            "argmax_is_option": self.record.argmax_is_option,
        }
        if self.verdict.option_set is not None:
            out["option_set"] = self.verdict.option_set
        if reasoning:
            out["reasoning"] = self.record.completion
        return out


def template_fields(text: str) -> set[str]:
    """The `str.format` fields a prompt template uses ({question}, {options}, {option1}, ...)."""
    return {field for _, field, _, _ in string.Formatter().parse(text) if field}


def _text(value, param: str) -> str:
    if not isinstance(value, str):
        raise InputError(param, f"must be a string; got {json_type(value)}")
    if not value.strip():
        raise InputError(param, "must not be empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise InputError(param, f"is not valid Unicode text ({e.reason} at character {e.start})") from e
    return value


def json_type(value) -> str:
    """The JSON name of a decoded value's type, for messages ("array", "object", "null", ...)."""
    names = {bool: "boolean", int: "number", float: "number", str: "string", list: "array", dict: "object"}
    return "null" if value is None else names.get(type(value), type(value).__name__)


class Decider:
    """Turns request inputs into calibrated decisions with deferral (module docstring).

    Args:
        task: the task whose labels and template define the prompt (`task.reasoning` picks the mode).
        engine: a `decal.engines.Engine` (hf or vllm).
        model_name, adapter: recorded in every record, as `decal evaluate` records them.
        calibrator: applied to every record (None: calibrated values equal the raw ones).
        threshold: defer when the calibrated confidence is below it (None: never defer); the
            shorthand for a `policy` with a threshold only.
        policy: the deferral rules (`decal.serve.policy.DeferralPolicy`); overrides `threshold`.
        max_new_tokens: reasoning mode's generation budget (greedy decoding).
    """

    def __init__(
        self, task: Task, engine, *, model_name: str, adapter: str | None = None,
        calibrator: CalibratorInfo | None = None, threshold: ThresholdInfo | None = None,
        max_new_tokens: int = 256, marker: str = END_OF_REASONING, policy: DeferralPolicy | None = None,
    ):
        self.task, self.engine = task, engine
        self.labels = tuple(task.labels)
        self.calibrator = calibrator
        self.policy = policy or DeferralPolicy(threshold=threshold, labels=self.labels)
        self.marker = marker
        self.max_new_tokens = int(max_new_tokens)
        self.reserve = max_new_tokens if task.reasoning else 1
        self.run = RunFields.of(task, model=model_name, adapter=adapter, seed=0)
        text = task.template.reasoning if task.reasoning else task.template.non_reasoning
        fields = template_fields(text)
        self.needs_options = "options" in fields or any(f.startswith("option") and f[6:].isdigit() for f in fields)
        self.text_fields = tuple(f for f in _TEXT_FIELDS if f in fields)
        self.fields = (*self.text_fields, *(("options",) if self.needs_options else ()))
        # A bare string fills the template's one text field, when it has exactly one and no options.
        self.string_field = self.text_fields[0] if len(self.text_fields) == 1 and not self.needs_options else None

    @property
    def reasoning(self) -> bool:
        return self.task.reasoning

    @property
    def threshold(self):
        """The policy's threshold (`settings.ThresholdInfo` or None); a reload assigns a new one."""
        return self.policy.threshold

    @threshold.setter
    def threshold(self, threshold) -> None:
        self.policy = self.policy.with_threshold(threshold)

    # 1. parse -------------------------------------------------------------------------------

    def parse(self, raw, *, param: str = "inputs", max_inputs: int | None = None) -> list[DecisionExample]:
        """Examples from a JSON list of inputs; raises `InputError` naming the first bad field."""
        if not isinstance(raw, list):
            raise InputError(param, f"must be an array of inputs; got {json_type(raw)}")
        if not raw:
            raise InputError(param, "must hold at least one input")
        if max_inputs is not None and len(raw) > max_inputs:
            raise InputError(param, f"holds {len(raw)} inputs; at most {max_inputs} per request")
        return [self._example(item, f"{param}[{i}]", i) for i, item in enumerate(raw)]

    def _example(self, item, param: str, index: int) -> DecisionExample:
        if isinstance(item, str):
            if self.string_field is None:
                raise InputError(param, f"this task's prompt needs an object with {', '.join(self.fields)}; got a string")
            return self._make(str(index), {self.string_field: _text(item, param)})
        if not isinstance(item, dict):
            raise InputError(param, f"must be a string or an object; got {json_type(item)}")
        allowed = {*self.fields, "id"}
        for key in item:
            if key not in allowed:
                raise InputError(f"{param}.{key}", f"unknown field; this task's prompt takes {', '.join(sorted(allowed))}")
        values: dict[str, Any] = {}
        for key in self.text_fields:
            if key not in item:
                raise InputError(f"{param}.{key}", "missing")
            values[key] = _text(item[key], f"{param}.{key}")
        if self.needs_options:
            values["options"] = self._options(item.get("options"), f"{param}.options", present="options" in item)
        return self._make(self._id(item.get("id", index), f"{param}.id"), values)

    def _options(self, value, param: str, *, present: bool) -> tuple[str, ...]:
        if not present:
            raise InputError(param, "missing")
        k = len(self.labels)
        if not isinstance(value, list):
            raise InputError(param, f"must be an array of {k} option texts; got {json_type(value)}")
        if len(value) != k:
            raise InputError(param, f"must hold {k} option texts (one per label {', '.join(self.labels)}); got {len(value)}")
        return tuple(_text(v, f"{param}[{j}]") for j, v in enumerate(value))

    @staticmethod
    def _id(value, param: str) -> str:
        if isinstance(value, bool) or not isinstance(value, (str, int)):
            raise InputError(param, f"must be a string or an integer; got {json_type(value)}")
        text = str(value)
        if len(text) > _ID_MAX:
            raise InputError(param, f"must be at most {_ID_MAX} characters; got {len(text)}")
        return text

    def _make(self, ex_id: str, values: dict) -> DecisionExample:
        return DecisionExample(id=ex_id, labels=self.labels, label=None, **values)  # no gold in serving

    # 2. prepare -----------------------------------------------------------------------------

    def prepare(self, examples: Sequence[DecisionExample], *, param: str = "inputs") -> list[PreparedPrompt]:
        """Render, tokenize and check each example as `decal evaluate` does; `InputError` naming the
        input past the context or with a decision token that would not be read where it sits."""
        names = [f"{param}[{i}]" for i in range(len(examples))]
        try:
            prepared = prepare_prompts(self.engine.tokenizer, self.task, examples, marker=self.marker, names=names)
        except DecisionPositionError as e:
            raise InputError(e.name or param, str(e)) from e
        for name, p in zip(names, prepared, strict=True):
            try:
                self.engine.check_prompt_lengths([len(p.ids)], reserve=self.reserve, names=[name])
            except ValueError as e:
                raise InputError(name, str(e)) from e
        return prepared

    # 3. decide ------------------------------------------------------------------------------

    def decide(self, batch: Sequence[PreparedPrompt]) -> list[Answer]:
        """Score one batch through the engine, then calibrate and threshold each answer (blocking).

        One engine call over the whole batch and its records from `decal.recording`, as `decal
        evaluate` builds them; greedy decoding, so the seed does not change the result.
        """
        records = score_records(self.engine, batch, run=self.run, reasoning=self.reasoning, temperature=0.0,
                                max_new_tokens=self.max_new_tokens, seed=0, marker=self.marker)
        return self.finish(records)

    def finish(self, records: Sequence[PredictionRecord]) -> list[Answer]:
        """Calibrator and deferral rules on records, row by row (both are per row)."""
        from ..calibrators import apply_calibrator

        records = list(records)
        calibrated = apply_calibrator(self.calibrator.calibrator, records) if self.calibrator else records
        verdicts = self.policy.decide(calibrated)
        return [Answer(record=r, calibrated=c, verdict=v) for r, c, v in zip(records, calibrated, verdicts)]
