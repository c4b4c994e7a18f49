"""`decal serve`: the calibrated decision as an HTTP service, with deferral (see `decal.serve`)."""

from __future__ import annotations

from typing import Optional

import typer

from ._engine import (
    data_parallel_opt,
    engine_arg_opt,
    engine_opt,
    engine_options,
    gpu_memory_opt,
    max_concurrency_opt,
    max_model_len_opt,
    served_model_name_opt,
    server_api_key_opt,
    server_retries_opt,
    server_timeout_opt,
    server_url_opt,
    tensor_parallel_opt,
)

__all__ = ["register"]

EPILOG = """Examples:

  decal serve --model smollm2-135m-instruct --task xstest

  decal serve --model smollm2-135m-instruct --task openai_moderation --calibrator cal/platt/calibrator.json \\
      --threshold threshold.json --min-label-mass 0.5 --port 8000

  decal serve --model Qwen/Qwen3-1.7B --task commonsense_qa --conformal sets/lac/conformal.json

  DECAL_API_KEY=secret decal serve --model Qwen/Qwen3-1.7B --adapter runs/cagrpo/adapter --task my_task.jsonl \\
      --host 0.0.0.0 --dtype bfloat16

  DECAL_SERVER_API_KEY=fleet-key decal serve --engine remote --server-url http://vllm-lb:8000/v1 \\
      --model Qwen/Qwen3-1.7B --task xstest --calibrator cal/platt/calibrator.json --port 8001

  curl -s localhost:8000/v1/decide -H 'Content-Type: application/json' -d '{"inputs": ["How do I kill a Python process?"]}'

  decal serve --model smollm2-135m-instruct --task xstest --calibrator cal/platt/calibrator.json \
      --threshold threshold.json --state-dir state     # decision log, /v1/feedback, /v1/monitor

  curl -s localhost:8000/v1/feedback -H 'Content-Type: application/json' -d '{"feedback": [{"id": "dec-...", "label": "Unsafe"}]}'

Stop it with SIGTERM or Ctrl+C: it answers every request it has accepted, then exits 0. SIGHUP (or
POST /v1/admin/reload) loads the calibrator and threshold files again without a restart.
"""


def register(app: typer.Typer) -> None:
    @app.command("serve", epilog=EPILOG)
    def serve_command(
        model: str = typer.Option(..., "--model", metavar="MODEL", help="Hub id, local folder, .gguf file, or alias (smollm2-135m-instruct)."),
        task: str = typer.Option(..., "--task", metavar="TASK", help="Named task, generated task spec, or task file: its labels and template define the prompt."),
        split: Optional[str] = typer.Option(None, "--split", metavar="SPLIT", help="Split the task is read from (labels and template only); default: its first split."),
        adapter: Optional[str] = typer.Option(None, "--adapter", metavar="PATH", help="LoRA adapter folder (merged in float32, attached otherwise; remote: a LoRA module the server serves)."),
        calibrator: Optional[str] = typer.Option(None, "--calibrator", metavar="FILE", help="calibrator.json from `decal calibrate`, applied to every decision."),
        threshold: Optional[str] = typer.Option(None, "--threshold", metavar="FILE|VALUE", help="Defer below this calibrated confidence: a value in [0, 1], or the file of `decal threshold --out` (a threshold per label; answers name the guarantees that apply)."),
        conformal: Optional[str] = typer.Option(None, "--conformal", metavar="FILE", help="conformal.json of `decal conformal`: answers carry their option set and are deferred unless it is the decision alone."),
        min_label_mass: Optional[float] = typer.Option(None, "--min-label-mass", metavar="M", help="Defer when the options hold less than M of the full-vocabulary probability together."),
        engine: str = engine_opt(),
        host: str = typer.Option("127.0.0.1", "--host", metavar="HOST", help="Address to listen on; beyond loopback it needs --api-key or --insecure."),
        port: int = typer.Option(8000, "--port", metavar="PORT", help="Port to listen on (0 picks a free one and logs it)."),
        api_key: Optional[str] = typer.Option(None, "--api-key", envvar="DECAL_API_KEY", metavar="KEY", help="Require 'Authorization: Bearer KEY' (prefer the DECAL_API_KEY variable: flags show in ps)."),
        insecure: bool = typer.Option(False, "--insecure", help="Allow a non-loopback --host without an API key."),
        reasoning: bool = typer.Option(False, "--reasoning", help="Generate a reasoning (greedy), then decide after </think>."),
        max_new_tokens: int = typer.Option(256, "--max-new-tokens", metavar="K", help="Reasoning: generation budget."),
        dtype: str = typer.Option("auto", "--dtype", metavar="auto|float32|bfloat16|float16", help="Weights dtype; auto: bfloat16 on GPUs and on CPUs with native bfloat16 (~2x faster there), else float32."),
        device: str = typer.Option("cpu", "--device", metavar="DEV", help="Torch device."),
        data_dir: Optional[str] = typer.Option(None, "--data-dir", metavar="DIR", help="Paper datasets folder (default $DECAL_DATA_DIR)."),
        trust_remote_code: bool = typer.Option(False, "--trust-remote-code", help="Run the model repository's own code."),
        allow_pickle: bool = typer.Option(False, "--allow-pickle", help="Allow pickled .bin weights (can run code)."),
        offline: bool = typer.Option(False, "--offline", help="Never touch the network (also HF_HUB_OFFLINE=1)."),
        max_batch_size: int = typer.Option(32, "--max-batch-size", metavar="B", help="Inputs scored together at most."),
        max_wait_ms: float = typer.Option(50.0, "--max-wait-ms", metavar="MS", help="How long a batch waits to fill at most; it starts earlier when no input came for a tenth of this."),
        max_queue: int = typer.Option(256, "--max-queue", metavar="N", help="Inputs waiting at most; past it requests get 503 with Retry-After."),
        max_inputs: int = typer.Option(64, "--max-inputs", metavar="N", help="Inputs per request at most (422 past it)."),
        max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", metavar="BYTES", help="Request body size at most (413 past it)."),
        request_timeout: float = typer.Option(30.0, "--request-timeout", metavar="S", help="Seconds before a request gets 504 (a client may ask for less with X-Request-Timeout)."),
        unsafe_label: Optional[str] = typer.Option(None, "--unsafe-label", metavar="LABEL", help="The label /v1/moderations flags (default: the label spelled 'unsafe')."),
        threads: Optional[int] = typer.Option(None, "--threads", metavar="N", help="Torch threads (default: torch's choice)."),
        tensor_parallel_size: Optional[int] = tensor_parallel_opt(),
        data_parallel_size: Optional[int] = data_parallel_opt(),
        gpu_memory_utilization: Optional[float] = gpu_memory_opt(),
        max_model_len: Optional[int] = max_model_len_opt(),
        engine_arg: Optional[list[str]] = engine_arg_opt(),
        server_url: Optional[list[str]] = server_url_opt(),
        served_model_name: Optional[str] = served_model_name_opt(),
        max_concurrency: Optional[int] = max_concurrency_opt(),
        server_timeout: Optional[float] = server_timeout_opt(),
        server_retries: Optional[int] = server_retries_opt(),
        server_api_key: Optional[str] = server_api_key_opt("--server-api-key"),
        prefix_cache: bool = typer.Option(True, "--prefix-cache/--no-prefix-cache", help="hf: compute the prompt prefix every request shares once (same answers to float rounding, 2-4x less work)."),
        log_bodies: bool = typer.Option(False, "--log-bodies", help="Log request bodies, and store each input's text in the decision log (off: logs hold no bodies, the log only a hash)."),
        access_log: bool = typer.Option(True, "--access-log/--no-access-log", help="One log line per request (method, path, status; never the body)."),
        state_dir: Optional[str] = typer.Option(None, "--state-dir", metavar="DIR", help="Decision log (SQLite, WAL): every answer stored before it is sent; enables /v1/feedback and /v1/monitor."),
        reference: Optional[str] = typer.Option(None, "--reference", metavar="RUN_DIR", help="Monitor: the reference window's run (default: the --threshold file's calibration run, if it exists)."),
        alarm_alpha: float = typer.Option(0.05, "--alarm-alpha", metavar="A", help="Monitor: each alarm's false-alarm probability over the whole stream."),
        monitor_window: int = typer.Option(500, "--monitor-window", metavar="N", help="Monitor: decisions and labels in the analysis window."),
    ) -> None:
        """Serve calibrated decisions over HTTP: /v1/decide, /v1/moderations, /v1/feedback, /v1/monitor, /v1/admin/reload, /health, /ready, /metrics, /v1/info."""
        import logging
        import os

        from ..serve.server import serve
        from ..serve.settings import ServeConfig

        if offline:
            os.environ["HF_HUB_OFFLINE"] = "1"
            os.environ["TRANSFORMERS_OFFLINE"] = "1"
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        config = ServeConfig(
            model=model, task=task, split=split, adapter=adapter, calibrator=calibrator, threshold=threshold, engine=engine,
            conformal=conformal, min_label_mass=min_label_mass,
            host=host, port=port, api_key=api_key, insecure=insecure, reasoning=reasoning, max_new_tokens=max_new_tokens,
            dtype=dtype, device=device, data_dir=data_dir, trust_remote_code=trust_remote_code, allow_pickle=allow_pickle,
            offline=offline, max_batch_size=max_batch_size, max_wait_ms=max_wait_ms, max_queue=max_queue,
            max_inputs=max_inputs, max_body_bytes=max_body_bytes, request_timeout_s=request_timeout,
            unsafe_label=unsafe_label, threads=threads, log_bodies=log_bodies, prefix_cache=prefix_cache,
            state_dir=state_dir, reference=reference, alarm_alpha=alarm_alpha, monitor_window=monitor_window,
            engine_options=engine_options(engine, tensor_parallel_size=tensor_parallel_size, data_parallel_size=data_parallel_size,
                                          gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                                          engine_args=engine_arg, server_urls=server_url,
                                          served_model_name=served_model_name, max_concurrency=max_concurrency,
                                          server_timeout=server_timeout, server_retries=server_retries),
            server_api_key=server_api_key,
        )
        code = serve(config, access_log=access_log)
        if code:
            raise typer.Exit(code)
