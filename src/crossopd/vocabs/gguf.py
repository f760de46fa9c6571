"""GGUF tokenizers, converted to ``tokenizer.json`` by transformers once and cached on disk."""

from __future__ import annotations

from pathlib import Path

from crossopd.files import atomic_dir_write, cache_dir, file_digest


def gguf_tokenizer_dir(path: Path) -> Path:
    """The GGUF file's tokenizer converted by transformers, cached on disk (conversion is slow)."""
    from importlib.metadata import version

    key = f"{path.stem}-{file_digest(path)}-tf{version('transformers')}"
    target = cache_dir() / "tokenizers" / key
    if (target / "tokenizer.json").exists():
        return target

    def write(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        tok.save_pretrained(str(tmp))

    return atomic_dir_write(target, write)
