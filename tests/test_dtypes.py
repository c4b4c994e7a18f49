"""`--dtype auto`: the hardware decides, explicit dtypes win, and runs record what was chosen (issue #13)."""

from __future__ import annotations

import json
import warnings

import pytest

from decal.dtypes import DTYPES, ResolvedDtype, cpu_has_native_bf16, resolve_dtype
from decal.errors import ConfigError


def _never():
    raise AssertionError("must not be consulted")


def test_auto_picks_float32_on_a_cpu_without_native_bfloat16():
    resolved = resolve_dtype("auto", native_bf16=lambda: False, speedup=_never)
    assert resolved.dtype == "float32" and "no native bfloat16" in resolved.reason


def test_auto_picks_bfloat16_where_it_is_native_and_measured_faster():
    resolved = resolve_dtype("auto", native_bf16=lambda: True, speedup=lambda: 3.5)
    assert resolved.dtype == "bfloat16" and "3.5x faster" in resolved.reason


def test_auto_keeps_float32_where_native_bfloat16_measured_slower():
    assert resolve_dtype("auto", native_bf16=lambda: True, speedup=lambda: 0.8).dtype == "float32"


def test_training_on_a_cpu_is_float32_whatever_the_cpu():
    for native in (True, False):
        resolved = resolve_dtype("auto", purpose="training", native_bf16=lambda: native, speedup=lambda: 4.0)
        assert resolved.dtype == "float32" and "LoRA" in resolved.reason


def test_cuda_follows_the_device(monkeypatch):
    import decal.dtypes as dtypes

    monkeypatch.setattr(dtypes, "_cuda_bf16", lambda: True)
    assert resolve_dtype("auto", device="cuda:0", native_bf16=_never, speedup=_never).dtype == "bfloat16"
    assert resolve_dtype("auto", device="cuda", purpose="training", native_bf16=_never).dtype == "bfloat16"
    monkeypatch.setattr(dtypes, "_cuda_bf16", lambda: False)
    assert resolve_dtype("auto", device="cuda", native_bf16=_never).dtype == "float32"


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
def test_an_explicit_dtype_wins(dtype):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert resolve_dtype(dtype, native_bf16=lambda: False, speedup=lambda: 0.01) == ResolvedDtype(dtype, "requested")


def test_explicit_bfloat16_without_native_support_warns_with_the_slowdown():
    with pytest.warns(UserWarning, match=r"no native support .* measured 170x slower than float32"):
        resolve_dtype("bfloat16", native_bf16=lambda: False, speedup=lambda: 1 / 170)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # native: no warning
        resolve_dtype("bfloat16", native_bf16=lambda: True, speedup=_never)


def test_an_unknown_dtype_is_a_config_error():
    with pytest.raises(ConfigError, match="`dtype` must be one of auto, float32"):
        resolve_dtype("fp8")
    assert DTYPES[0] == "auto"


def test_this_machines_auto_choice_agrees_with_its_capability():
    # Whatever the CI machine is: without native bfloat16, auto must never choose it.
    resolved = resolve_dtype("auto")
    if not cpu_has_native_bf16():
        assert resolved.dtype == "float32"
    assert resolved.dtype in ("float32", "bfloat16")


def test_the_cli_default_is_auto_and_run_json_records_the_choice(tiny_qwen3_dir, tmp_path, capsys, monkeypatch):
    import decal.dtypes as dtypes
    from decal.cli import main

    monkeypatch.setattr(dtypes, "cpu_has_native_bf16", lambda: False)  # an AVX2-only CPU
    code = main(["evaluate", "--model", str(tiny_qwen3_dir), "--task", "builtin:n=20", "--split", "test",
                 "--out", str(tmp_path), "--name", "run", "--no-progress", "--limit", "4"])
    assert code == 0, capsys.readouterr().err
    meta = json.loads((tmp_path / "run" / "run.json").read_text())
    assert meta["dtype"] == "float32" and meta["dtype_reason"].startswith("auto: this CPU has no native bfloat16")
