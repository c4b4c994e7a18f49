"""Accuracy of SmolLM2-135M-Instruct on the built-in task at each difficulty (non-reasoning).

One forward pass per prompt, constrained argmax over the two decision tokens, one thread, bf16
where the CPU computes it natively (`--dtype auto`), else float32.
Prints one line per difficulty; the numbers are quoted in `decal/tasks/builtin.py`.

    .venv/bin/python benchmarks/bench_builtin_task.py --split validation --n 100
    .venv/bin/python benchmarks/bench_builtin_task.py --split test --difficulties 2,3,4

The test suite runs it at a tiny size on a tiny random Qwen3 (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--split", default="validation", metavar="SPLIT")
    parser.add_argument("--n", type=int, default=None, metavar="N", help="first N examples (default: all)")
    parser.add_argument("--difficulties", default="0,1,2,3,4", metavar="LIST")
    parser.add_argument("--seed", type=int, default=0, metavar="SEED")
    parser.add_argument("--threads", type=int, default=1, metavar="T")
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model folder")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    args = parser.parse_args(argv)

    import torch

    from decal.decision import option_token_ids
    from decal.models import load_model
    from decal.tasks import load_task
    from decal.tasks.prompts import render_chat

    torch.set_num_threads(args.threads)
    model, tokenizer = load_model(args.model, dtype=args.dtype)
    for difficulty in (int(d) for d in args.difficulties.split(",")):
        task = load_task("builtin", args.split, difficulty=difficulty, seed=args.seed, n=args.n)
        start, correct, confidence, mass = time.perf_counter(), [], [], []
        for ex in task:
            prompt = render_chat(tokenizer, task.user_message(ex), reasoning=False)
            tokens = option_token_ids(tokenizer, task.labels, context=prompt)
            ids = tokenizer(prompt, add_special_tokens=False, return_tensors="pt")["input_ids"]
            with torch.no_grad():
                logits = model(ids, logits_to_keep=1).logits[0, -1].float()  # (V,)
            option_probs = logits.softmax(-1)[list(tokens.token_ids)]  # (K,)
            k = int(option_probs.argmax())
            correct.append(task.labels[k] == ex.label)
            confidence.append(float(option_probs[k]))
            mass.append(float(option_probs.sum()))
        print(
            f"difficulty={difficulty} split={args.split} n={len(task)} accuracy={sum(correct) / len(task):.3f} "
            f"mean_confidence={statistics.mean(confidence):.3f} option_mass={statistics.mean(mass):.3f} "
            f"seconds={time.perf_counter() - start:.1f}",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
