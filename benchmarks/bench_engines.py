"""The hf and vllm engines on the same work, in one process tree: throughput and the vllm/hf ratio.

SmolLM2-135M-Instruct (float32 by default; `--model` for another), through decal's own code paths:

(a) non-reasoning scoring of 200 XSTest prompts (`Engine.score`);
(b) Table-2 rollouts: 20 OpenAI Moderation train queries x 16 samples x 64 new tokens at
    temperature 1 (`decal.analysis.run_rollouts`; hf batches a query's 16 samples together, vLLM
    gets all queries at once, each query's samples in one request);
(c) greedy reasoning evaluation: 100 OpenAI Moderation eval examples x 128 new tokens
    (`decal.evaluation.evaluate`, batch 8).

The sizes are options (`--score-n`, `--queries`, `--samples`, `--rollout-tokens`, `--eval-n`,
`--eval-tokens`); the test suite runs the hf engine at a tiny size on a tiny random Qwen3
(tests/test_benchmarks.py).

Each engine is built once (its start-up is timed) and runs (a), (b), (c) in turn; then the next
engine. Throughput is reported without and with the start-up. The machine may be shared: the
load average before and after is printed, and only the ratios of one run mean much.

Usage: python benchmarks/bench_engines.py [--dtype float32] [--parts abc] [--engines hf,vllm]
       [--hf-threads N] [--kv-cache-gib 2] [--engine-arg KEY=VALUE ...] [--model smollm2-135m-instruct]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

MODEL = "smollm2-135m-instruct"


def _load():
    return os.getloadavg()[0]


def _work(engine, args: argparse.Namespace, out: Path) -> dict[str, dict]:
    from decal.analysis.rollouts import RolloutConfig, run_rollouts
    from decal.decision import option_token_ids
    from decal.evaluation import evaluate
    from decal.records import read_records
    from decal.scoring import encode_prompts
    from decal.tasks import load_task
    from decal.tasks.prompts import decision_context, render_chat

    tok = engine.tokenizer
    results: dict[str, dict] = {}
    parts, data_dir = args.parts, args.data_dir
    if "a" in parts:
        task = load_task("xstest", "test", data_dir=data_dir)
        prompts = [render_chat(tok, task.user_message(ex), reasoning=False) for ex in task.examples[: args.score_n]]
        tokens = option_token_ids(tok, task.labels, context=decision_context(prompts[0], reasoning=False))
        seqs = encode_prompts(tok, prompts)
        start = time.perf_counter()
        scores = engine.score(seqs, tokens, batch_size=8)
        seconds = time.perf_counter() - start
        results["a"] = {"seconds": seconds, "units": len(scores), "unit": "prompts",
                        "probs": [s.option_probs for s in scores]}
    if "b" in parts:
        task = load_task("openai_moderation", "train", data_dir=data_dir, reasoning=True)
        config = RolloutConfig(samples=args.samples, temperature=1.0, max_new_tokens=args.rollout_tokens,
                               limit=args.queries, batch_size=args.samples, seed=0)
        start = time.perf_counter()
        run_rollouts(engine, None, task, out / f"rollouts-{engine.name}", config=config, model_name=args.model)
        seconds = time.perf_counter() - start
        rows = (out / f"rollouts-{engine.name}" / "rollouts.jsonl").read_text().splitlines()
        tokens_made = sum(json.loads(r)["n_completion_tokens"] for r in rows)
        results["b"] = {"seconds": seconds, "units": tokens_made, "unit": "new tokens", "rollouts": len(rows)}
    if "c" in parts:
        task = load_task("openai_moderation", "eval", data_dir=data_dir, reasoning=True)
        start = time.perf_counter()
        folder = evaluate(engine, None, task, out_dir=out / f"eval-{engine.name}", model_name=args.model, batch_size=8,
                          max_new_tokens=args.eval_tokens, temperature=0.0, limit=args.eval_n, progress=False)
        seconds = time.perf_counter() - start
        records = read_records(folder / "predictions.jsonl")
        results["c"] = {"seconds": seconds, "units": len(records), "unit": "examples",
                        "tokens": sum(int(r.extra.get("n_completion_tokens", 0)) for r in records),
                        "completions": {r.id: r.completion for r in records},
                        "probs": {r.id: r.option_probs for r in records}}
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=MODEL, help="alias or local model folder")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--parts", default="abc", help="which of a, b, c to run")
    parser.add_argument("--engines", default="hf,vllm")
    parser.add_argument("--hf-threads", type=int, default=None, help="torch threads of the hf engine (default: torch's)")
    parser.add_argument("--kv-cache-gib", type=float, default=2.0, help="vLLM KV cache on the CPU build")
    parser.add_argument("--engine-arg", action="append", default=[], metavar="KEY=VALUE", help="more vLLM engine arguments")
    parser.add_argument("--data-dir", default=os.environ.get("DECAL_DATA_DIR")
                        or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    sizes = parser.add_argument_group("sizes")
    sizes.add_argument("--score-n", type=int, default=200, help="(a) XSTest prompts scored")
    sizes.add_argument("--queries", type=int, default=20, help="(b) moderation queries rolled out")
    sizes.add_argument("--samples", type=int, default=16, help="(b) samples per query")
    sizes.add_argument("--rollout-tokens", type=int, default=64, help="(b) new tokens per sample")
    sizes.add_argument("--eval-n", type=int, default=100, help="(c) moderation examples evaluated")
    sizes.add_argument("--eval-tokens", type=int, default=128, help="(c) new tokens per example")
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    import torch

    from decal.engines import EngineOptions, parse_engine_args, prepare_engine

    if args.hf_threads:
        torch.set_num_threads(args.hf_threads)
    load_before = _load()
    measured: dict[str, tuple[float, dict]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.engines.split(","):
            options = EngineOptions()
            if name == "vllm":
                options = EngineOptions(extra={"kv_cache_memory_bytes": int(args.kv_cache_gib * (1 << 30)),
                                               **parse_engine_args(args.engine_arg)})
            start = time.perf_counter()
            engine = prepare_engine(name, args.model, dtype=args.dtype, options=options).build()
            startup = time.perf_counter() - start
            try:
                measured[name] = (startup, _work(engine, args, Path(tmp)))
            finally:
                engine.close()
    load_after = _load()
    print(f"{args.model} {args.dtype}; hf: {torch.get_num_threads()} torch threads; "
          f"load average {load_before:.1f} before, {load_after:.1f} after (2 cores; shared machine: read the ratios)")
    names = list(measured)
    header = "| work | " + " | ".join(f"{n} (run) | {n} (with start-up)" for n in names) + " | vllm/hf (run) | vllm/hf (with start-up) |"
    print(header)
    print("|" + " --- |" * (2 * len(names) + 3))
    labels = {"a": f"(a) score {args.score_n} XSTest", "b": f"(b) rollouts {args.queries}x{args.samples}x{args.rollout_tokens}",
              "c": f"(c) greedy eval {args.eval_n}x{args.eval_tokens}"}
    for part in args.parts:
        cells, rates = [], {}
        for n in names:
            startup, res = measured[n]
            r = res[part]
            run, full = r["units"] / r["seconds"], r["units"] / (r["seconds"] + startup)
            rates[n] = (run, full)
            cells.append(f"{run:.1f} {r['unit']}/s ({r['seconds']:.0f} s) | {full:.1f}")
        ratio = (f"{rates['vllm'][0] / rates['hf'][0]:.2f}x | {rates['vllm'][1] / rates['hf'][1]:.2f}x"
                 if {"hf", "vllm"} <= set(rates) else "- | -")
        print(f"| {labels[part]} | " + " | ".join(cells) + f" | {ratio} |")
    print("start-up: " + ", ".join(f"{n} {measured[n][0]:.1f} s" for n in names))
    if {"hf", "vllm"} <= set(measured):
        hf, vl = measured["hf"][1], measured["vllm"][1]
        if "a" in hf:
            diff = max(abs(x - y) for p, q in zip(hf["a"]["probs"], vl["a"]["probs"]) for x, y in zip(p, q))
            print(f"(a) max |option prob difference| hf vs vllm: {diff:.2e}")
        if "c" in hf:
            same = [i for i in hf["c"]["completions"] if hf["c"]["completions"][i] == vl["c"]["completions"].get(i)]
            diff = max((abs(x - y) for i in same for x, y in zip(hf["c"]["probs"][i], vl["c"]["probs"][i])), default=0.0)
            print(f"(c) identical greedy completions: {len(same)}/{len(hf['c']['completions'])}; "
                  f"max |option prob difference| where identical: {diff:.2e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
