"""`decal.training.memory.return_large_buffers`: freed activation-sized buffers go back to the system (issue #13)."""

from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

SRC = str(Path(__file__).resolve().parents[1] / "src")

# A training step's pattern: transient buffers (activations) interleaved with buffers kept for the
# backward pass. After glibc has freed one 16 MiB mapped buffer it raises its mmap threshold to
# 16 MiB, so the 4 MiB transients come from the heap below the kept buffers and stay resident.
_SCRIPT = """
import os, sys
sys.path.insert(0, {src!r})
def rss_mb():
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
if {fix}:
    from decal.training.memory import return_large_buffers
    assert return_large_buffers()
big = bytearray(16 << 20); del big
kept, transient = [], []
for _ in range(40):
    transient.append(bytearray(4 << 20))
    kept.append(bytearray(300 << 10))
before = rss_mb(); transient.clear()
print(round(before - rss_mb()))
"""


def _released_mb(fix: bool) -> int:
    result = subprocess.run([sys.executable, "-c", _SCRIPT.format(src=SRC, fix=fix)], capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stderr
    return int(result.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc", reason="glibc only")
def test_freed_large_buffers_leave_the_process():
    assert _released_mb(fix=True) >= 150  # the 40 x 4 MiB transients are returned
    assert _released_mb(fix=False) < 50  # glibc's default keeps them: what the fix is for


def test_activation_estimate_is_layers_times_16_hidden_plus_5_mlp(tiny_qwen3):
    from decal.training.memory import activation_bytes_per_token

    # tiny Qwen3: 2 layers, hidden 64, MLP 128, float32
    assert activation_bytes_per_token(tiny_qwen3) == 2 * (16 * 64 + 5 * 128) * 4


def test_auto_checkpointing_switches_the_layers_per_micro_batch(qwen3_tokenizer):
    from conftest import build_tiny_qwen3
    from transformers.modeling_layers import GradientCheckpointingLayer

    from decal.training.memory import AutoCheckpointing, activation_bytes_per_token

    model = build_tiny_qwen3(qwen3_tokenizer)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    auto = AutoCheckpointing(model, budget_bytes=100 * activation_bytes_per_token(model))
    layers = [m for m in model.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert auto.max_tokens == 100 and len(layers) == 2
    assert auto(model, 101) and all(m.gradient_checkpointing for m in layers)
    assert not auto(model, 100) and not any(m.gradient_checkpointing for m in layers)
    assert auto(model, 4 * 2102) and all(m.gradient_checkpointing for m in layers)
