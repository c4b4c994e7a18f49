"""decal: decision-token calibration for LLM decision makers.

The pipeline: tasks -> prompts -> model -> decision position -> option distribution ->
prediction records -> metrics, calibrators, figures -> reports; training (SFT, GRPO,
calibration-aware GRPO) produces LoRA adapters that go back into the model loader.
"""

__version__ = "0.1.0"

__all__ = ["__version__"]
