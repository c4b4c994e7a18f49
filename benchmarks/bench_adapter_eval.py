"""Evaluation speed with a LoRA adapter: the output head's input, and attached against merged.

`decal evaluate --adapter` scores a fine-tuned model. This script builds a LoRA adapter of decal's
default shape (r=16, alpha=32, all linear projections, nonzero B so it changes the outputs) on
SmolLM2-135M-Instruct, or takes `--adapter DIR`, then on the first N prompts of the built-in
validation split (non-reasoning) times `score_prompts` for

1. base: the model without adapter (what a merged adapter should cost);
2. strided: the adapter attached, the head fed the strided `logits_to_keep` slice (decal before
   `decal.models.keep_head_input_contiguous`: with a frozen head PyTorch copies its weight per row);
3. attached: the adapter attached, as `load_model` returns it (bfloat16 evaluation where the CPU
   has native bfloat16: `--dtype auto`, the default);
4. merged: the adapter folded into the weights (`merge_adapter=True`, float32 evaluation, where
   `merges_adapter_exactly` holds),

batch by batch and interleaved, so load from other processes hits all of them alike, and prints
the ratios plus how far the merged and strided variants' option probabilities are from attached.

Usage: python benchmarks/bench_adapter_eval.py [--n 200] [--batch-size 8] [--threads 2]
       [--dtype auto|bfloat16|float32] [--adapter DIR] [--model smollm2-135m-instruct]

The test suite runs it at a tiny size on a tiny random Qwen3 (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from unittest import mock

import torch

import decal.models
from decal.decision import option_token_ids
from decal.dtypes import resolve_dtype
from decal.models import load_model
from decal.scoring import score_prompts
from decal.tasks import load_task
from decal.tasks.prompts import decision_context, render_chat

__all__ = ["main"]

MODEL = "smollm2-135m-instruct"


def _random_adapter(model_name: str, folder: str) -> str:
    from peft import LoraConfig, get_peft_model

    model, _ = load_model(model_name)
    torch.manual_seed(0)
    config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", init_lora_weights=False,
                        task_type="CAUSAL_LM")
    get_peft_model(model, config).save_pretrained(folder)
    return folder


def _timed(model, tokenizer, prompts, tokens, batch_size):
    start = time.perf_counter()
    with torch.inference_mode():
        scores = score_prompts(model, tokenizer, prompts, tokens, batch_size=batch_size)
    return time.perf_counter() - start, scores


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default=MODEL, help="alias or local model folder")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--adapter", default=None)
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                        help="auto: bfloat16 where the CPU computes it natively, else float32 (bfloat16 is ~170x slower there)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    args.dtype = resolve_dtype(args.dtype).dtype

    with tempfile.TemporaryDirectory() as tmp:
        adapter = args.adapter or _random_adapter(args.model, tmp)
        base, tokenizer = load_model(args.model, dtype=args.dtype)
        attached, _ = load_model(args.model, adapter=adapter, merge_adapter=False, dtype=args.dtype)
        merged, _ = load_model(args.model, adapter=adapter, merge_adapter=True, dtype=args.dtype)
        # as before decal.models.keep_head_input_contiguous: the head gets the strided slice
        with mock.patch.object(decal.models, "keep_head_input_contiguous", lambda m: None):
            strided, _ = load_model(args.model, adapter=adapter, merge_adapter=False, dtype=args.dtype)
    task = load_task("builtin", "validation")
    examples = task.examples[: args.n]
    prompts = [render_chat(tokenizer, task.user_message(ex), reasoning=False) for ex in examples]
    tokens = option_token_ids(tokenizer, task.labels, context=decision_context(prompts[0], reasoning=False))
    _timed(base, tokenizer, prompts[: args.batch_size], tokens, args.batch_size)  # warm-up

    times = {"base": 0.0, "strided": 0.0, "attached": 0.0, "merged": 0.0}
    results = {"strided": [], "attached": [], "merged": []}
    for i in range(0, len(prompts), args.batch_size):
        chunk = prompts[i: i + args.batch_size]
        times["base"] += _timed(base, tokenizer, chunk, tokens, args.batch_size)[0]
        for name, model in (("strided", strided), ("attached", attached), ("merged", merged)):
            seconds, scores = _timed(model, tokenizer, chunk, tokens, args.batch_size)
            times[name] += seconds
            results[name] += scores

    probs = {k: torch.tensor([s.option_probs for s in v], dtype=torch.float64) for k, v in results.items()}
    agree = int((probs["attached"].argmax(1) == probs["merged"].argmax(1)).sum())
    strided_diff = (probs["strided"] - probs["attached"]).abs().max()
    print(f"{len(prompts)} prompts, batch {args.batch_size}, {args.threads} threads, {args.dtype}")
    for name, seconds in times.items():
        print(f"  {name:9s} {seconds:7.2f} s   {len(prompts) / seconds:7.1f} prompts/s")
    print(f"strided head input / contiguous (attached): {times['strided'] / times['attached']:.2f}x")
    print(f"attached / merged time: {times['attached'] / times['merged']:.2f}x")
    print(f"merged / base time:     {times['merged'] / times['base']:.2f}x")
    print(f"max |option probability difference| merged vs attached: {(probs['merged'] - probs['attached']).abs().max():.2e}")
    print(f"identical predictions merged vs attached: {agree}/{len(prompts)}")
    print(f"max |option probability difference| strided vs contiguous head input: {strided_diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
