"""The inference-engine flags shared by `decal evaluate`, `decal analyze rollouts|swap` and `decal serve`.

`--engine NAME` picks a registered engine (`decal.engines.registry`); the other flags are engine
options (vLLM's parallel layout and engine arguments, the remote engine's servers and limits),
checked with the engine name before any weights load or any server is called.
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
    "server_url_opt",
    "served_model_name_opt",
    "max_concurrency_opt",
    "server_timeout_opt",
    "server_retries_opt",
    "server_api_key_opt",
    "engine_options",
]

PANEL = "Engine"


def engine_opt():
    from ..engines.registry import engine_kinds

    kinds = engine_kinds()
    return typer.Option("hf", "--engine", metavar="|".join(k.name for k in kinds), rich_help_panel=PANEL,
                        help="Inference engine: " + "; ".join(f"{k.name}: {k.summary}" for k in kinds) + ".")


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


def server_url_opt():
    return typer.Option(None, "--server-url", metavar="URL", rich_help_panel=PANEL, show_default=False,
                        help="remote: base of a vLLM OpenAI-compatible API, e.g. http://127.0.0.1:8000/v1; repeat it "
                             "for replicas, or give one load balancer.")


def served_model_name_opt():
    return typer.Option(None, "--served-model-name", metavar="NAME", rich_help_panel=PANEL, show_default=False,
                        help="remote: the model's name at the servers (default: the one base model /v1/models lists).")


def max_concurrency_opt():
    return typer.Option(None, "--max-concurrency", metavar="N", rich_help_panel=PANEL, show_default=False,
                        help="remote: requests in flight per replica at most (default 64).")


def server_timeout_opt():
    return typer.Option(None, "--server-timeout", metavar="S", rich_help_panel=PANEL, show_default=False,
                        help="remote: seconds one request may take before it is retried (default 600).")


def server_retries_opt():
    return typer.Option(None, "--server-retries", metavar="N", rich_help_panel=PANEL, show_default=False,
                        help="remote: retries of a request after a connection error, 5xx or 429 (default 6).")


def server_api_key_opt(*names: str):
    from ..engines.remote import API_KEY_ENV

    return typer.Option(None, *(names or ("--server-api-key",)), metavar="KEY", rich_help_panel=PANEL,
                        show_default=False,
                        help=f"remote: bearer token for the servers (prefer ${API_KEY_ENV}: flags show in ps); "
                             "never written to any file.")


def engine_options(engine: str, *, tensor_parallel_size: Optional[int] = None, data_parallel_size: Optional[int] = None,
                   gpu_memory_utilization: Optional[float] = None, max_model_len: Optional[int] = None,
                   engine_args: Optional[List[str]] = None, server_urls: Optional[List[str]] = None,
                   served_model_name: Optional[str] = None, max_concurrency: Optional[int] = None,
                   server_timeout: Optional[float] = None, server_retries: Optional[int] = None):
    """The flags as a checked `EngineOptions` (engine name included); raises ConfigError in one line."""
    from ..engines import EngineOptions, check_engine_options, parse_engine_args

    remote = {"server_urls": list(server_urls) if server_urls else None, "served_model_name": served_model_name,
              "max_concurrency": max_concurrency, "server_timeout": server_timeout, "server_retries": server_retries}
    options = EngineOptions(
        tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
        gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
        extra={**parse_engine_args(engine_args or []), **{k: v for k, v in remote.items() if v is not None}},
    )
    check_engine_options(engine, options)
    return options
