"""GPU check (issue #13 item 4): decal's scoring and training costs on a random Qwen3-1.7B-shaped model.

The script writes a Qwen3-1.7B-shaped config (vocabulary 151,936; 28 layers, hidden 2048, MLP
6144, 16 query / 8 key-value heads of 128), initialises the model at random in bfloat16, saves it
with the real Qwen3 tokenizer as a model folder, and loads it through `decal.models.load_model`
for each measurement, as the commands do. It prints one table and exits:

(a) scoring: `decal.scoring.score_prompts` against the bare batched forward pass (the same
    length-grouped, left-padded token batches, ``logits_to_keep=1``) on built-in task prompts;
    time, peak memory, decal / bare;
(b) one GRPO and one cal-GRPO optimizer step (8 prompts x 8 completions x 256 tokens, one
    micro-batch of 64 completions, gradient checkpointing on): step time and peak memory
    (generation included), and cal-GRPO / GRPO;
(c) one SFT micro-batch (forward + backward, gradient checkpointing on) at batch 32 x 512 tokens:
    decision-position SFT against the full-logits implementation it replaced
    (`decal.training.sft`, ``loss_impl``).

Times are CUDA-synchronised wall times of the second of two runs (the first warms up); peak
memory is ``torch.cuda.max_memory_allocated`` over the timed run. ``--tiny`` runs the same code
on the CPU with the tiny Qwen3 of the test suite (hidden 64, 2 layers, the real vocabulary) in
float32 and smaller batches, in seconds; peak memory is then the process's resident set size.

On a device machine: PyTorch, transformers and PEFT are there, TRL is not. Carry
``trl==1.16.0`` with ``datasets``, ``dill``, ``multiprocess`` and ``xxhash`` as wheels, and the
Qwen3 tokenizer folder (``--tokenizer``), as /work/.library/device/README.md explains. Imports:
decal, torch, transformers, trl and peft only.

Usage:
    python benchmarks/gpu_check.py --tokenizer shared/models/qwen3-tokenizer    # CUDA, about 3 minutes
    python benchmarks/gpu_check.py --tiny                                       # CPU, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["main", "SHAPES"]


@dataclass(frozen=True)
class Shape:
    """A model shape and the batch shapes measured with it."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    dtype: str
    n_score: int  # (a) prompts scored
    score_batch: int
    n_prompts: int  # (b) prompts per GRPO step
    n_generations: int
    completion_tokens: int
    sft_batch: int  # (c)
    sft_tokens: int


SHAPES = {
    # Qwen/Qwen3-1.7B's config.json (vocabulary 151,936, tied embeddings)
    "qwen3-1.7b": Shape(hidden_size=2048, intermediate_size=6144, num_hidden_layers=28, num_attention_heads=16,
                        num_key_value_heads=8, head_dim=128, dtype="bfloat16", n_score=1024, score_batch=64,
                        n_prompts=8, n_generations=8, completion_tokens=256, sft_batch=32, sft_tokens=512),
    # tests/conftest.py's tiny Qwen3, with batch shapes a 2-core CPU runs in seconds
    "tiny": Shape(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, dtype="float32", n_score=16, score_batch=8,
                  n_prompts=2, n_generations=2, completion_tokens=8, sft_batch=4, sft_tokens=64),
}


class _Meter:
    """Wall time and peak memory of a block: CUDA-synchronised and max_memory_allocated on a GPU, RSS on a CPU."""

    def __init__(self, device: str):
        self.device = device

    @contextlib.contextmanager
    def measure(self, result: dict):
        import torch

        cuda = self.device == "cuda"
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            sampler = None
        else:
            sampler = _RssSampler()
            sampler.start()
        start = time.perf_counter()
        yield
        if cuda:
            torch.cuda.synchronize()
        result["seconds"] = time.perf_counter() - start
        if cuda:
            result["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
        else:
            sampler.running = False
            sampler.join()
            result["peak_gb"] = sampler.peak / 2**30


class _RssSampler(threading.Thread):
    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.running = self._rss(), True

    @staticmethod
    def _rss() -> int:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")

    def run(self):
        while self.running:
            self.peak = max(self.peak, self._rss())
            time.sleep(0.005)


def _write_model(shape: Shape, tokenizer_dir: str, folder: Path, device: str) -> int:
    """A randomly initialised Qwen3 of `shape`, saved with the tokenizer as a model folder; returns its vocabulary."""
    import torch
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    config = Qwen3Config(
        vocab_size=151_936 if shape.hidden_size > 64 else len(tokenizer), hidden_size=shape.hidden_size,
        intermediate_size=shape.intermediate_size, num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads, num_key_value_heads=shape.num_key_value_heads,
        head_dim=shape.head_dim, max_position_embeddings=40_960 if shape.hidden_size > 64 else 2048,
        rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=True,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.convert_tokens_to_ids("<|im_end|>"),
        pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(0)
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(getattr(torch, shape.dtype))
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = config.pad_token_id
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    del model
    return config.vocab_size


def _load(folder: Path, shape: Shape, device: str):
    from decal.models import load_model

    return load_model(str(folder), dtype=shape.dtype, device=device)


# (a) ----------------------------------------------------------------------------------------


def _bare_scores(model, tokenizer, prompts, batch_size: int):
    """The bare batched forward: length-grouped left-padded batches, logits at the last position."""
    import torch

    ids = tokenizer(list(prompts), add_special_tokens=False)["input_ids"]
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    device = next(model.parameters()).device
    logprobs = [None] * len(ids)
    with torch.inference_mode():
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            width = max(len(ids[i]) for i in rows)
            input_ids = torch.tensor([[tokenizer.pad_token_id] * (width - len(ids[i])) + ids[i] for i in rows],
                                     device=device)
            mask = torch.tensor([[0] * (width - len(ids[i])) + [1] * len(ids[i]) for i in rows], device=device)
            position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
            logits = model(input_ids=input_ids, attention_mask=mask, position_ids=position_ids, logits_to_keep=1,
                           use_cache=False).logits[:, -1]  # (b, V)
            for row, value in zip(rows, torch.log_softmax(logits.float(), dim=-1)):
                logprobs[row] = value
    return logprobs


def _check_scoring(folder: Path, shape: Shape, device: str, meter: _Meter) -> list[dict]:
    from decal.decision import option_token_ids
    from decal.scoring import score_prompts
    from decal.tasks.builtin import load_builtin
    from decal.tasks.prompts import render_chat

    model, tokenizer = _load(folder, shape, device)
    task = load_builtin("test", n=min(shape.n_score, 200))
    prompts = [render_chat(tokenizer, task.template.user_message(ex, reasoning=False), reasoning=False)
               for ex in task.examples]
    prompts = (prompts * (shape.n_score // len(prompts) + 1))[: shape.n_score]
    tokens = option_token_ids(tokenizer, task.examples[0].labels, context=prompts[0])
    bare, decal = {"section": "(a) scoring", "variant": "bare forward"}, {"section": "(a) scoring", "variant": "decal"}
    for _ in range(2):  # the second run is the one kept
        with meter.measure(bare):
            reference = _bare_scores(model, tokenizer, prompts, shape.score_batch)
        with meter.measure(decal):
            scores = score_prompts(model, tokenizer, prompts, tokens, batch_size=shape.score_batch)
    import math

    gap = max(abs(math.exp(float(ref[t])) - s.option_probs[k]) for ref, s in zip(reference, scores)
              for k, t in enumerate(tokens.token_ids))
    shape_text = f"{len(prompts)} prompts, batch {shape.score_batch}"
    bare["shape"] = decal["shape"] = shape_text
    decal["ratio"] = f"time {decal['seconds'] / bare['seconds']:.2f}x, memory {decal['peak_gb'] / bare['peak_gb']:.2f}x"
    decal["note"] = f"max |option prob gap| {gap:.1e}"
    return [bare, decal]


# (b) ----------------------------------------------------------------------------------------


def _step_timer(meter: _Meter, results: list[dict]):
    """A TrainerCallback measuring each optimizer step (generation included) into `results`."""
    from transformers import TrainerCallback

    class _StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            results.append({})
            self.block = meter.measure(results[-1])
            self.block.__enter__()

        def on_step_end(self, args, state, control, **kwargs):
            self.block.__exit__(None, None, None)

    return _StepTimer()


def _grpo_step(folder: Path, shape: Shape, device: str, meter: _Meter, calibration: bool, root: Path) -> dict:
    from decal.tasks.builtin import load_builtin
    from decal.training.config import TrainConfig
    from decal.training.grpo import DecalGRPOConfig, build_grpo_trainer
    from decal.training.runner import lora_config

    model, tokenizer = _load(folder, shape, device)
    batch = shape.n_prompts * shape.n_generations
    args = DecalGRPOConfig(
        output_dir=str(root / ("cal-grpo" if calibration else "grpo")), per_device_train_batch_size=batch,
        gradient_accumulation_steps=1, num_generations=shape.n_generations,
        max_completion_length=shape.completion_tokens, max_steps=2, learning_rate=1e-3, bf16=False,
        use_cpu=device == "cpu", gradient_checkpointing=True, report_to="none", logging_strategy="no", save_strategy="no",
        disable_tqdm=True, reasoning=False, calibration=calibration, seed=0,
        # a random model rarely samples <|im_end|>; every completion is then exactly completion_tokens long
        generation_kwargs={"min_new_tokens": shape.completion_tokens})
    steps: list[dict] = []
    trainer = build_grpo_trainer(model=model, tokenizer=tokenizer, task=load_builtin("train", n=2 * shape.n_prompts),
                                 args=args, peft_config=lora_config(TrainConfig(method="grpo")),
                                 callbacks=[_step_timer(meter, steps)])
    # With tqdm off, transformers' PrinterCallback prints the run's metrics dict on stdout at the
    # end; the script's stdout is its one table.
    with contextlib.redirect_stdout(sys.stderr):
        trainer.train()
    result = dict(steps[-1])  # the second step; the first warms up
    result.update(section="(b) GRPO step", variant="cal-grpo" if calibration else "grpo",
                  shape=f"{shape.n_prompts} prompts x {shape.n_generations} x {shape.completion_tokens} tokens")
    return result


def _check_grpo(folder: Path, shape: Shape, device: str, meter: _Meter, root: Path) -> list[dict]:
    grpo = _grpo_step(folder, shape, device, meter, False, root)
    cal = _grpo_step(folder, shape, device, meter, True, root)
    cal["ratio"] = f"time {cal['seconds'] / grpo['seconds']:.2f}x, memory {cal['peak_gb'] / grpo['peak_gb']:.2f}x"
    return [grpo, cal]


# (c) ----------------------------------------------------------------------------------------


def _sft_step(folder: Path, shape: Shape, device: str, meter: _Meter, impl: str, root: Path) -> dict:
    import torch
    from peft import get_peft_model
    from transformers import TrainingArguments

    from decal.models import keep_head_input_contiguous
    from decal.training.config import TrainConfig
    from decal.training.runner import lora_config
    from decal.training.sft import DecisionTokenCollator, DecisionTokenTrainer

    model, tokenizer = _load(folder, shape, device)
    keep_head_input_contiguous(model)  # as build_sft_trainer does
    model.enable_input_require_grads()
    model = get_peft_model(model, lora_config(TrainConfig(method="sft")))
    args = TrainingArguments(output_dir=str(root / impl), per_device_train_batch_size=shape.sft_batch,
                             gradient_checkpointing=True, report_to="none", save_strategy="no", bf16=False,
                             use_cpu=device == "cpu", remove_unused_columns=False, disable_tqdm=True)
    collator = DecisionTokenCollator(tokenizer.pad_token_id, loss_impl=impl)
    trainer = DecisionTokenTrainer(model=model, args=args, data_collator=collator, processing_class=tokenizer,
                                   loss_impl=impl)
    trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    generator = torch.Generator().manual_seed(0)
    rows = [{"input_ids": torch.randint(0, len(tokenizer) - 300, (shape.sft_tokens + 1,), generator=generator).tolist()}
            for _ in range(shape.sft_batch)]  # prompt of sft_tokens + the gold token
    batch = trainer._prepare_inputs(collator(rows))
    result = {"section": "(c) SFT step", "variant": impl, "shape": f"batch {shape.sft_batch} x {shape.sft_tokens} tokens"}
    n_items = torch.tensor(shape.sft_batch, device=args.device)
    for _ in range(2):
        model.zero_grad(set_to_none=True)
        with meter.measure(result):
            result["loss"] = trainer.training_step(trainer.model, dict(batch), num_items_in_batch=n_items).item()
    return result


def _check_sft(folder: Path, shape: Shape, device: str, meter: _Meter, root: Path) -> list[dict]:
    old = _sft_step(folder, shape, device, meter, "full_logits", root)
    new = _sft_step(folder, shape, device, meter, "decision", root)
    new["ratio"] = (f"full_logits / decision: time {old['seconds'] / new['seconds']:.2f}x, "
                    f"memory {old['peak_gb'] / new['peak_gb']:.2f}x")
    new["note"] = f"losses {new['loss']:.6f} / {old['loss']:.6f}"
    return [old, new]


# --------------------------------------------------------------------------------------------


def _table(rows: list[dict], title: str) -> str:
    header = ("section", "variant", "shape", "time s", "peak GB", "ratio", "note")
    cells = [header] + [(r["section"], r["variant"], r["shape"], f"{r['seconds']:.3f}", f"{r['peak_gb']:.2f}",
                         r.get("ratio", ""), r.get("note", "")) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(len(header))]
    lines = [title] + ["  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in cells]
    lines.insert(2, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _default_tokenizer() -> str:
    here = Path(__file__).resolve().parents[1]
    for candidate in (os.environ.get("DECAL_QWEN3_TOKENIZER"), here / "shared" / "models" / "qwen3-tokenizer",
                      here.parent / "shared" / "models" / "qwen3-tokenizer"):
        if candidate and Path(candidate).is_dir():
            return str(candidate)
    return ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiny", action="store_true", help="the tiny Qwen3 on the CPU (seconds; the test suite's run)")
    parser.add_argument("--tokenizer", default=_default_tokenizer(),
                        help="the Qwen3 tokenizer folder (default: $DECAL_QWEN3_TOKENIZER or shared/models/qwen3-tokenizer)")
    parser.add_argument("--sections", nargs="+", default=["a", "b", "c"], choices=["a", "b", "c"])
    args = parser.parse_args(argv)
    import torch
    import transformers

    if not args.tokenizer or not Path(args.tokenizer, "tokenizer_config.json").is_file():
        print(f"error: no Qwen3 tokenizer folder at {args.tokenizer!r}; pass --tokenizer DIR", file=sys.stderr)
        return 2
    if not args.tiny and not torch.cuda.is_available():
        print("error: no CUDA device; run with --tiny on a CPU", file=sys.stderr)
        return 2
    device = "cpu" if args.tiny else "cuda"
    shape = SHAPES["tiny" if args.tiny else "qwen3-1.7b"]
    transformers.logging.set_verbosity_error()
    meter = _Meter(device)
    rows: list[dict] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="decal-gpu-check-") as tmp:
        root = Path(tmp)
        vocab = _write_model(shape, args.tokenizer, root / "model", device)
        checks = {"a": _check_scoring, "b": lambda *a: _check_grpo(*a, root), "c": lambda *a: _check_sft(*a, root)}
        for section in args.sections:
            rows += checks[section](root / "model", shape, device, meter)
    where = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    title = (f"decal GPU check: {'tiny Qwen3' if args.tiny else 'random Qwen3-1.7B shape'} ({shape.dtype}, vocabulary "
             f"{vocab:,}) on {where}; torch {torch.__version__}, transformers {transformers.__version__}; "
             f"{time.perf_counter() - started:.0f} s in all; peak memory is "
             f"{'max_memory_allocated' if device == 'cuda' else 'resident set size'}")
    print(_table(rows, title), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
