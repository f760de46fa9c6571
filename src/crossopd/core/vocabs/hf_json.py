"""Hugging Face ``tokenizers`` JSON (``tokenizer.json``, fast tokenizers, converted GGUF):
byte-level BPE and SentencePiece-style (``▁``, ``<0xNN>`` byte fallback) vocabularies."""

from __future__ import annotations

import copy
import json
from functools import lru_cache
from pathlib import Path
from typing import Any

from crossopd.core.vocabs.spec import BYTE_TOKEN, UnsupportedTokenizerError, VocabSpec


@lru_cache(maxsize=1)
def _unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's bytes_to_unicode table used by byte-level BPE vocabularies."""
    printable = (
        list(range(ord("!"), ord("~") + 1))
        + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars)}


# Llama 3's split pattern; a sensible default for a bare tiktoken rank file of that family.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def from_tokenizers_json(path: Path, name: str = "") -> VocabSpec:
    doc = json.loads(Path(path).read_text(encoding="utf-8"))
    return from_tokenizers_doc(doc, name=name or str(path))


def from_tokenizers_doc(doc: dict, name: str, vocab_size: int | None = None) -> VocabSpec:
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

    return VocabSpec(
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


def pieces_from_hf(tokenizer_json: dict, vocab_size: int) -> tuple[str, list[bytes | None], bool]:
    """(kind, pieces, dummy_prefix) from a ``tokenizers`` JSON document."""
    model = tokenizer_json.get("model") or {}
    mtype = model.get("type")
    types = _component_types(tokenizer_json)
    if mtype in ("WordPiece", "WordLevel"):
        raise UnsupportedTokenizerError(
            f"{mtype} tokenizers are not supported: their pre-tokenizer drops whitespace (and "
            "WordPiece's '##' pieces plus lowercasing normalisers lose bytes), so ids cannot be "
            "mapped to exact bytes. Use a byte-level BPE, SentencePiece or tiktoken tokenizer."
        )
    if "ByteLevel" in types:
        kind = "byte_level"
    elif "Metaspace" in types or _replaces_space(tokenizer_json) or model.get("byte_fallback"):
        kind = "metaspace"
    else:
        raise UnsupportedTokenizerError(
            f"cannot map a {mtype} tokenizer with components {sorted(types)} to exact bytes: "
            "neither byte-level (ByteLevel) nor SentencePiece-style (Metaspace / '▁')."
        )
    if mtype == "Unigram":
        id_to_tok = {i: p[0] for i, p in enumerate(model["vocab"])}
    else:
        id_to_tok = {i: t for t, i in model["vocab"].items()}
    pieces: list[bytes | None] = [None] * vocab_size
    if kind == "byte_level":
        table = _unicode_to_byte()
        for i, tok in id_to_tok.items():
            if i < vocab_size:
                try:
                    pieces[i] = bytes(table[c] for c in tok)
                except KeyError:  # not a byte-level string: treat as literal text
                    pieces[i] = tok.encode("utf-8")
    else:
        byte_fallback = bool(model.get("byte_fallback"))
        unk = model.get("unk_token")
        for i, tok in id_to_tok.items():
            if i >= vocab_size:
                continue
            m = BYTE_TOKEN.match(tok)
            if m and byte_fallback:
                pieces[i] = bytes([int(m.group(1), 16)])
            elif tok == unk:
                pieces[i] = None
            else:
                pieces[i] = tok.replace("▁", " ").encode("utf-8")
    for added in tokenizer_json.get("added_tokens", []):
        i = added["id"]
        if i < vocab_size:
            pieces[i] = None if added.get("special") else added["content"].encode("utf-8")
    return kind, pieces, _has_dummy_prefix(tokenizer_json)


def _walk(node: Any):
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _component_types(doc: dict) -> set[str]:
    return {
        n["type"]
        for key in ("normalizer", "pre_tokenizer", "decoder")
        for n in _walk(doc.get(key))
        if isinstance(n.get("type"), str)
    }


def _replaces_space(doc: dict) -> bool:
    return any(
        n.get("type") == "Replace" and n.get("content") in ("▁", " ")
        for key in ("normalizer", "decoder")
        for n in _walk(doc.get(key))
    )


def _has_dummy_prefix(doc: dict) -> bool:
    for key in ("normalizer", "pre_tokenizer"):
        for n in _walk(doc.get(key)):
            if n.get("type") == "Prepend":
                return True
            if n.get("type") == "Metaspace" and (
                n.get("prepend_scheme") in ("always", "first") or n.get("add_prefix_space")
            ):
                return True
    return False


def in_context_encoder_json(doc: dict) -> dict:
    """A copy of a ``tokenizers`` JSON that encodes text exactly as it reads mid-context.

    Drops the dummy-prefix space (``Prepend`` normaliser, Metaspace prepend scheme, ByteLevel
    ``add_prefix_space``) and the post-processor (BOS/EOS insertion).
    """
    # Only the small components change; the (huge) model section is shared, not copied.
    doc = {**doc, **{k: copy.deepcopy(doc.get(k)) for k in ("normalizer", "pre_tokenizer")}}
    for key in ("normalizer", "pre_tokenizer"):
        node = doc.get(key)
        if isinstance(node, dict) and node.get("type") == "Prepend":
            doc[key] = None
            continue
        for n in _walk(node):
            if isinstance(n.get("normalizers"), list):
                n["normalizers"] = [m for m in n["normalizers"] if m.get("type") != "Prepend"]
            if n.get("type") == "Metaspace":
                n["prepend_scheme"] = "never"
                if "add_prefix_space" in n:
                    n["add_prefix_space"] = False
            if n.get("type") == "ByteLevel":
                n["add_prefix_space"] = False
    doc["post_processor"] = None
    return doc
