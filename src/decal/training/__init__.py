"""Fine-tuning on the decision token: SFT, GRPO and calibration-aware GRPO with LoRA (`decal train`).

`TrainConfig` (light) is imported eagerly; `train`, `select_checkpoint` and `last_checkpoint`
load transformers on first use, so `import decal.training` stays fast.
"""

from __future__ import annotations

from .config import TrainConfig, load_config_file, merge_config

__all__ = ["TrainConfig", "load_config_file", "merge_config", "train", "select_checkpoint", "last_checkpoint"]

_LAZY = {"train": "runner", "select_checkpoint": "checkpoints", "last_checkpoint": "checkpoints"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
