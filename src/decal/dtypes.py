"""Choose the weights' dtype from the hardware: what `--dtype auto` (the default) resolves to.

bfloat16 is fast only where the hardware computes it natively. Measured on 2-core CPUs of the
same machine kind: with AVX512-BF16/AMX a bfloat16 matrix product ran about 4x faster than
float32 and scoring about 2x; with AVX2 only it ran at 0.9 GFLOP/s against 153 in float32
(~170x slower) and `decal evaluate` took 4x longer. So:

- CUDA: bfloat16 where the device supports it, else float32.
- CPU, inference: bfloat16 only where the CPU reports native bfloat16 (AVX512-BF16 or AMX) *and*
  a small bfloat16 matrix product measures faster than float32 here; else float32.
- CPU, training: float32 (docs/design.md, "Measured costs": LoRA updates are lost to rounding in bfloat16 weights).

An explicit dtype always wins; an explicit bfloat16 on a CPU without native support warns once,
with the measured slowdown. The resolved dtype and the reason go into each run's metadata.

Reproducibility: float32 gives the same bits in every process. CPU bfloat16 does not quite:
PyTorch's two-thread CPU bfloat16 kernels gave probabilities ~3e-3 (relative) apart between processes
started while the machine was busy (one thread gave the same bits), so tests and users that need
bit-equal reruns across processes pass float32.
"""

from __future__ import annotations

import functools
import logging
import time
import warnings
from dataclasses import dataclass
from typing import Callable, Literal

from .errors import ConfigError

__all__ = ["DTYPES", "ResolvedDtype", "cpu_has_native_bf16", "bf16_speedup", "resolve_dtype"]

logger = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
Purpose = Literal["inference", "training"]


@dataclass(frozen=True)
class ResolvedDtype:
    """What a requested dtype became. dtype: "float32" | "bfloat16" | "float16"; reason: one line."""

    dtype: str
    reason: str


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), as torch sees it."""
    import torch

    cpu = getattr(torch, "cpu", None)
    checks = [getattr(cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(check()) for check in checks if check is not None)


@functools.lru_cache(maxsize=1)
def bf16_speedup(size: int = 256, repeats: int = 5) -> float:
    """float32 time / bfloat16 time of a (size x size) @ (size x size) product on this CPU (best of
    `repeats`); above 1 means bfloat16 is faster. Measured once per process (tens of ms)."""
    import torch

    def best(dtype) -> float:
        a = torch.randn(size, size).to(dtype)
        b = torch.randn(size, size).to(dtype)
        a @ b  # warm-up: the first call may pick kernels
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            a @ b
            times.append(time.perf_counter() - start)
        return min(times)

    return best(torch.float32) / max(best(torch.bfloat16), 1e-9)


def _cuda_bf16() -> bool:
    import torch

    return bool(torch.cuda.is_available() and torch.cuda.is_bf16_supported())


def resolve_dtype(
    requested: str = "auto",
    *,
    device: str = "cpu",
    purpose: Purpose = "inference",
    native_bf16: Callable[[], bool] | None = None,
    speedup: Callable[[], float] | None = None,
) -> ResolvedDtype:
    """Resolve `requested` ("auto" or an explicit dtype) for `device` and `purpose`.

    Args:
        requested: one of `DTYPES`.
        device: a torch device string ("cpu", "cuda", "cuda:1").
        purpose: "inference" (scoring, generation) or "training" (weights being trained).
        native_bf16: the CPU capability check; None: `cpu_has_native_bf16` (tests inject their own).
        speedup: the float32/bfloat16 time ratio on this CPU; None: `bf16_speedup` (measured).

    Returns:
        A `ResolvedDtype` with the reason in one line.

    Raises:
        ConfigError: an unknown dtype.
    """
    if requested not in DTYPES:
        raise ConfigError(f"`dtype` must be one of {', '.join(DTYPES)}; got {requested!r}")
    native_bf16 = native_bf16 or cpu_has_native_bf16
    speedup = speedup or bf16_speedup
    on_cuda = str(device).startswith("cuda")
    if requested != "auto":
        if requested == "bfloat16" and not on_cuda and not native_bf16():
            warnings.warn(
                f"bfloat16 on this CPU has no native support (no AVX512-BF16 or AMX): a bfloat16 matrix "
                f"product measured {1 / speedup():.0f}x slower than float32 here; --dtype auto picks float32",
                UserWarning, stacklevel=2,
            )
        return ResolvedDtype(requested, "requested")
    if on_cuda:
        if _cuda_bf16():
            return ResolvedDtype("bfloat16", "auto: CUDA device supports bfloat16")
        return ResolvedDtype("float32", "auto: CUDA device without bfloat16 support")
    if purpose == "training":
        return ResolvedDtype("float32", "auto: training on a CPU is float32 (bfloat16 weights round LoRA updates away)")
    if not native_bf16():
        return ResolvedDtype("float32", "auto: this CPU has no native bfloat16 (no AVX512-BF16 or AMX)")
    ratio = speedup()
    if ratio <= 1.0:
        return ResolvedDtype("float32", f"auto: native bfloat16, but a bfloat16 matmul measured {ratio:.2f}x float32's speed")
    return ResolvedDtype("bfloat16", f"auto: native bfloat16 (AVX512-BF16/AMX); a bfloat16 matmul measured {ratio:.1f}x faster")
