"""Checkpoints of a training run: find the last complete one, and pick the best by evaluation.

A `checkpoint-N` folder is complete when its `trainer_state.json`, which the transformers
Trainer writes after the adapter, optimizer, scheduler and RNG states, parses as JSON. A run
killed while saving leaves an incomplete folder; `last_checkpoint` skips it, so `--resume`
continues from the newest whole checkpoint (issue #9).

Checkpoint selection evaluates every complete checkpoint's adapter on one split with
`decal.evaluation.evaluate` and records accuracy and ECE (equal-mass, 10 bins) in
`OUT/selection.json`: `{"checkpoints": [{"step", "accuracy", "ece", "mean_confidence", "valid_rate",
"n_examples"}, plus "tce" and "mean_overconfidence" when the records carry the truth], "best": step,
"criterion": "accuracy", "split": ...}`. The best one (highest accuracy; ties go to the lower
ECE, then the earlier step) is copied to `OUT/best_adapter/`. The paper selected on its test set;
pass a validation split to keep the test set unseen.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .._io import write_json_atomic

__all__ = ["CHECKPOINT_PREFIX", "SELECTION_NAME", "list_checkpoints", "last_checkpoint", "select_checkpoint",
           "copy_adapter"]

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
SELECTION_NAME = "selection.json"
_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
_ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


def _is_complete(folder: Path) -> bool:
    state = folder / "trainer_state.json"
    if not state.is_file() or not (folder / "adapter_config.json").is_file():
        return False
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError):
        return False
    return True


def list_checkpoints(out_dir: str | os.PathLike, *, complete_only: bool = True) -> list[tuple[int, Path]]:
    """The `checkpoint-N` folders of a run as (step, path), by increasing step.

    Args:
        out_dir: the training output folder.
        complete_only: skip folders a crash left half written (see the module docstring).
    """
    out_dir = Path(out_dir)
    if not out_dir.is_dir():
        return []
    found = []
    for child in out_dir.iterdir():
        match = _CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (not complete_only or _is_complete(child)):
            found.append((int(match.group(1)), child))
    return sorted(found)


def last_checkpoint(out_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint folder, or None when there is none."""
    checkpoints = list_checkpoints(out_dir)
    return checkpoints[-1][1] if checkpoints else None


def copy_adapter(source: str | os.PathLike, target: str | os.PathLike) -> Path:
    """Copy a PEFT adapter (config + weights) to `target`, replacing it as a whole.

    The files go to a temporary sibling folder that is renamed into place, so `target` is
    never half written.
    """
    source, target = Path(source), Path(target)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        for name in _ADAPTER_FILES:
            if (source / name).is_file():
                shutil.copy2(source / name, tmp / name)
        if target.exists():
            shutil.rmtree(target)
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _score(predictions: Path) -> dict[str, Any]:
    from ..metrics import expected_calibration_error, mean_overconfidence, true_calibration_error
    from ..records import read_records, records_to_arrays

    if predictions.is_dir():
        predictions = predictions / "predictions.jsonl"
    arrays = records_to_arrays(read_records(predictions))
    row = {
        "accuracy": float(arrays.correct.mean()),
        "ece": float(expected_calibration_error(arrays.confidence, arrays.correct, n_bins=10, binning="equal_mass")),
        # the decision-token confidence curve over checkpoints (issue #22: train a committed warm start
        # until it stops rising)
        "mean_confidence": float(arrays.confidence.mean()),
        "valid_rate": float(arrays.valid.mean()),
        "n_examples": int(arrays.correct.size),
    }
    if arrays.true_probs is not None:
        truth = (arrays.confidence, arrays.true_probs, arrays.prediction_index)
        row.update(tce=true_calibration_error(*truth), mean_overconfidence=mean_overconfidence(*truth))
    return row


def _best(rows: list[dict[str, Any]]) -> int:
    return min(rows, key=lambda r: (-r["accuracy"], r["ece"], r["step"]))["step"]


def select_checkpoint(
    out_dir: str | os.PathLike,
    task,
    split: str,
    *,
    model: str | None = None,
    data_dir: str | None = None,
    reasoning: bool | None = None,
    limit: int | None = None,
    criterion: str = "accuracy",
    batch_size: int = 8,
    max_new_tokens: int = 256,
    dtype: str = "auto",
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate each complete checkpoint of a run on `split`, write `selection.json`, copy the best.

    Args:
        out_dir: the training output folder (holds `config.resolved.yaml` and `checkpoint-N/`).
        task: a task name (loaded with `decal.tasks.load_task`) or a `Task` already loaded.
        split: the split to select on, e.g. "validation" (or "test", as the paper did).
        model: the base model; None reads it from `config.resolved.yaml`.
        data_dir: folder of the paper datasets; None reads the run's config, then $DECAL_DATA_DIR.
        reasoning: prompt mode; None reads the run's config.
        limit: evaluate the first N examples only.
        criterion: "accuracy" copies the most accurate checkpoint (ties: lower ECE, then the earlier
            step); "last" copies the final one, and the scores are its training curve.
        batch_size, max_new_tokens, dtype, seed: passed to the evaluation and the model loader.
        progress: show progress bars.

    Returns:
        The selection dict also written to `OUT/selection.json`.

    Raises:
        FileNotFoundError: no complete checkpoint in `out_dir`.
    """
    from peft import PeftModel

    from ..evaluation import evaluate
    from ..models import load_model

    if criterion not in ("accuracy", "last"):
        raise ValueError(f"criterion must be 'accuracy' or 'last'; got {criterion!r}")
    out_dir = Path(out_dir)
    checkpoints = list_checkpoints(out_dir)
    if not checkpoints:
        raise FileNotFoundError(f"no complete checkpoint-N folder in {out_dir}; train with --save-steps "
                                f"smaller than the number of steps")
    run = _run_config(out_dir)
    model = model or run.get("model")
    if not model:
        raise FileNotFoundError(f"{out_dir}/config.resolved.yaml is missing; pass the base model explicitly")
    reasoning = run.get("reasoning", False) if reasoning is None else reasoning
    if isinstance(task, str):
        from ..tasks import load_task

        task = load_task(task, split, data_dir=data_dir or run.get("data_dir"), reasoning=reasoning)
    if limit is not None:
        task = type(task)(name=task.name, split=task.split, examples=task.examples[:limit],
                          template=task.template, reasoning=task.reasoning)
    base, tokenizer = load_model(model, dtype=dtype, trust_remote_code=bool(run.get("trust_remote_code")),
                                 allow_pickle=bool(run.get("allow_pickle")))
    rows = []
    for step, folder in checkpoints:
        peft_model = PeftModel.from_pretrained(base, str(folder), is_trainable=False).eval()
        eval_dir = out_dir / "selection" / folder.name
        predictions = evaluate(peft_model, tokenizer, task, out_dir=eval_dir, model_name=model, adapter=str(folder),
                               batch_size=batch_size, max_new_tokens=max_new_tokens, seed=seed, progress=progress)
        # Take the LoRA layers out again so the next checkpoint starts from the clean base.
        base = peft_model.unload()
        rows.append({"step": step, **_score(Path(predictions))})
        logger.info("checkpoint %d on %s/%s: accuracy %.4f, ECE %.4f", step, task.name, split,
                    rows[-1]["accuracy"], rows[-1]["ece"])
    best = _best(rows) if criterion == "accuracy" else max(r["step"] for r in rows)
    selection = {"task": task.name, "split": split, "criterion": criterion, "checkpoints": rows, "best": best,
                 "best_adapter": "best_adapter"}
    copy_adapter(dict(checkpoints)[best], out_dir / "best_adapter")
    write_json_atomic(out_dir / SELECTION_NAME, selection)
    return selection


def _run_config(out_dir: Path) -> dict[str, Any]:
    import yaml

    path = out_dir / "config.resolved.yaml"
    if not path.is_file():
        return {}
    return yaml.safe_load(path.read_text(encoding="utf-8")) or {}
