"""The inference-engine flags shared by `decal evaluate` and `decal analyze rollouts|swap`.

`--engine hf|vllm` picks the engine (`decal.engines`); the other flags are vLLM engine options,
checked (with the engine name) before any weights load.
"""

from __future__ import annotations

from typing import List, Optional

import typer

__all__ = [
    "PANEL",
    "engine_opt",
    "tensor_parallel_opt",
    "data_parallel_opt",
    "gpu_memory_opt",
    "max_model_len_opt",
    "engine_arg_opt",
    "engine_options",
]

PANEL = "Engine"


def engine_opt():
    return typer.Option("hf", "--engine", metavar="hf|vllm", rich_help_panel=PANEL,
                        help="Inference engine: hf (transformers, default) or vllm (vLLM: paged KV cache, "
                             "continuous batching, tensor/data parallel; GPUs: the `vllm` extra of decal).")


def tensor_parallel_opt():
    return typer.Option(None, "--tensor-parallel-size", metavar="N", rich_help_panel=PANEL, show_default=False,
                        help="vllm: split the model over N GPUs of one node.")


def data_parallel_opt():
    return typer.Option(None, "--data-parallel-size", metavar="N", rich_help_panel=PANEL, show_default=False,
                        help="vllm: N model copies, each serving part of the requests.")


def gpu_memory_opt():
    return typer.Option(None, "--gpu-memory-utilization", metavar="F", rich_help_panel=PANEL, show_default=False,
                        help="vllm: share of device memory it may claim (on the CPU build: of RAM).")


def max_model_len_opt():
    return typer.Option(None, "--max-model-len", metavar="N", rich_help_panel=PANEL, show_default=False,
                        help="vllm: longest prompt + completion in tokens (sizes the KV cache).")


def engine_arg_opt():
    return typer.Option(None, "--engine-arg", metavar="KEY=VALUE", rich_help_panel=PANEL, show_default=False,
                        help="vllm: any other vLLM engine argument (repeatable), e.g. enforce_eager=false.")


def engine_options(engine: str, *, tensor_parallel_size: Optional[int], data_parallel_size: Optional[int],
                   gpu_memory_utilization: Optional[float], max_model_len: Optional[int],
                   engine_args: Optional[List[str]]):
    """The flags as a checked `EngineOptions` (engine name included); raises ConfigError in one line."""
    from ..engines import EngineOptions, check_engine_options, parse_engine_args

    options = EngineOptions(
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        extra=parse_engine_args(engine_args or []),
    )
    check_engine_options(engine, options)
    return options
