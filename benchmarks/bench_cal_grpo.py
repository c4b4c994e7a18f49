"""Cost of calibration-aware GRPO over GRPO: step-time and peak-memory ratios (issue #6, target <= 1.05).

Both methods run on the same model (SmolLM2-135M-Instruct by default), the same seed and the
same generation batch. Each method runs in its own process so peak memory is its own:

1. load the model, build the trainer (LoRA r=16, as the paper), generate one batch of
   completions with TRL's `_generate_and_score_completions` (seeded, so both processes get the
   same completions; the script checks a hash of them);
2. time `--repeats` training passes (TRL's `_compute_loss` + `backward`) on that batch and keep
   the median; read the peak resident memory before and after the passes.

It prints per method the median pass time, the peak RSS of the whole process and the peak RSS
added by the training passes, then the cal-grpo / grpo ratios. Generation is excluded from the
time ratio: it is identical for both methods and would only dilute the difference.

Usage:
    python benchmarks/bench_cal_grpo.py [--model smollm2-135m-instruct] [--prompts 2]
        [--generations 4] [--max-completion-length 16] [--repeats 5] [--in-process]

``--in-process`` runs both methods in this process instead (seconds faster, but the second
method's peak memory then includes the first's); the test suite runs it so, at a tiny size on a
tiny random Qwen3 (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time

__all__ = ["main"]


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _child(opts: argparse.Namespace) -> dict:
    import torch

    from decal.models import load_model
    from decal.tasks.builtin import load_builtin

    torch.set_num_threads(opts.threads)
    model, tokenizer = load_model(opts.model, dtype="float32")
    task = load_builtin("train", n=opts.prompts)
    with tempfile.TemporaryDirectory(prefix="decal-bench-cal-grpo-") as out:
        return _measure(opts, model, tokenizer, task, out)


def _measure(opts: argparse.Namespace, model, tokenizer, task, out: str) -> dict:
    import torch
    from peft import LoraConfig

    from decal.training import _trl_compat
    from decal.training.grpo import DecalGRPOConfig, build_grpo_trainer

    args = DecalGRPOConfig(
        output_dir=out, per_device_train_batch_size=opts.prompts * opts.generations,
        num_generations=opts.generations, max_completion_length=opts.max_completion_length, max_steps=1,
        bf16=False, use_cpu=True, gradient_checkpointing=opts.gradient_checkpointing, report_to="none",
        save_strategy="no", reasoning=False, seed=0, calibration=opts.method == "cal-grpo",
    )
    lora = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.1, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = build_grpo_trainer(model=model, tokenizer=tokenizer, task=task, args=args, peft_config=lora)
    trainer.model.train()
    torch.manual_seed(0)
    rows = [dict(r) for r in trainer.train_dataset for _ in range(opts.generations)]
    batch = _trl_compat.generate_and_score(trainer, rows)
    digest = hashlib.sha1(batch["completion_ids"].cpu().numpy().tobytes()).hexdigest()[:12]
    trainer.current_gradient_accumulation_steps = 1
    before = _peak_rss_mb()
    times = []
    for _ in range(opts.repeats):
        start = time.perf_counter()
        loss = _trl_compat.compute_loss(trainer, trainer.model, batch)
        loss.backward()
        times.append(time.perf_counter() - start)
        trainer.model.zero_grad(set_to_none=True)
    after = _peak_rss_mb()
    return {
        "method": opts.method, "completions": digest, "seconds": statistics.median(times),
        "peak_mb": after, "added_mb": after - before, "tokens": int(batch["completion_mask"].sum()),
    }


def _run(opts: argparse.Namespace, argv: list[str], method: str) -> dict:
    """One method's measurement: in a child process with the same arguments (its own peak
    memory), or here."""
    if opts.in_process:
        return _child(argparse.Namespace(**{**vars(opts), "method": method}))
    out = subprocess.run([sys.executable, __file__, *argv, "--method", method],
                         check=True, capture_output=True, text=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct")
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--generations", type=int, default=4)
    parser.add_argument("--max-completion-length", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--in-process", action="store_true", help="run both methods in this process (peak memory mixes)")
    parser.add_argument("--method", choices=["grpo", "cal-grpo"], help=argparse.SUPPRESS)  # child process
    argv = sys.argv[1:] if argv is None else argv
    opts = parser.parse_args(argv)
    if opts.method:
        print(json.dumps(_child(opts)))
        return 0
    results = {}
    for method in ("grpo", "cal-grpo"):
        r = results[method] = _run(opts, argv, method)
        print(f"{method:9s} pass {r['seconds']:.3f} s  peak RSS {r['peak_mb']:.0f} MB  "
              f"added by passes {r['added_mb']:.0f} MB  completions {r['completions']}  tokens {r['tokens']}")
    g, c = results["grpo"], results["cal-grpo"]
    if g["completions"] != c["completions"]:
        print("warning: the two methods trained on different completions; the ratios are not comparable")
    print(f"step-time ratio cal-grpo/grpo: {c['seconds'] / g['seconds']:.3f}")
    print(f"peak-memory ratio cal-grpo/grpo: {c['peak_mb'] / g['peak_mb']:.3f} "
          f"(memory added by the passes: {c['added_mb'] / max(g['added_mb'], 1e-9):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
