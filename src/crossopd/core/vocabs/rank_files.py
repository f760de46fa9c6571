"""tiktoken rank files and encodings (Llama 3/4, cl100k) and Mistral Tekken JSON."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

from crossopd import bundled
from crossopd.core.vocabs.spec import VocabSpec

# Llama 3's split pattern; a sensible default for a bare tiktoken rank file of that family.
LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def from_tiktoken_encoding(enc: Any, name: str = "") -> VocabSpec:
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
    return VocabSpec(
        pieces,
        enc.encode_ordinary,
        enc.decode,
        kind="tiktoken",
        name=name or enc.name,
        backend=enc,
    )


def from_tiktoken_file(path: Path, name: str = "") -> VocabSpec:
    """A tiktoken rank file. The Llama 3 / Llama 4 files of ``llama-models`` use that family's
    own special tokens and split pattern; any other file uses Llama 3's pattern."""
    enc = bundled.llama_tiktoken_encoding(path)
    if enc is None:
        import tiktoken

        ranks = load_tiktoken_ranks(path)
        enc = tiktoken.Encoding(
            name=path.name, pat_str=LLAMA3_PATTERN, mergeable_ranks=ranks, special_tokens={}
        )
    return from_tiktoken_encoding(enc, name=name or str(path))


def from_tekken(doc: dict, name: str = "") -> VocabSpec:
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

    return VocabSpec(pieces, encode, decode, kind="tekken", name=name, backend=enc)


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks
