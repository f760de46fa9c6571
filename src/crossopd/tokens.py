"""ByteVocab: the exact bytes every token id contributes to the text, for every tokenizer kind.

The per-vocabulary tables (flat byte buffer, offsets, lengths, special flags) are built once at
load time, so everything per sequence is array lookups. Token bytes are *in-context* bytes: a
SentencePiece ``▁`` is always a space, even where a decoder would drop the dummy-prefix space at
the start of a sequence.

Supported kinds:
- ``byte_level``: Hugging Face byte-level BPE (GPT-2, Llama 3 HF, Qwen, SmolLM2 ...)
- ``metaspace``: Hugging Face SentencePiece-style BPE/Unigram (``▁`` for space, ``<0xNN>`` byte
  fallback; Gemma, Llama 2, Mistral HF ...), with or without the dummy prefix
- ``sentencepiece``: a SentencePiece ``.model`` file
- ``tiktoken``: a tiktoken BPE rank file or ``tiktoken.Encoding`` (Llama 3/4, cl100k ...)
- ``tekken``: a Mistral Tekken JSON file
GGUF files load through transformers (``gguf`` package) and the converted tokenizer is cached on
disk, because the conversion costs seconds to tens of seconds.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["ByteVocab", "UnsupportedTokenizerError", "cache_dir"]


class UnsupportedTokenizerError(ValueError):
    """The tokenizer cannot be mapped to exact bytes per token id."""


_BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")
_SURROGATE_RUNS = re.compile(r"([\udc80-\udcff]+)")


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


def cache_dir() -> Path:
    """Where converted tokenizers live (``$CROSSOPD_CACHE``, default ``~/.cache/crossopd``)."""
    return Path(os.environ.get("CROSSOPD_CACHE", Path.home() / ".cache" / "crossopd"))


@dataclass(frozen=True)
class _Tables:
    flat: np.ndarray  # uint8, every token's bytes back to back
    start: np.ndarray  # int64 [V], offset of each token in ``flat``
    lengths: np.ndarray  # int64 [V]
    special: np.ndarray  # bool [V], no text bytes (control, unknown, unused, special)


def _build_tables(pieces: Sequence[bytes | None]) -> _Tables:
    """``None`` marks a special token (no bytes)."""
    special = np.fromiter((p is None for p in pieces), dtype=bool, count=len(pieces))
    blobs = [b"" if p is None else p for p in pieces]
    lengths = np.fromiter(map(len, blobs), dtype=np.int64, count=len(blobs))
    start = np.zeros(len(blobs), dtype=np.int64)
    np.cumsum(lengths[:-1], out=start[1:])
    flat = np.frombuffer(b"".join(blobs), dtype=np.uint8)
    return _Tables(flat=flat, start=start, lengths=lengths, special=special)


class ByteVocab:
    """Exact id -> bytes view of a tokenizer, plus ``encode_bytes`` for building teacher inputs."""

    def __init__(
        self,
        pieces: Sequence[bytes | None],
        encode_text: Callable[[str], list[int]],
        decode: Callable[[list[int]], str],
        *,
        kind: str,
        name: str = "",
        dummy_prefix: bool = False,
        unk_id: int | None = None,
        backend: Any = None,
    ) -> None:
        self.kind = kind
        self.name = name
        self.dummy_prefix = dummy_prefix
        self.unk_id = unk_id
        self.backend = backend
        self._encode_text = encode_text
        self._decode = decode
        t = _build_tables(pieces)
        self._flat, self._start, self._blob = t.flat, t.start, t.flat.tobytes()
        self.lengths = t.lengths
        # int32 copies: half the memory traffic on the per-sequence gather
        self._start32, self._len32 = t.start.astype(np.int32), t.lengths.astype(np.int32)
        self.special = t.special
        # Byte tokens spell bytes the vocabulary cannot otherwise express (invalid UTF-8).
        self.byte_ids = np.full(256, -1, dtype=np.int64)
        single = np.flatnonzero((self.lengths == 1) & ~self.special)
        values, first = np.unique(self._flat[self._start[single]], return_index=True)
        self.byte_ids[values] = single[first]  # lowest id wins where several spell one byte

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_pretrained(cls, src: Any) -> ByteVocab:
        """Build from a tokenizer object or a path.

        ``src`` may be: a Hugging Face tokenizer object (fast) or ``tokenizers.Tokenizer``; a
        ``tiktoken.Encoding``; a ``sentencepiece.SentencePieceProcessor``; a Hugging Face tokenizer
        directory or hub id; a ``.gguf`` file; a tiktoken rank file (Llama 3/4 ``tokenizer.model``,
        ``*.tiktoken``); a SentencePiece ``.model`` file; a Mistral Tekken ``.json``; or a bundled
        model name (see ``crossopd.models``).
        """
        from crossopd import loaders

        return loaders.load_byte_vocab(src)

    # ------------------------------------------------------------------ per-sequence views
    @property
    def vocab_size(self) -> int:
        return int(self.lengths.size)

    @property
    def fingerprint(self) -> str:
        """Equal for vocabularies with the same bytes and special flags for every id."""
        if not hasattr(self, "_fingerprint"):
            h = hashlib.sha1(self._blob)
            h.update(self.lengths.tobytes())
            h.update(self.special.tobytes())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def check_ids(self, ids: Any, side: str = "token") -> np.ndarray:
        arr = np.asarray(ids, dtype=np.int64).reshape(-1)
        # one reduction: negative ids become huge when read as unsigned
        if arr.size and arr.view(np.uint64).max() >= self.vocab_size:
            bad = arr[(arr < 0) | (arr >= self.vocab_size)][:5].tolist()
            raise ValueError(
                f"{side} ids {bad} are outside the vocabulary of {self.name or self.kind} "
                f"(size {self.vocab_size}); were these ids produced by a different tokenizer?"
            )
        return arr

    def token_bytes(self, ids: Any) -> list[bytes]:
        """Exact bytes per id (``b""`` for special tokens)."""
        arr = self.check_ids(ids)
        starts, lens = self._start[arr].tolist(), self.lengths[arr].tolist()
        return [self._blob[s : s + n] for s, n in zip(starts, lens)]

    def concat_bytes(self, ids: Any) -> bytes:
        """The byte string the ids spell, gathered from the flat table in one vectorised pass."""
        return self.spell(np.asarray(ids, dtype=np.int64))[1]

    def spell(self, ids: np.ndarray) -> tuple[np.ndarray, bytes]:
        """(byte length per id, concatenated bytes) for an int array of valid ids."""
        lens = self._len32[ids]
        arr, kept = ids, lens
        if not lens.all():  # byteless special tokens contribute nothing
            keep = lens > 0
            arr, kept = ids[keep], lens[keep]
        if arr.size == 0:
            return lens, b""
        # Source index of every output byte: +1 inside a token, a jump at each token start.
        starts = self._start32[arr]
        ends = np.cumsum(kept)
        steps = np.ones(int(ends[-1]), dtype=np.int32)
        steps[0] = starts[0]
        jump = starts[1:] - starts[:-1]
        jump -= kept[:-1]
        jump += 1
        steps[ends[:-1]] = jump
        np.cumsum(steps, out=steps)
        return lens, self._flat.take(steps).tobytes()

    def decode(self, ids: Any) -> str:
        """The tokenizer's own decode (used only by diagnostics, tests and the baseline)."""
        return self._decode([int(i) for i in np.asarray(ids).reshape(-1)])

    # ------------------------------------------------------------------ encoding
    def encode_bytes(self, data: bytes) -> list[int]:
        """Ids spelling exactly ``data`` as it would appear mid-context.

        Valid UTF-8 runs get the tokenizer's own canonical tokenization (no dummy-prefix space,
        special-token text kept as text); invalid bytes get byte tokens. Where the tokenizer's
        normaliser changes the text, the changed stretch is re-spelled with byte tokens. Only
        where the vocabulary has no token for a byte does the result differ from ``data``
        (``<unk>`` there, or nothing if there is no ``<unk>``); ``align`` marks that stretch
        unaligned and counts it.
        """
        data = bytes(data)
        try:
            ids = self._encode_text(data.decode("utf-8"))
        except UnicodeDecodeError:
            ids = []
            text = data.decode("utf-8", "surrogateescape")
            for i, part in enumerate(_SURROGATE_RUNS.split(text)):
                if i % 2 == 0:
                    if part:
                        ids.extend(self._encode_text(part))
                else:
                    ids.extend(self._spell_bytes(part.encode("utf-8", "surrogateescape")))
        if self.concat_bytes(ids) != data:
            ids = self._repair(ids, data)
        return ids

    def _spell_bytes(self, data: bytes) -> list[int]:
        """Byte tokens for ``data``; a byte with no token becomes ``<unk>``, or is left out when
        the vocabulary has no ``<unk>`` either (``align`` then counts it as unaligned)."""
        byte_ids = self.byte_ids[np.frombuffer(data, dtype=np.uint8)]
        if self.unk_id is not None:
            byte_ids = np.where(byte_ids < 0, self.unk_id, byte_ids)
        return byte_ids[byte_ids >= 0].tolist()

    def _repair(self, ids: list[int], data: bytes) -> list[int]:
        """Keep the tokens that spell unchanged stretches; byte-spell the normalised ones."""
        from crossopd.align import _equal_blocks

        arr = np.asarray(ids, dtype=np.int64)
        got = self.concat_bytes(arr)
        off = np.concatenate(([0], np.cumsum(self.lengths[arr])))
        out: list[int] = []
        pos = 0  # next byte of ``data`` to spell
        for g0, d0, size in _equal_blocks(got, data).tolist():
            # tokens lying fully inside this equal block of ``got``
            lo = int(np.searchsorted(off, g0, side="left"))
            hi = int(np.searchsorted(off, g0 + size, side="right")) - 1
            if hi <= lo:
                continue
            first = d0 + int(off[lo]) - g0
            out.extend(self._spell_bytes(data[pos:first]))
            out.extend(arr[lo:hi].tolist())
            pos = d0 + int(off[hi]) - g0
        out.extend(self._spell_bytes(data[pos:]))
        return out

    def __repr__(self) -> str:
        return f"ByteVocab(kind={self.kind!r}, name={self.name!r}, vocab_size={self.vocab_size})"


# ---------------------------------------------------------------------- table builders per kind
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
            m = _BYTE_TOKEN.match(tok)
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


def pieces_from_sentencepiece(model_proto: Any) -> tuple[list[bytes | None], int | None]:
    """Pieces from a SentencePiece ModelProto (types: 1 normal, 2 unknown, 3 control,
    4 user-defined, 5 unused, 6 byte)."""
    pieces: list[bytes | None] = []
    unk_id = None
    for i, p in enumerate(model_proto.pieces):
        if p.type == 6:
            m = _BYTE_TOKEN.match(p.piece)
            pieces.append(bytes([int(m.group(1), 16)]) if m else None)
        elif p.type in (2, 3, 5):
            pieces.append(None)
            if p.type == 2:
                unk_id = i
        else:
            pieces.append(p.piece.replace("▁", " ").encode("utf-8"))
    return pieces, unk_id


def load_tiktoken_ranks(path: str | Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    with open(path, "rb") as f:
        for line in f:
            if line.strip():
                tok, rank = line.split()
                ranks[base64.b64decode(tok)] = int(rank)
    return ranks


def file_digest(path: Path) -> str:
    st = path.stat()
    key = f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    return hashlib.sha1(key.encode()).hexdigest()[:16]


def atomic_dir_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory via a temp sibling then rename, so a killed writer leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
