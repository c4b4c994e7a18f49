"""Training cost on this machine: SFT at the paper's shapes on OpenAI Moderation, and SFT / GRPO / cal-GRPO.

Two suites, each variant in its own child process (so one variant's peak memory cannot hide
another's), all through `decal.training.runner.train` (the code `decal train` runs), SmolLM2-135M,
float32, LoRA r16 a32 all-linear, gradient checkpointing as `TrainConfig` defaults it (auto: only
micro-batches whose estimated activations exceed a quarter of the memory).

``--suite sft`` (default; issue #13): decision-token SFT on ``openai_moderation``/``train`` (500
prompts, up to 2,102 tokens under SmolLM2's tokenizer), one optimizer step at batch 4 and at batch
32 (4 x grad-accum 8). The length-grouped sampler puts the longest prompts in the first step, so
its first micro-batch holds the 2,102-token prompt. Rows:

- ``decision``, no truncation: the new implementation (logits at the decision position only);
- ``decision`` and ``full_logits`` (the implementation it replaced: (B, T, V) logits, every label
  masked but one) on the same batches with prompts cut to their last 512 tokens, where the old
  one fits, and their step-time ratio (issue #13 target: >= 2x);
- with ``--old-full``, ``full_logits`` without truncation too; with ``--glibc-default``, the new
  implementation without `decal.training.memory.return_large_buffers` (glibc's own mmap threshold).

Step time is the first optimizer step (wall clock and process CPU seconds, from
``train_log.jsonl``); peak memory is the child's peak resident set size (``ru_maxrss``), model and
all. On a shared machine compare CPU seconds and ratios, not wall times.

``--suite grpo`` (issue #13 item 3): GRPO and cal-GRPO on ``openai_moderation``/``train`` at batch 4
prompts x 8 completions of up to 64 tokens (reasoning prompts, `TrainConfig` defaults otherwise),
on the 4 longest prompts (up to 2,102 tokens): one optimizer step in micro-batches of
``--grpo-micro-batch`` completions (default 8, so grad-accum 4), its time and peak memory.

``--suite methods`` (issue #6): SFT, GRPO and cal-GRPO on the built-in task at small shapes; the
step time is the fastest gap between consecutive steps after the first, and cal-GRPO / GRPO must
stay <= 1.05 in CPU time and peak memory (peak RSS sampled every 20 ms during `train`).
`--compare-head` reruns each method with the output head fed the strided slice of the hidden states
(see `decal.models.keep_head_input_contiguous`) and prints that ratio.

Every suite takes ``--model`` (default SmolLM2-135M-Instruct); the sft and grpo suites take
``--task NAME/SPLIT`` and ``--limit N``, the grpo suite ``--generations`` and ``--completion-tokens``.
``--in-process`` runs the variants in this process instead of child processes (the peak memory
of one then includes the others'); the test suite runs each suite so, at a tiny size on a tiny
random Qwen3 (tests/test_benchmarks.py).

``--suite engines`` (issue #22 item 3): GRPO at the reasoning grid's shape (`configs/cpu-reasoning.yaml`:
``verdicts``/``train`` reasoning prompts, 4 prompts x 8 completions of up to 64 tokens, lr 1e-4, LoRA
r16) with TRL's transformers generation (``engine: hf``) and with decal's vLLM sampler (``engine:
vllm``, the LoRA adapter served each step; the engine starts with the trainer, before the first
step). Step time is TRL's ``step_time`` of the fastest of ``--steps`` steps (default 1: a step takes
minutes here), split into sampling (``timing/generate_s``) and the rest (the training pass, and on
vLLM the policy's own log-probabilities for the importance-sampling correction); the ratio hf / vllm
is the speed-up (target >= 2x). ``--init-adapter DIR`` starts both from a warm start's adapter (completions that
decide and stop, as in the grid); without it the base model, which never closes </think>, fills
all 64 tokens.

Usage:
    nice -n 5 python benchmarks/bench_training.py                      # SFT on moderation (about 40 CPU-minutes)
    python benchmarks/bench_training.py --suite sft --batches 4        # batch 4 only
    nice -n 5 python benchmarks/bench_training.py --suite grpo         # GRPO, cal-GRPO on the longest prompts
    python benchmarks/bench_training.py --suite methods --threads 1    # SFT, GRPO, cal-GRPO on the built-in task
    python benchmarks/bench_training.py --suite methods --methods sft grpo --compare-head
    python benchmarks/bench_training.py --suite engines --steps 1       # GRPO step time, hf vs vllm sampling
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from unittest import mock

__all__ = ["main"]

MODEL = "smollm2-135m-instruct"
# --- suites "sft" and "grpo": the paper's shapes on the moderation train split (issue #13) --------
SFT_TASK = "openai_moderation/train"
# batch -> (per-device batch, grad-accum): the paper's effective batch 32 is 4 x 8 here
SFT_BATCHES = {4: (4, 1), 32: (4, 8)}
CUT = 512
# --- suite "methods": SFT, GRPO and cal-GRPO on the built-in task (issue #6) -------------------
SETTINGS = {
    "sft": {"batch_size": 4, "grad_accum": 1, "learning_rate": 2e-4},
    "grpo": {"batch_size": 4, "grad_accum": 1, "num_generations": 4, "max_completion_length": 8,
             "reasoning": False, "learning_rate": 1e-3, "temperature": 1.0},
}
SETTINGS["cal-grpo"] = {**SETTINGS["grpo"], "cal_lambda": 0.001}
# For the cal-GRPO / GRPO ratio both runs must draw the same completions at every step; with the
# paper's lr the two policies drift apart after step 1 and completion lengths (hence costs) differ.
# A learning rate of 1e-9 keeps the samples identical, so the ratio isolates the CE term's cost.
SAME_SAMPLES_LR = 1e-9


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = _rss_mb(), True

    def run(self):
        while self.running:
            self.peak = max(self.peak, _rss_mb())
            time.sleep(0.02)


def _read_log(out: Path) -> list[dict]:
    from decal.training.callbacks import read_train_log

    return read_train_log(out)


# --- suite "sft" -------------------------------------------------------------------------------


def _peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _sft_worker(spec: dict) -> dict:
    """One optimizer step of SFT as `spec` says; the peak RSS and the batch widths."""
    import decal.training.runner
    import decal.training.sft
    from decal.models import load_model
    from decal.training.config import TrainConfig
    from decal.training.runner import train

    load_model(spec["model"])  # converts the GGUF once, outside the measured run
    original = decal.training.sft.build_sft_trainer
    widths, tokens, limit = [], [], []

    def build(**kwargs):  # the old implementation is reachable from here and the tests only
        trainer = original(**kwargs, loss_impl=spec["impl"])
        collate = trainer.data_collator
        limit.append(trainer.auto_checkpointing.max_tokens if trainer.auto_checkpointing else None)

        def recording(features):
            batch = collate(features)
            widths.append(int(batch["attention_mask"].sum(dim=1).max()))  # longest row of the micro-batch
            tokens.append(batch["input_ids"].numel())
            return batch

        trainer.data_collator = recording
        return trainer

    batch_size, grad_accum = SFT_BATCHES[spec["batch"]]
    cut = {"max_prompt_length": spec["cut"], "truncate_prompts": True} if spec["cut"] else {}
    task, split = spec["task"].split("/")
    config = TrainConfig(method="sft", model=spec["model"], task=task, split=split, limit=spec["limit"], out=spec["out"],
                         batch_size=batch_size, grad_accum=grad_accum, max_steps=1, save_steps=10_000, seed=0, **cut)
    with mock.patch.object(decal.training.sft, "build_sft_trainer", build), contextlib.ExitStack() as patches:
        if spec["glibc_default"]:
            patches.enter_context(mock.patch.object(decal.training.runner, "return_large_buffers", lambda: False))
        train(config, progress=False)
    checkpointed = sum(n > limit[0] for n in tokens[:grad_accum]) if limit[0] is not None else grad_accum
    return {"peak_rss_mb": _peak_rss_mb(), "widths": widths[:grad_accum], "checkpointed": checkpointed,
            "max_tokens": limit[0]}


def _run_child(spec: dict, args: argparse.Namespace) -> dict:
    """Run the worker of ``spec["suite"]``: in a child process (its own peak memory), or here with
    ``--in-process``."""
    if args.in_process:
        if args.threads:
            import torch

            torch.set_num_threads(args.threads)
        return _WORKERS[spec["suite"]](spec)
    command = [sys.executable, __file__, "--worker", json.dumps(spec)]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(args.threads)} if args.threads else {}))
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        raise SystemExit(f"{spec.get('name', spec)} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _sft_row(name: str, impl: str, batch: int, cut: int | None, root: Path, args: argparse.Namespace,
             glibc_default: bool = False) -> dict:
    out = root / name
    spec = {"suite": "sft", "name": name, "impl": impl, "batch": batch, "cut": cut, "out": str(out), "model": args.model,
            "task": args.task, "limit": args.limit, "glibc_default": glibc_default}
    child = _run_child(spec, args)
    log = _read_log(out)
    begin = next(e for e in log if e.get("event") == "train_begin")
    step = next(e for e in log if "loss" in e and "train_runtime" not in e)
    row = {"name": name, "impl": impl, "batch": batch, "cut": cut, "step_s": step["time"] - begin["time"],
           "step_cpu_s": step["cpu_s"] - begin["cpu_s"], "loss": step["loss"], **child}
    prompts = f"cut {cut}" if cut else "full"
    print(f"{name:28s} batch {batch:2d} {prompts:8s} longest rows {row['widths']!s:42s} checkpointed "
          f"{row['checkpointed']}/{len(row['widths'])} step "
          f"{row['step_s']:7.1f} s wall {row['step_cpu_s']:7.1f} CPU-s  peak RSS {row['peak_rss_mb'] / 1024:5.2f} GB  "
          f"loss {row['loss']:.4f}", flush=True)
    return row


def _suite_sft(args, root: Path) -> None:
    import torch

    print(f"SFT on {args.task} with {args.model}: float32, LoRA r16 a32 all-linear, gradient checkpointing auto "
          f"(micro-batches over a quarter of RAM in estimated activations), one optimizer step (the longest prompts), "
          f"{args.threads or torch.get_num_threads()} torch threads")
    rows = {}
    for batch in args.batches:
        rows["new", batch] = _sft_row(f"decision b{batch} full", "decision", batch, None, root, args)
        if args.old_full:
            rows["old-full", batch] = _sft_row(f"full_logits b{batch} full", "full_logits", batch, None, root, args)
        if args.glibc_default:
            _sft_row(f"decision b{batch} full glibc", "decision", batch, None, root, args, glibc_default=True)
        new = rows["new-cut", batch] = _sft_row(f"decision b{batch} cut{CUT}", "decision", batch, CUT, root, args)
        old = rows["old-cut", batch] = _sft_row(f"full_logits b{batch} cut{CUT}", "full_logits", batch, CUT, root, args)
        speed = old["step_cpu_s"] / new["step_cpu_s"]
        print(f"  batch {batch}, cut {CUT}: full_logits / decision step CPU time {speed:.2f}x (target >= 2), wall "
              f"{old['step_s'] / new['step_s']:.2f}x, peak RSS {old['peak_rss_mb'] / new['peak_rss_mb']:.2f}x; "
              f"losses {new['loss']:.5f} / {old['loss']:.5f}", flush=True)
    if 4 in args.batches:
        peak = rows["new", 4]["peak_rss_mb"] / 1024
        print(f"peak RSS at batch 4 with the longest prompt (moderation: 2,102 tokens): {peak:.2f} GB (target < 4 GB: "
              f"{'ok' if peak < 4 else 'ABOVE TARGET'})")


# --- suite "grpo" ------------------------------------------------------------------------------


def _longest(task, tokenizer, n: int):
    """`task` restricted to its `n` longest reasoning prompts (as GRPO renders them)."""
    import dataclasses

    from decal.training.grpo import grpo_dataset

    lengths = [len(ids) for ids in tokenizer(text=list(grpo_dataset(task, tokenizer, reasoning=True)["prompt"]))["input_ids"]]
    keep = sorted(range(len(lengths)), key=lambda i: -lengths[i])[:n]
    return dataclasses.replace(task, examples=tuple(task.examples[i] for i in keep)), [lengths[i] for i in keep]


def _grpo_worker(spec: dict) -> dict:
    """One GRPO / cal-GRPO step on the 4 longest prompts of the task; the peak RSS and their lengths."""
    import decal.training.runner
    from decal.models import load_model
    from decal.training.config import TrainConfig
    from decal.training.runner import train

    _, tokenizer = load_model(spec["model"])
    original = decal.training.runner._load_task
    lengths = []

    def load_longest(cfg):
        task, kept = _longest(original(cfg), tokenizer, 4)
        lengths.extend(kept)
        return task

    task, split = spec["task"].split("/")
    completions = 4 * spec["generations"]
    config = TrainConfig(method=spec["method"], model=spec["model"], task=task, split=split, limit=spec["limit"],
                         out=spec["out"], batch_size=spec["micro_batch"], grad_accum=completions // spec["micro_batch"],
                         num_generations=spec["generations"], max_completion_length=spec["completion_tokens"],
                         max_steps=1, save_steps=10_000, seed=0)
    with mock.patch.object(decal.training.runner, "_load_task", load_longest):
        train(config, progress=False)
    return {"peak_rss_mb": _peak_rss_mb(), "prompts": lengths}


def _suite_grpo(args, root: Path) -> None:
    import torch

    micro, completions = args.grpo_micro_batch, 4 * args.generations
    if completions % micro:
        raise SystemExit(f"--grpo-micro-batch {micro} must divide the step's {completions} completions")
    print(f"GRPO on the 4 longest {args.task} prompts with {args.model}: 4 prompts x {args.generations} completions x "
          f"<= {args.completion_tokens} tokens per step, micro-batches of {micro} completions (grad-accum "
          f"{completions // micro}), float32, LoRA r16, gradient checkpointing auto, "
          f"{args.threads or torch.get_num_threads()} torch threads")
    rows = {}
    for method in ("grpo", "cal-grpo"):
        out = root / method
        child = _run_child({"name": method, "suite": "grpo", "method": method, "out": str(out), "model": args.model,
                            "task": args.task, "limit": args.limit, "micro_batch": micro,
                            "generations": args.generations, "completion_tokens": args.completion_tokens}, args)
        log = _read_log(out)
        begin = next(e for e in log if e.get("event") == "train_begin")
        step = next(e for e in log if "loss" in e and "train_runtime" not in e)
        r = rows[method] = {"step_s": step["time"] - begin["time"], "step_cpu_s": step["cpu_s"] - begin["cpu_s"],
                            **child}
        print(f"{method:9s} prompts {child['prompts']} tokens, completions {step['completions/mean_length']:.1f} tokens "
              f"on average: step {r['step_s']:7.1f} s wall {r['step_cpu_s']:7.1f} CPU-s, peak RSS "
              f"{r['peak_rss_mb'] / 1024:5.2f} GB", flush=True)
    cpu = rows["cal-grpo"]["step_cpu_s"] / rows["grpo"]["step_cpu_s"]
    memory = rows["cal-grpo"]["peak_rss_mb"] / rows["grpo"]["peak_rss_mb"]
    print(f"cal-grpo / grpo: step CPU time {cpu:.2f}x, peak RSS {memory:.2f}x (different samples: lr 1e-3, one step)")


# --- suite "methods" ---------------------------------------------------------------------------


def _methods_worker(spec: dict) -> dict:
    """`spec["steps"]` steps of one method on the built-in task; the peak RSS sampled meanwhile."""
    import decal.models
    import decal.training.sft
    from decal.models import load_model
    from decal.training.config import TrainConfig

    method = spec["method"]
    load_model(spec["model"])  # converts the GGUF once, outside the measured run
    settings = dict(SETTINGS[method])
    if spec["same_samples"] and method != "sft":
        settings["learning_rate"] = SAME_SAMPLES_LR
    config = TrainConfig(method=method, model=spec["model"], task="builtin", split="train", out=spec["out"], limit=32,
                         max_steps=spec["steps"], save_steps=10_000, seed=0, **settings)
    with contextlib.ExitStack() as patches:
        if spec["strided_head"]:  # as before decal.models.keep_head_input_contiguous existed
            for module in (decal.models, decal.training.sft):
                patches.enter_context(mock.patch.object(module, "keep_head_input_contiguous", lambda m: None))
        return _train_measured(config)


def _train_measured(config) -> dict:
    """`train(config)` with its peak RSS sampled every 20 ms (`_PeakSampler`)."""
    from decal.training.runner import train

    sampler = _PeakSampler()
    sampler.start()
    try:
        train(config, progress=False)
    finally:
        sampler.running = False
        sampler.join()
    return {"peak_rss_mb": sampler.peak}


def _step_times(out: Path, key: str) -> list[float]:
    times = [e[key] for e in _read_log(out) if "loss" in e and "train_runtime" not in e]
    return [b - a for a, b in zip(times, times[1:])]


def _invalid_rate(out: Path) -> float | None:
    rates = [e["decision/invalid_rate"] for e in _read_log(out) if "decision/invalid_rate" in e]
    return statistics.mean(rates) if rates else None


def _run_method(method: str, root: Path, args: argparse.Namespace, strided_head: bool = False) -> dict:
    out = root / (method + ("-strided" if strided_head else ""))
    memory = _run_child({"suite": "methods", "name": method, "method": method, "out": str(out), "steps": args.steps,
                         "model": args.model, "same_samples": not args.paper_lr, "strided_head": strided_head}, args)
    gaps, cpu_gaps = _step_times(out, "time"), _step_times(out, "cpu_s")
    # The fastest step is the one least disturbed by other jobs on a shared machine.
    return {"method": method, "step_s": min(gaps) if gaps else float("nan"), "steps_timed": len(gaps),
            "step_cpu_s": min(cpu_gaps) if cpu_gaps else float("nan"),
            "peak_rss_mb": memory["peak_rss_mb"], "invalid_rate": _invalid_rate(out)}


def _suite_methods(args, root: Path) -> None:
    import torch

    print(f"model {args.model}, task builtin (32 train examples), float32, LoRA r16 a32 all-linear, "
          f"{args.threads or torch.get_num_threads()} torch threads, {args.steps} steps per method (first not timed)")
    for method in args.methods:
        print(f"  {method}: {json.dumps(SETTINGS[method])}")
    if not args.paper_lr:
        print(f"  grpo and cal-grpo train at lr {SAME_SAMPLES_LR} so both draw the same completions")
    rows = {}
    run = functools.partial(_run_method, root=root, args=args)
    for method in args.methods:
        r = rows[method] = run(method)
        invalid = "" if r["invalid_rate"] is None else f", invalid rate {r['invalid_rate']:.2f}"
        print(f"{method:9s} step {r['step_s']:7.2f} s wall, {r['step_cpu_s']:7.2f} CPU-s "
              f"(fastest of {r['steps_timed']}), peak RSS {r['peak_rss_mb']:7.0f} MB{invalid}", flush=True)
        if args.compare_head:
            s = run(method, strided_head=True)
            print(f"{'':9s} strided head input: step {s['step_s']:7.2f} s wall, {s['step_cpu_s']:7.2f} CPU-s; "
                  f"strided / contiguous CPU time {s['step_cpu_s'] / r['step_cpu_s']:.2f}x, "
                  f"peak RSS {s['peak_rss_mb'] / r['peak_rss_mb']:.2f}x", flush=True)
    if "grpo" in rows and "cal-grpo" in rows:
        wall_ratio = rows["cal-grpo"]["step_s"] / rows["grpo"]["step_s"]
        # CPU seconds are the comparison that holds when other jobs share the cores.
        cpu_ratio = rows["cal-grpo"]["step_cpu_s"] / rows["grpo"]["step_cpu_s"]
        memory_ratio = rows["cal-grpo"]["peak_rss_mb"] / rows["grpo"]["peak_rss_mb"]
        verdict = "ok" if cpu_ratio <= 1.05 and memory_ratio <= 1.05 else "ABOVE TARGET"
        print(f"cal-grpo / grpo: step CPU time {cpu_ratio:.3f}, peak memory {memory_ratio:.3f} "
              f"(target <= 1.05: {verdict}); wall-clock step time {wall_ratio:.3f}")


# --- suite "engines" ---------------------------------------------------------------------------

# The GRPO entries of configs/cpu-reasoning.yaml (4 prompts x 8 completions of up to 64 tokens).
GRID_GRPO = {"batch_size": 32, "num_generations": 8, "grad_accum": 1, "learning_rate": 1e-4,
             "max_completion_length": 64, "reasoning": True}


def _engines_worker(spec: dict) -> dict:
    from decal.models import load_model
    from decal.training.config import TrainConfig

    load_model(spec["model"])  # converts the GGUF once, outside the measured run
    config = TrainConfig(method="grpo", model=spec["model"], task="verdicts", split="train", out=spec["out"], limit=64,
                         max_steps=spec["steps"], save_steps=10_000, seed=0, engine=spec["engine"],
                         init_adapter=spec["init_adapter"], **GRID_GRPO)
    return _train_measured(config)


def _run_engine(engine: str, args, root: Path) -> dict:
    out = root / f"grpo-{engine}"
    memory = _run_child({"suite": "engines", "name": f"grpo on {engine}", "engine": engine, "out": str(out),
                         "steps": args.steps, "model": args.model, "init_adapter": args.init_adapter}, args)
    steps = [e for e in _read_log(out) if "loss" in e and "train_runtime" not in e]
    fastest = min(steps, key=lambda e: e["step_time"])
    return {"engine": engine, "step_s": fastest["step_time"], "generate_s": fastest["timing/generate_s"],
            "steps_timed": len(steps),
            "completion_tokens": statistics.mean(e["completions/mean_length"] for e in steps),
            "invalid_rate": _invalid_rate(out),
            "is_ratio": statistics.mean(e[k] for e in steps for k in e if k.endswith("importance_sampling_ratio/mean"))
            if any(k.endswith("importance_sampling_ratio/mean") for k in steps[0]) else None,
            **memory}


def _suite_engines(args, root: Path) -> None:
    import torch

    start = args.init_adapter or "the base model (no warm start: completions run to 64 tokens)"
    print(f"GRPO at the cpu-reasoning grid's shape on {args.model}: verdicts reasoning prompts, 4 prompts x 8 completions "
          f"x <= 64 tokens, lr 1e-4, LoRA r16, float32, from {start}, {args.steps} steps per engine (first not "
          f"timed), {args.threads or torch.get_num_threads()} torch threads")
    rows = {}
    for engine in ("hf", "vllm"):
        r = rows[engine] = _run_engine(engine, args, root)
        ratio = "" if r["is_ratio"] is None else f", mean importance-sampling ratio {r['is_ratio']:.4f}"
        print(f"{engine:5s} step {r['step_s']:7.1f} s (fastest of {r['steps_timed']}): sampling {r['generate_s']:.1f} s, "
              f"the rest {r['step_s'] - r['generate_s']:.1f} s; completions {r['completion_tokens']:.1f} tokens on "
              f"average, invalid rate {r['invalid_rate']:.2f}, peak RSS {r['peak_rss_mb']:.0f} MB{ratio}", flush=True)
    speed = rows["hf"]["step_s"] / rows["vllm"]["step_s"]
    sampling = rows["hf"]["generate_s"] / rows["vllm"]["generate_s"]
    print(f"GRPO step time hf / vllm: {speed:.2f}x (target >= 2: {'ok' if speed >= 2 else 'BELOW TARGET'}); "
          f"sampling alone {sampling:.2f}x")


_WORKERS = {"sft": _sft_worker, "grpo": _grpo_worker, "methods": _methods_worker, "engines": _engines_worker}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--suite", choices=["sft", "grpo", "methods", "engines"], default="sft")
    parser.add_argument("--threads", type=int, help="torch threads per run (OMP_NUM_THREADS); 1 avoids "
                        "thread spin-waits inflating CPU time on a busy machine")
    parser.add_argument("--model", default=MODEL, help="alias or local model folder (every suite)")
    parser.add_argument("--task", default=SFT_TASK, metavar="NAME/SPLIT", help="task of the sft and grpo suites")
    parser.add_argument("--limit", type=int, default=None, metavar="N", help="first N examples of --task")
    parser.add_argument("--in-process", action="store_true",
                        help="run the variants in this process, not in child processes (peak memory then mixes)")
    sft = parser.add_argument_group("suite sft")
    sft.add_argument("--batches", nargs="+", type=int, default=list(SFT_BATCHES), choices=list(SFT_BATCHES))
    sft.add_argument("--old-full", action="store_true", help="also run the old implementation without truncation")
    sft.add_argument("--glibc-default", action="store_true",
                     help="also run the new implementation with glibc's own mmap threshold (several GB more)")
    grpo = parser.add_argument_group("suite grpo")
    grpo.add_argument("--grpo-micro-batch", type=int, default=8, choices=[2, 4, 8, 16, 32],
                      help="completions per micro-batch; 4 x generations / this is the grad-accum")
    grpo.add_argument("--generations", type=int, default=8, help="completions per prompt")
    grpo.add_argument("--completion-tokens", type=int, default=64, help="new tokens per completion at most")
    methods = parser.add_argument_group("suite methods")
    methods.add_argument("--methods", nargs="+", default=["sft", "grpo", "cal-grpo"], choices=list(SETTINGS))
    methods.add_argument("--steps", type=int, default=3, help="optimizer steps per method or engine (first one is "
                         "warm-up)")
    engines = parser.add_argument_group("suite engines")
    engines.add_argument("--init-adapter", help="start GRPO from this LoRA adapter (a warm start's)")
    methods.add_argument("--paper-lr", action="store_true",
                         help="train GRPO/cal-GRPO at lr 1e-3 (their samples then differ after step 1)")
    methods.add_argument("--compare-head", action="store_true",
                         help="also run each method with the output head fed the strided hidden-state slice "
                         "(no decal.models.keep_head_input_contiguous) and print the step-time ratio")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # a child process: the JSON spec of its run
    args = parser.parse_args(argv)
    if args.worker:
        spec = json.loads(args.worker)
        print(json.dumps(_WORKERS[spec["suite"]](spec)))
        return 0
    with tempfile.TemporaryDirectory(prefix="decal-bench-train-") as root:
        {"sft": _suite_sft, "grpo": _suite_grpo, "methods": _suite_methods,
         "engines": _suite_engines}[args.suite](args, Path(root))
    return 0


if __name__ == "__main__":
    sys.exit(main())
