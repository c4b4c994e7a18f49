"""`benchmarks/gpu_check.py --tiny`: the device check runs on the CPU with the tiny Qwen3, so it cannot rot (issue #13)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_gpu_check_tiny_prints_one_table(qwen3_tokenizer_dir):
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src") + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--tiny", "--tokenizer",
                             str(qwen3_tokenizer_dir)], capture_output=True, text=True, env=env, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    assert lines[0].startswith("decal GPU check: tiny Qwen3 (float32, vocabulary 151,669) on CPU")
    rows = {tuple(re.split(r"\s{2,}", line)[:2]): re.split(r"\s{2,}", line) for line in lines[3:]}
    expected = [("(a) scoring", "bare forward"), ("(a) scoring", "decal"), ("(b) GRPO step", "grpo"),
                ("(b) GRPO step", "cal-grpo"), ("(c) SFT step", "full_logits"), ("(c) SFT step", "decision")]
    assert list(rows) == expected
    for cells in rows.values():
        seconds, peak = float(cells[3]), float(cells[4])
        assert seconds > 0 and peak > 0
    # decal's scores are the bare forward's, and both SFT implementations give the same loss
    gap = float(re.search(r"max \|option prob gap\| (\S+)", rows["(a) scoring", "decal"][-1]).group(1))
    assert gap < 1e-5
    new_loss, old_loss = map(float, re.search(r"losses (\S+) / (\S+)", rows["(c) SFT step", "decision"][-1]).groups())
    assert new_loss == pytest.approx(old_loss, rel=1e-5)
    assert re.search(r"time \d+\.\d\dx, memory \d+\.\d\dx", rows["(b) GRPO step", "cal-grpo"][5])
