"""Tests for decal.models: sources (folder, alias/GGUF cache, hub id), adapters and safe loading."""

from __future__ import annotations

import json
import socket

import pytest
import torch

import decal.models
from decal.models import ModelNotFoundError, cache_dir, load_model, load_tokenizer, resolve_model


def test_local_folder_loads_in_eval_mode_with_left_padding(tiny_qwen3_dir, tiny_qwen3):
    model, tok = load_model(tiny_qwen3_dir)
    assert not model.training and model.dtype == torch.float32
    assert tok.padding_side == "left" and tok.pad_token_id is not None
    ids = torch.tensor([[1, 2, 3]])
    with torch.inference_mode():
        torch.testing.assert_close(model(input_ids=ids).logits, tiny_qwen3(input_ids=ids).logits)
    bf16, _ = load_model(tiny_qwen3_dir, dtype="bfloat16")
    assert bf16.dtype == torch.bfloat16


def test_load_tokenizer_adds_a_pad_token_when_missing(tmp_path, qwen3_tokenizer):
    qwen3_tokenizer.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "config.json").write_text("{}")
    tok = load_tokenizer(tmp_path)
    assert tok.pad_token_id is not None and tok.padding_side == "left"


def test_unknown_models_and_bad_dtype_are_clear_errors(tmp_path):
    with pytest.raises(ModelNotFoundError, match="unknown model"):
        load_model(str(tmp_path / "missing"))
    with pytest.raises(ModelNotFoundError, match="not found"):
        load_model(str(tmp_path / "missing.gguf"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        load_model(tmp_path / "empty")

    def no_network(*args, **kwargs):
        raise AssertionError("offline load opened a network connection")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(socket.socket, "connect", no_network)
        with pytest.raises(ModelNotFoundError, match="offline"):
            load_model("decal-test-org/no-such-model", offline=True)


def test_bad_dtype(tiny_qwen3_dir):
    from decal.errors import ConfigError

    with pytest.raises(ConfigError, match="dtype"):
        load_model(tiny_qwen3_dir, dtype="float8")


def test_pickled_weights_need_allow_pickle(tmp_path, tiny_qwen3, qwen3_tokenizer):
    tiny_qwen3.config.save_pretrained(tmp_path)
    qwen3_tokenizer.save_pretrained(tmp_path)
    torch.save(tiny_qwen3.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(ModelNotFoundError, match="safetensors|cannot load"):
        load_model(tmp_path)
    model, _ = load_model(tmp_path, allow_pickle=True)
    torch.testing.assert_close(model.lm_head.weight, tiny_qwen3.lm_head.weight)


def test_loader_passes_safe_defaults(monkeypatch, tiny_qwen3_dir):
    from transformers import AutoModelForCausalLM

    seen = {}

    def fake(source, **kwargs):
        seen.update(kwargs)
        raise OSError("stop here")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", fake)
    with pytest.raises(ModelNotFoundError):
        load_model(tiny_qwen3_dir, offline=True)
    assert seen["trust_remote_code"] is False and seen["use_safetensors"] is True and seen["local_files_only"] is True
    seen.clear()
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ModelNotFoundError):
        load_model(tiny_qwen3_dir, trust_remote_code=True, allow_pickle=True)
    assert seen["trust_remote_code"] is True and "use_safetensors" not in seen and seen["local_files_only"] is False


def test_hf_hub_offline_env_means_offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError, match="offline"):
        load_model("decal-test-org/no-such-model")


def _save_lora(model, path, *, safetensors=True):
    from peft import LoraConfig, get_peft_model

    peft_model = get_peft_model(model, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # B starts at zero; make the adapter change the outputs
    peft_model.save_pretrained(path, safe_serialization=safetensors)
    return peft_model


def test_lora_adapter_is_attached(tmp_path, qwen3_tokenizer, tiny_qwen3_dir):
    from conftest import build_tiny_qwen3

    reference = _save_lora(build_tiny_qwen3(qwen3_tokenizer), tmp_path / "adapter").eval()
    model, _ = load_model(tiny_qwen3_dir, adapter=tmp_path / "adapter")
    base, _ = load_model(tiny_qwen3_dir)
    ids = torch.tensor([[5, 6, 7, 8]])
    with torch.inference_mode():
        got, want, plain = model(input_ids=ids).logits, reference(input_ids=ids).logits, base(input_ids=ids).logits
    torch.testing.assert_close(got, want)
    assert not torch.allclose(got, plain)


def test_missing_or_unsafe_adapter_is_refused(tmp_path, tiny_qwen3_dir):
    with pytest.raises(ModelNotFoundError, match="adapter .* not found"):
        load_model(tiny_qwen3_dir, adapter=tmp_path / "nope")
    (tmp_path / "bad").mkdir()
    with pytest.raises(ModelNotFoundError, match="adapter_config.json"):
        load_model(tiny_qwen3_dir, adapter=tmp_path / "bad")
    (tmp_path / "bad" / "adapter_config.json").write_text("{}")
    (tmp_path / "bad" / "adapter_model.bin").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="allow-pickle"):
        load_model(tiny_qwen3_dir, adapter=tmp_path / "bad")


def test_cache_dir_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("DECAL_CACHE_DIR", str(tmp_path))
    assert cache_dir() == tmp_path


def test_smollm2_alias_is_cached_as_safetensors(smollm2):
    model, tok = smollm2
    folder = resolve_model("smollm2-135m-instruct")
    assert (folder and (cache_dir() / "models").as_posix() in folder)
    from pathlib import Path

    assert (Path(folder) / "model.safetensors").is_file() and (Path(folder) / "tokenizer.json").is_file()
    assert not [p for p in Path(folder).parent.iterdir() if p.name.startswith(".")]  # no half-written copies

    def no_conversion(*args):
        raise AssertionError("the GGUF was converted again instead of loading the cached copy")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(decal.models, "_convert_gguf", no_conversion)
        again, _ = load_model("smollm2-135m-instruct")
    assert type(model).__name__ == "LlamaForCausalLM" and tok.convert_ids_to_tokens(tok.encode("Unsafe")) == ["Un", "safe"]
    torch.testing.assert_close(again.lm_head.weight, model.lm_head.weight)


def test_merged_adapter_is_a_plain_model_with_the_same_outputs(tmp_path, qwen3_tokenizer, tiny_qwen3_dir):
    from conftest import build_tiny_qwen3

    _save_lora(build_tiny_qwen3(qwen3_tokenizer), tmp_path / "adapter")
    attached, _ = load_model(tiny_qwen3_dir, adapter=tmp_path / "adapter")
    merged, _ = load_model(tiny_qwen3_dir, adapter=tmp_path / "adapter", merge_adapter=True)
    assert not any("lora_" in n for n, _ in merged.named_parameters()) and not hasattr(merged, "peft_config")
    ids = torch.tensor([[5, 6, 7, 8], [9, 10, 11, 12]])
    # float32 is the point (decal merges only in float32, `merges_adapter_exactly`): each merged weight
    # W + BA is rounded once (u = 6e-8), so a 2-layer width-64 model's logits (|z| < 1) move by a few
    # sqrt(64) * u = 5e-7; 1e-5 is 20x that, and an adapter left out moves them by 1e-1 (B ~ N(0, 0.5)).
    with torch.inference_mode():
        torch.testing.assert_close(merged(input_ids=ids).logits, attached(input_ids=ids).logits, atol=1e-5, rtol=1e-5)


def test_the_head_gets_a_contiguous_input_from_a_logits_to_keep_slice(tmp_path, qwen3_tokenizer, tiny_qwen3_dir):
    """A strided (B, k, H) slice into a frozen head makes PyTorch copy the (V, H) weight per row
    (keep_head_input_contiguous); the hook hands the head a contiguous copy, same values."""
    from conftest import build_tiny_qwen3

    _save_lora(build_tiny_qwen3(qwen3_tokenizer), tmp_path / "adapter")
    for kwargs in ({}, {"adapter": tmp_path / "adapter"}, {"adapter": tmp_path / "adapter", "merge_adapter": True}):
        model, _ = load_model(tiny_qwen3_dir, **kwargs)
        seen = []
        head = model.get_output_embeddings()
        # registered after decal's hook, so it sees what the head will get
        handle = head.register_forward_pre_hook(lambda module, args: seen.append(args[0].is_contiguous()))
        ids = torch.tensor([[5, 6, 7, 8, 9], [9, 10, 11, 12, 13]])
        with torch.inference_mode():
            kept = model(input_ids=ids, logits_to_keep=2).logits
            full = model(input_ids=ids).logits
        handle.remove()
        assert seen == [True, True], kwargs
        # the same float32 products on a contiguous copy: equal up to the matmul's blocking (a few u = 6e-8)
        torch.testing.assert_close(kept, full[:, -2:], atol=1e-6, rtol=1e-5)
