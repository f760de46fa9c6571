"""Turn whatever the user points at (a path, a hub id, a tokenizer object) into a ByteVocab."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from crossopd import models
from crossopd.tokens import (
    ByteVocab,
    UnsupportedTokenizerError,
    atomic_dir_write,
    cache_dir,
    file_digest,
    in_context_encoder_json,
    load_tiktoken_ranks,
    pieces_from_hf,
    pieces_from_sentencepiece,
)

# Llama 3's split pattern; a sensible default for a bare tiktoken rank file of that family.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def load_byte_vocab(src: Any) -> ByteVocab:
    if isinstance(src, ByteVocab):
        return src
    if not isinstance(src, (str, Path)):
        return _from_object(src)
    resolved = models.resolve_tokenizer(str(src))
    if not isinstance(resolved, (str, Path)):
        return _from_object(resolved, name=str(src))
    path = Path(resolved)
    name = str(src)
    if path.is_dir():
        if (path / "tokenizer.json").exists():
            return from_tokenizers_json(path / "tokenizer.json", name=name)
        return _from_object(_auto_tokenizer(str(path)), name=name)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".gguf":
            return from_tokenizers_json(gguf_tokenizer_dir(path) / "tokenizer.json", name=name)
        if suffix == ".json":
            doc = json.loads(path.read_text(encoding="utf-8"))
            if "vocab" in doc and "config" in doc and "pattern" in doc.get("config", {}):
                return from_tekken(doc, name=name)
            if "model" in doc:
                return from_tokenizers_json(path, name=name)
            raise UnsupportedTokenizerError(
                f"{path} is JSON but neither a tokenizers 'tokenizer.json' nor a Tekken file"
            )
        head = path.read_bytes()[:64]
        if _looks_like_tiktoken(head):
            return from_tiktoken_file(path, name=name)
        return from_sentencepiece_file(path, name=name)
    if "/" in name and not name.startswith((".", "/")):
        return _from_object(_auto_tokenizer(name), name=name)  # hub id
    raise FileNotFoundError(
        f"no tokenizer at {name!r}: give a tokenizer directory, a .gguf / .model / .tiktoken / "
        f"Tekken .json file, a hub id, or a bundled name ({', '.join(models.BUNDLED)})"
    )


def _looks_like_tiktoken(head: bytes) -> bool:
    first = head.split(b"\n", 1)[0].split()
    return len(first) == 2 and first[1].isdigit() and all(c < 128 for c in first[0])


def _auto_tokenizer(src: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(src)


def _from_object(obj: Any, name: str = "") -> ByteVocab:
    mod = type(obj).__module__
    if mod.startswith("tiktoken"):
        return from_tiktoken_encoding(obj, name=name or obj.name)
    if mod.startswith("sentencepiece"):
        return _from_sp_proto(obj.serialized_model_proto(), name=name)
    backend = getattr(obj, "backend_tokenizer", None)
    if backend is None and type(obj).__name__ == "Tokenizer" and mod.startswith("tokenizers"):
        backend = obj
    if backend is None:
        vocab_file = getattr(obj, "vocab_file", None)
        if vocab_file and str(vocab_file).endswith(".model"):
            return from_sentencepiece_file(Path(vocab_file), name=name)
        raise UnsupportedTokenizerError(
            f"cannot read exact token bytes from a {type(obj).__name__}: pass a fast (Rust) "
            "Hugging Face tokenizer, a tokenizers.Tokenizer, a tiktoken.Encoding or a "
            "SentencePieceProcessor"
        )
    size = len(obj) if hasattr(obj, "__len__") else 0
    name = name or getattr(obj, "name_or_path", "")
    return _from_tokenizers_doc(json.loads(backend.to_str()), name=name, vocab_size=size)


def from_tokenizers_json(path: Path, name: str = "") -> ByteVocab:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return _from_tokenizers_doc(doc, name=name or str(path))


def _from_tokenizers_doc(doc: dict, name: str, vocab_size: int | None = None) -> ByteVocab:
    from tokenizers import Tokenizer

    size = max(
        vocab_size or 0,
        1 + max((a["id"] for a in doc.get("added_tokens", [])), default=-1),
        _model_vocab_size(doc.get("model") or {}),
    )
    kind, pieces, dummy = pieces_from_hf(doc, size)
    enc = Tokenizer.from_str(json.dumps(in_context_encoder_json(doc)))
    # Text in a response that looks like a special token ("<|im_end|>") is text, not a marker.
    enc.encode_special_tokens = True
    unk = doc.get("model", {}).get("unk_token")
    unk_id = enc.token_to_id(unk) if isinstance(unk, str) else None
    full: list[Any] = []  # the unmodified tokenizer, built only if something decodes

    def decode(ids: list[int]) -> str:
        if not full:
            full.append(Tokenizer.from_str(json.dumps(doc)))
        return full[0].decode(ids, skip_special_tokens=False)

    return ByteVocab(
        pieces,
        lambda text: enc.encode(text, add_special_tokens=False).ids,
        decode,
        kind=kind,
        name=name,
        dummy_prefix=dummy,
        unk_id=unk_id,
        backend=enc,
    )


def _model_vocab_size(model: dict) -> int:
    vocab = model.get("vocab") or {}
    if isinstance(vocab, list):
        return len(vocab)
    return 1 + max(vocab.values(), default=-1)


def from_tiktoken_encoding(enc: Any, name: str = "") -> ByteVocab:
    special_ids = set(enc._special_tokens.values())
    pieces: list[bytes | None] = []
    for i in range(enc.n_vocab):
        if i in special_ids:
            pieces.append(None)
            continue
        try:
            pieces.append(enc.decode_single_token_bytes(i))
        except KeyError:  # a hole in the id space (cl100k has unused ids)
            pieces.append(None)
    return ByteVocab(
        pieces,
        enc.encode_ordinary,
        enc.decode,
        kind="tiktoken",
        name=name or enc.name,
        backend=enc,
    )


def from_tiktoken_file(path: Path, name: str = "") -> ByteVocab:
    """A tiktoken rank file. The Llama 3 / Llama 4 files of ``llama-models`` use that family's
    own special tokens and split pattern; any other file uses Llama 3's pattern."""
    enc = models.llama_tiktoken_encoding(path)
    if enc is None:
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
    return from_tiktoken_encoding(enc, name=name or str(path))


def from_tekken(doc: dict, name: str = "") -> ByteVocab:
    """Mistral Tekken: ids below num_special are control tokens; rank r is id r + num_special."""
    import base64

    import tiktoken

    cfg = doc["config"]
    n_special = int(cfg.get("default_num_special_tokens", len(doc.get("special_tokens", []))))
    inner = int(cfg["default_vocab_size"]) - n_special
    ranks = {base64.b64decode(t["token_bytes"]): t["rank"] for t in doc["vocab"][:inner]}
    enc = tiktoken.Encoding(
        name="tekken", pat_str=cfg["pattern"], mergeable_ranks=ranks, special_tokens={}
    )
    by_rank = sorted(ranks.items(), key=lambda kv: kv[1])
    pieces: list[bytes | None] = [None] * n_special + [b for b, _ in by_rank]

    def encode(text: str) -> list[int]:
        return [i + n_special for i in enc.encode_ordinary(text)]

    def decode(ids: list[int]) -> str:
        return enc.decode([i - n_special for i in ids if i >= n_special])

    return ByteVocab(pieces, encode, decode, kind="tekken", name=name, backend=enc)


def from_sentencepiece_file(path: Path, name: str = "") -> ByteVocab:
    return _from_sp_proto(Path(path).read_bytes(), name=name or str(path))


def _from_sp_proto(serialized: bytes, name: str) -> ByteVocab:
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    try:
        proto.ParseFromString(serialized)
    except Exception as e:  # noqa: BLE001 - protobuf raises its own DecodeError family
        raise UnsupportedTokenizerError(
            f"{name}: not a SentencePiece model, tiktoken rank file, GGUF or tokenizer JSON ({e})"
        ) from e
    if not proto.pieces:
        raise UnsupportedTokenizerError(f"{name}: SentencePiece model has no pieces")
    full = spm.SentencePieceProcessor(model_proto=serialized)
    dummy = bool(proto.normalizer_spec.add_dummy_prefix)
    # The in-context encoder: no dummy prefix, whitespace runs kept as they are.
    proto.normalizer_spec.add_dummy_prefix = False
    proto.normalizer_spec.remove_extra_whitespaces = False
    enc = spm.SentencePieceProcessor(model_proto=proto.SerializeToString())
    pieces, unk_id = pieces_from_sentencepiece(proto)
    return ByteVocab(
        pieces,
        enc.encode,
        full.decode,
        kind="sentencepiece",
        name=name,
        dummy_prefix=dummy,
        unk_id=unk_id,
        backend=full,
    )


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


def load_hf_tokenizer(src: Any) -> Any:
    """A transformers tokenizer (chat template included) for a path, hub id, GGUF file or bundled
    model name. GGUF conversions come from the on-disk cache shared with ``ByteVocab``."""
    from transformers import AutoTokenizer

    if not isinstance(src, (str, Path)):
        return src
    resolved = models.resolve_tokenizer(str(src))
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


def load_hf_model(src: Any, dtype: Any = None, device: str | None = None) -> Any:
    """A transformers causal LM for a path, hub id, GGUF file or bundled model name.

    GGUF weights are de-quantised once and cached as safetensors next to the converted
    tokenizer (de-quantising Gemma 3 270M costs ~30 s; loading the cache ~2 s)."""
    import torch
    from transformers import AutoModelForCausalLM

    if not isinstance(src, (str, Path)):
        return src
    dtype = dtype or torch.float32
    resolved = models.resolve_tokenizer(str(src))
    path = Path(resolved) if isinstance(resolved, (str, Path)) else Path(str(src))
    if path.is_file() and path.suffix.lower() == ".gguf":
        target = cache_dir() / "models" / gguf_tokenizer_dir(path).name
        if not (target / "config.json").exists():

            def write(tmp: Path) -> None:
                m = AutoModelForCausalLM.from_pretrained(
                    str(path.parent), gguf_file=path.name, dtype=torch.float32
                )
                # The weights are de-quantised float32 by now; only the GGUF marker remains.
                m.hf_quantizer = None
                if hasattr(m.config, "quantization_config"):
                    del m.config.quantization_config
                m.save_pretrained(str(tmp))

            atomic_dir_write(target, write)
        path = target
    model = AutoModelForCausalLM.from_pretrained(
        str(path) if path.exists() else str(src), dtype=dtype
    )
    if device:
        model.to(device)
    return model.eval()
