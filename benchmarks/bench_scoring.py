"""Scoring speed of decal against lm-evaluation-harness, the bare forward pass and bare generate.

SmolLM2-135M-Instruct (fp32, CPU; `--model` for another) on the first N XSTest prompts (default 200):

1. non-reasoning: decal `score_prompts` examples/s, against lm-evaluation-harness scoring the same
   rendered prompts and options through a local task file over the same data; their ratio and
   how many argmax predictions agree;
2. decal against the bare batched forward pass (`logits_to_keep=1`) over the same token batches;
   the two are timed batch by batch, interleaved, so load from other processes hits both alike;
3. reasoning: decal `generate_decisions` against bare `model.generate` with the same generation
   config and seeds, batch by batch, interleaved;
4. peak resident memory of the process after the decal parts (before lm-eval runs).

Targets (issue #3): >= 1.5x lm-eval with >= 99 % identical predictions, within 1.2x of the bare
forward pass, reasoning within 1.10x of bare generation, peak memory under 2 GB.

Usage: python benchmarks/bench_scoring.py [--n 200] [--batch-size 8] [--reasoning-n 16]
       [--max-new-tokens 32] [--threads 2] [--skip-lm-eval] [--model smollm2-135m-instruct]

The test suite runs it at a tiny size on a tiny random Qwen3 (tests/test_benchmarks.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import torch

from decal.decision import option_token_ids
from decal.models import load_model
from decal.scoring import (
    encode_prompts,
    generate_decisions,
    generation_config,
    length_sorted_batches,
    pad_left,
    score_prompts,
)
from decal.tasks import load_task
from decal.tasks.prompts import decision_context, render_chat

__all__ = ["main"]


def _peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # KiB on Linux


def _bare_forward(model, sequences, pad_id) -> float:
    input_ids, attention_mask = pad_left(sequences, pad_id)
    position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
    start = time.perf_counter()
    with torch.inference_mode():
        model(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids, logits_to_keep=1, use_cache=False)
    return time.perf_counter() - start


def non_reasoning(model, tok, prompts, dt, batch_size):
    """Interleaved per batch: decal score_prompts (incl. tokenization) vs the bare forward."""
    sequences = encode_prompts(tok, prompts)
    batches = length_sorted_batches([len(s) for s in sequences], batch_size)
    t_decal = t_bare = 0.0
    scores = [None] * len(prompts)
    for batch in batches:
        start = time.perf_counter()
        out = score_prompts(model, tok, [prompts[i] for i in batch], dt, batch_size=len(batch))
        t_decal += time.perf_counter() - start
        t_bare += _bare_forward(model, [sequences[i] for i in batch], tok.pad_token_id)
        for i, s in zip(batch, out):
            scores[i] = s
    return scores, t_decal, t_bare, sum(len(s) for s in sequences)


def reasoning(model, tok, prompts, dt, batch_size, max_new_tokens, temperature=1.0, seed=0):
    """Interleaved per batch: decal generate_decisions vs bare model.generate, same config and seed."""
    sequences = encode_prompts(tok, prompts)
    config = generation_config(model, tok, temperature=temperature, max_new_tokens=max_new_tokens)
    t_decal = t_bare = 0.0
    n_forced = n_tokens = 0
    for b, batch in enumerate(length_sorted_batches([len(s) for s in sequences], batch_size)):
        start = time.perf_counter()
        out = generate_decisions(model, tok, [prompts[i] for i in batch], dt, temperature=temperature,
                                 max_new_tokens=max_new_tokens, seed=seed + b, batch_size=len(batch))
        t_decal += time.perf_counter() - start
        n_forced += sum(g.forced for rollouts in out for g in rollouts)
        n_tokens += sum(len(g.completion_ids) for rollouts in out for g in rollouts)
        input_ids, attention_mask = pad_left([sequences[i] for i in batch], tok.pad_token_id)
        torch.manual_seed(seed + b)
        start = time.perf_counter()
        with torch.inference_mode():
            model.generate(input_ids=input_ids, attention_mask=attention_mask, generation_config=config)
        t_bare += time.perf_counter() - start
    return t_decal, t_bare, n_forced, n_tokens


def lm_eval_predictions(model, tok, prompts, labels, golds, batch_size):
    """Run lm-evaluation-harness on a local task file over the same prompts; (argmax indices, seconds)."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    folder = Path(tempfile.mkdtemp(prefix="decal-bench-"))
    data = folder / "xstest.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "label": g}) + "\n" for p, g in zip(prompts, golds)))
    (folder / "decal_bench_xstest.yaml").write_text(
        "task: decal_bench_xstest\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        "doc_to_text: prompt\n"
        f"doc_to_choice: {json.dumps(list(labels))}\n"
        "doc_to_target: label\n"
        'target_delimiter: ""\n'
        "metric_list:\n  - metric: acc\n"
    )
    lm = HFLM(pretrained=model, tokenizer=tok, batch_size=batch_size, device="cpu")
    # Only the local task: indexing lm-eval's thousands of built-in task files takes ~40 s, which
    # is setup, not scoring.
    tasks = TaskManager(include_path=str(folder), include_defaults=False)
    start = time.perf_counter()
    results = simple_evaluate(model=lm, tasks=["decal_bench_xstest"], task_manager=tasks,
                              log_samples=True, bootstrap_iters=0, verbosity="ERROR")
    seconds = time.perf_counter() - start
    samples = sorted(results["samples"]["decal_bench_xstest"], key=lambda s: s["doc_id"])
    predictions = [max(range(len(labels)), key=lambda k: s["filtered_resps"][k][0]) for s in samples]
    return predictions, seconds


def _reasoning_part(model, tok, task, args) -> None:
    reasoning_task = load_task("xstest", "test", data_dir=args.data_dir, reasoning=True)
    r_prompts = [render_chat(tok, reasoning_task.user_message(ex), reasoning=True) for ex in reasoning_task.examples[: args.reasoning_n]]
    r_dt = option_token_ids(tok, task.labels, context=decision_context(r_prompts[0], reasoning=True))
    rd, rb, n_forced, n_gen = reasoning(model, tok, r_prompts, r_dt, args.batch_size, args.max_new_tokens)
    print(f"reasoning      {len(r_prompts)} prompts, max {args.max_new_tokens} new tokens, temperature 1: decal {rd:.1f} s, "
          f"bare generate {rb:.1f} s, decal/bare time: {rd / rb:.3f}x ({n_forced} forced decisions, {n_gen} tokens)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m-instruct", help="alias or local model folder")
    parser.add_argument("--n", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--reasoning-n", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-lm-eval", action="store_true")
    parser.add_argument("--only-lm-eval", action="store_true",
                        help="skip the bare-forward and reasoning parts; time decal before and after lm-eval")
    parser.add_argument("--lm-eval-choices", choices=["labels", "decision"], default="labels",
                        help="lm-eval options: the label words (multi-token 'Unsafe' = Un+safe in SmolLM2, "
                             "summed log-likelihood) or the decision tokens decal reads")
    parser.add_argument("--data-dir", default=os.environ.get("DECAL_DATA_DIR") or str(Path(__file__).resolve().parents[2] / "shared" / "data"))
    args = parser.parse_args(argv)
    logging.disable(logging.WARNING)
    torch.set_num_threads(args.threads)

    model, tok = load_model(args.model)
    task = load_task("xstest", "test", data_dir=args.data_dir)
    examples = task.examples[: args.n]
    prompts = [render_chat(tok, task.user_message(ex), reasoning=False) for ex in examples]
    dt = option_token_ids(tok, task.labels, context=decision_context(prompts[0], reasoning=False))
    score_prompts(model, tok, prompts[:2], dt)  # warm-up

    if args.only_lm_eval:
        start = time.perf_counter()
        scores = score_prompts(model, tok, prompts, dt, batch_size=args.batch_size)
        t_decal = time.perf_counter() - start
        print(f"non-reasoning  decal: {len(prompts) / t_decal:7.2f} ex/s ({t_decal:.1f} s) before lm-eval")
    else:
        scores, t_decal, t_bare, n_tokens = non_reasoning(model, tok, prompts, dt, args.batch_size)
        print(f"{args.model} fp32, {len(prompts)} XSTest prompts ({n_tokens} tokens), batch {args.batch_size}, "
              f"{torch.get_num_threads()} threads (machine shared with other processes: ratios matter)")
        print(f"non-reasoning  decal: {len(prompts) / t_decal:7.2f} ex/s ({t_decal:.1f} s)   "
              f"bare forward: {len(prompts) / t_bare:7.2f} ex/s ({t_bare:.1f} s)   decal/bare time: {t_decal / t_bare:.3f}x")
        _reasoning_part(model, tok, task, args)
    decal_pred = [max(range(len(s.option_probs)), key=s.option_probs.__getitem__) for s in scores]
    print(f"peak RSS after decal parts: {_peak_rss_gb():.2f} GB")

    if args.skip_lm_eval:
        return 0
    golds = [ex.label_index for ex in examples]
    choices = list(task.labels) if args.lm_eval_choices == "labels" else [tok.convert_tokens_to_string([t]) for t in dt.tokens]
    lm_pred, t_lm = lm_eval_predictions(model, tok, prompts, choices, golds, args.batch_size)
    if args.only_lm_eval:  # decal again after lm-eval: the mean of both faces the same load drift
        start = time.perf_counter()
        score_prompts(model, tok, prompts, dt, batch_size=args.batch_size)
        t_after = time.perf_counter() - start
        print(f"non-reasoning  decal: {len(prompts) / t_after:7.2f} ex/s ({t_after:.1f} s) after lm-eval")
        t_decal = (t_decal + t_after) / 2
    agree = sum(a == b for a, b in zip(decal_pred, lm_pred))
    print(f"lm-eval ({args.lm_eval_choices} as options) {len(prompts) / t_lm:7.2f} ex/s ({t_lm:.1f} s)   "
          f"decal speed-up: {t_lm / t_decal:.2f}x   identical argmax predictions: {agree}/{len(prompts)} "
          f"({100 * agree / len(prompts):.1f} %)")
    print(f"peak RSS overall (incl. lm-eval): {_peak_rss_gb():.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
