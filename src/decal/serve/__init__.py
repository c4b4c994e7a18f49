"""`decal serve`: the calibrated decision as an HTTP service, with deferral, under load.

request -> prompt -> engine -> option distribution -> calibrator -> decision, confidence, defer
(docs/design.md, "The pipeline"). Modules:

- `settings`: `ServeConfig`, the threshold and calibrator a server applies, bind rules;
- `decider`: request inputs -> examples -> prompts -> engine -> calibrated answers;
- `engine`: the seam to the code that runs the model (`hf` today);
- `batching`: the queue that scores concurrent requests together;
- `moderation`: OpenAI's moderation request and response schema;
- `metrics`: Prometheus metrics; `app`: the FastAPI app; `server`: uvicorn, signals, startup.
"""

from __future__ import annotations

from .settings import ServeConfig

__all__ = ["ServeConfig"]
