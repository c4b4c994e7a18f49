"""decal: decision-token calibration for LLM decision makers.

The pipeline: tasks -> prompts -> model -> decision position -> option distribution ->
prediction records -> metrics, calibrators, figures -> reports; training (SFT, GRPO,
calibration-aware GRPO) produces LoRA adapters that go back into the model loader.

The names below are imported lazily (PEP 562), so `import decal` and `decal --help` stay fast
and torch/transformers load only when a model-facing name is used.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

# public name -> module that defines it
_EXPORTS = {
    "load_task": "decal.tasks",
    "list_tasks": "decal.tasks",
    "DecisionExample": "decal.tasks",
    "Task": "decal.tasks",
    "load_model": "decal.models",
    "option_token_ids": "decal.decision",
    "find_decision": "decal.decision",
    "prepare_engine": "decal.engines",
    "build_engine": "decal.engines",
    "score_prompts": "decal.scoring",
    "generate_decisions": "decal.scoring",
    "evaluate": "decal.evaluation",
    "PredictionRecord": "decal.records",
    "read_records": "decal.records",
    "accuracy": "decal.metrics",
    "ece": "decal.metrics",
    "sce": "decal.metrics",
    "mce": "decal.metrics",
    "max_calibration_error": "decal.metrics",
    "auroc": "decal.metrics",
    "brier": "decal.metrics",
    "nll": "decal.metrics",
    "overconfidence_ratio": "decal.metrics",
    "aurc": "decal.metrics",
    "bootstrap_ci": "decal.metrics",
    "summarize": "decal.metrics",
    "TemperatureScaling": "decal.calibrators",
    "PlattScaling": "decal.calibrators",
    "IsotonicCalibration": "decal.calibrators",
    "TrainConfig": "decal.training.config",
    "train": "decal.training.runner",
    "ExperimentConfig": "decal.experiments.config",
    "load_experiment_config": "decal.experiments.config",
    "run_experiment": "decal.experiments.runner",
}

__all__ = ["__version__", *_EXPORTS]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'decal' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
