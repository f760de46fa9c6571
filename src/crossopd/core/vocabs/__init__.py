"""Read every tokenizer kind into the exact bytes of each id (the tables behind ``ByteVocab``).

``read_vocab(src)`` turns whatever the user points at (a path, a hub id, a bundled name, a
tokenizer object) into a ``VocabSpec``: one ``bytes`` (or ``None`` for a special token) per id,
plus the tokenizer's own in-context encoder and decoder. ``ByteVocab.from_pretrained`` builds its
lookup tables from that spec.

Kinds:
- ``byte_level``: Hugging Face byte-level BPE (GPT-2, Llama 3 HF, Qwen, SmolLM2 ...)
- ``metaspace``: Hugging Face SentencePiece-style BPE/Unigram (``▁`` for space, ``<0xNN>`` byte
  fallback; Gemma, Llama 2, Mistral HF ...), with or without the dummy prefix
- ``sentencepiece``: a SentencePiece ``.model`` file
- ``tiktoken``: a tiktoken BPE rank file or ``tiktoken.Encoding`` (Llama 3/4, cl100k ...)
- ``tekken``: a Mistral Tekken JSON file
GGUF files load through transformers (``gguf`` package); the converted tokenizer is cached on
disk (``crossopd.models.hub``), because the conversion costs seconds to tens of seconds.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crossopd import bundled
from crossopd.core.vocabs import hf_json, rank_files, sentencepiece_model
from crossopd.core.vocabs.gguf import gguf_tokenizer_dir
from crossopd.core.vocabs.spec import UnsupportedTokenizerError, VocabSpec

__all__ = ["UnsupportedTokenizerError", "VocabSpec", "read_vocab"]


def read_vocab(src: Any) -> VocabSpec:
    if not isinstance(src, (str, Path)):
        return _from_object(src)
    resolved = bundled.resolve_tokenizer(str(src))
    if not isinstance(resolved, (str, Path)):
        return _from_object(resolved, name=str(src))
    path = Path(resolved)
    name = str(src)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return hf_json.from_tokenizers_json(path / "tokenizer.json", name=name)
        return _from_object(auto_tokenizer(str(path)), name=name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            tokenizer_json = gguf_tokenizer_dir(path) / "tokenizer.json"
            return hf_json.from_tokenizers_json(tokenizer_json, name=name)
        if suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            if "vocab" in doc and "config" in doc and "pattern" in doc.get("config", {}):
                return rank_files.from_tekken(doc, name=name)
            if "model" in doc:
                return hf_json.from_tokenizers_json(path, name=name)
            raise UnsupportedTokenizerError(
                f"{path} is JSON but neither a tokenizers 'tokenizer.json' nor a Tekken file"
            )
        head = path.read_bytes()[:64]
        if _looks_like_tiktoken(head):
            return rank_files.from_tiktoken_file(path, name=name)
        return sentencepiece_model.from_sentencepiece_file(path, name=name)
    if "/" in name and not name.startswith((".", "/")):
        return _from_object(auto_tokenizer(name), name=name)  # hub id
    raise FileNotFoundError(
        f"no tokenizer at {name!r}: give a tokenizer directory, a .gguf / .model / .tiktoken / "
        f"Tekken .json file, a hub id, or a bundled name ({', '.join(bundled.BUNDLED)})"
    )


def auto_tokenizer(src: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def _looks_like_tiktoken(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].split()
    return len(first) == 2 and first[1].isdigit() and all(c < 128 for c in first[0])


def _from_object(obj: Any, name: str = "") -> VocabSpec:
    mod = type(obj).__module__
    if mod.startswith("tiktoken"):
        return rank_files.from_tiktoken_encoding(obj, name=name or obj.name)
    if mod.startswith("sentencepiece"):
        return sentencepiece_model.from_sp_proto(obj.serialized_model_proto(), name=name)
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is None and type(obj).__name__ == "Tokenizer" and mod.startswith("tokenizers"):
        backend = obj
    if backend is None:
        vocab_file = getattr(obj, "vocab_file", None)
        if vocab_file and str(vocab_file).endswith(".model"):
            return sentencepiece_model.from_sentencepiece_file(Path(vocab_file), name=name)
        raise UnsupportedTokenizerError(
            f"cannot read exact token bytes from a {type(obj).__name__}: pass a fast (Rust) "
            "Hugging Face tokenizer, a tokenizers.Tokenizer, a tiktoken.Encoding or a "
            "SentencePieceProcessor"
        )
    size = len(obj) if hasattr(obj, "__len__") else 0
    name = name or getattr(obj, "name_or_path", "")
    return hf_json.from_tokenizers_doc(json.loads(backend.to_str()), name=name, vocab_size=size)
