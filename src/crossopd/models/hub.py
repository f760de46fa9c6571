"""Tokenizers and models from wherever the user keeps them: a Hugging Face directory or hub id, a
GGUF file (converted once and cached), or a bundled name. Nothing here downloads unless the user
gives a hub id."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from crossopd import bundled
from crossopd.core.vocabs.gguf import gguf_tokenizer_dir
from crossopd.core.vocabs.spec import UnsupportedTokenizerError
from crossopd.files import atomic_dir_write, cache_dir


def load_hf_tokenizer(src: Any) -> Any:
    """A transformers tokenizer (chat template included) for a path, hub id, GGUF file or bundled
    model name. GGUF conversions come from the on-disk cache shared with ``ByteVocab``."""
    from transformers import AutoTokenizer

    if not isinstance(src, (str, Path)):
        return src
    resolved = bundled.resolve_tokenizer(str(src))
    if not isinstance(resolved, (str, Path)):
        raise UnsupportedTokenizerError(
            f"{src} is a tokenizer file without a chat template; use a Hugging Face model"
        )
    path = Path(resolved)
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = gguf_tokenizer_dir(path)
    elif path.is_file():
        raise UnsupportedTokenizerError(
            f"{path} is a bare tokenizer file: chat templates need a Hugging Face tokenizer "
            "directory, hub id or GGUF file"
        )
    return AutoTokenizer.from_pretrained(str(path) if path.exists() else str(src))


def gguf_model_dir(path: Path) -> Path:
    """A complete Hugging Face directory (float32 safetensors, config, tokenizer, chat template)
    for a GGUF file: de-quantised once and cached, so ``AutoModelForCausalLM``, ``vllm serve``
    and TRL's vLLM engine load it like any HF model (de-quantising Gemma 3 270M costs ~30 s;
    loading the cache ~2 s)."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer_dir = gguf_tokenizer_dir(path)
    target = cache_dir() / "hf-models" / tokenizer_dir.name
    if (target / "config.json").exists():
        return target

    def write(tmp: Path) -> None:
        m = AutoModelForCausalLM.from_pretrained(
            str(path.parent), gguf_file=path.name, dtype=torch.float32
        )
        # The weights are de-quantised float32 by now; only the GGUF marker remains.
        m.hf_quantizer = None
        if hasattr(m.config, "quantization_config"):
            del m.config.quantization_config
        m.save_pretrained(str(tmp))
        AutoTokenizer.from_pretrained(str(tokenizer_dir)).save_pretrained(str(tmp))

    return atomic_dir_write(target, write)


def model_source(src: str | Path) -> str:
    """What ``from_pretrained`` loads for a path, hub id, GGUF file or bundled model name: a
    Hugging Face directory (GGUF files through the ``gguf_model_dir`` cache), or the hub id."""
    resolved = bundled.resolve_tokenizer(str(src))
    path = Path(resolved) if isinstance(resolved, (str, Path)) else Path(str(src))
    if path.is_file() and path.suffix.lower() == ".gguf":
        path = gguf_model_dir(path)
    return str(path.resolve()) if path.exists() else str(src)


def load_hf_model(src: Any, dtype: Any = None, device: str | None = None) -> Any:
    """A transformers causal LM for a path, hub id, GGUF file or bundled model name (GGUF files
    through the ``gguf_model_dir`` cache)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not isinstance(src, (str, Path)):
        return src
    model = AutoModelForCausalLM.from_pretrained(model_source(src), dtype=dtype or torch.float32)
    if device:
        model.to(device)
    return model.eval()


def quiet_hf() -> None:
    """No third-party progress bars ("Loading weights", "Writing model shards") and no info
    logs from transformers: the CLI prints its own progress."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def resolve_device(name: str) -> Any:
    """A ``torch.device``; ``auto``: this process's GPU (``LOCAL_RANK`` under torchrun /
    accelerate), else CPU."""
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    return torch.device(name)
