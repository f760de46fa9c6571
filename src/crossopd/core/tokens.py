"""ByteVocab: the exact bytes every token id contributes to the text, for every tokenizer kind.

The per-vocabulary tables (flat byte buffer, offsets, lengths, special flags) are built once at
load time, so everything per sequence is array lookups. Token bytes are *in-context* bytes: a
SentencePiece ``▁`` is always a space, even where a decoder would drop the dummy-prefix space at
the start of a sequence.

Every tokenizer kind (byte-level BPE, SentencePiece-style, SentencePiece ``.model``, tiktoken,
Tekken, GGUF) is read into tables by ``crossopd.core.vocabs``; ``ByteVocab.from_pretrained`` is the
one entry point into it.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np

from crossopd.core import vocabs
from crossopd.core.bytediff import equal_blocks
from crossopd.core.vocabs import UnsupportedTokenizerError

__all__ = ["ByteVocab", "NativeTables", "UnsupportedTokenizerError"]

_SURROGATE_RUNS = re.compile(r"([\udc80-\udcff]+)")


@dataclass(frozen=True)
class _Tables:
    flat: np.ndarray  # uint8, every token's bytes back to back
    start: np.ndarray  # int64 [V], offset of each token in ``flat``
    lengths: np.ndarray  # int64 [V]
    special: np.ndarray  # bool [V], no text bytes (control, unknown, unused, special)


class NativeTables(NamedTuple):
    """The per-vocabulary arrays the compiled DPCA reads (contiguous, fixed dtypes)."""

    flat: np.ndarray  # uint8
    start: np.ndarray  # int64 [V]
    lengths: np.ndarray  # int32 [V]


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
        model name (see ``crossopd.bundled``).
        """
        if isinstance(src, ByteVocab):
            return src
        spec = vocabs.read_vocab(src)
        return cls(spec.pieces, spec.encode_text, spec.decode, kind=spec.kind, name=spec.name,
                   dummy_prefix=spec.dummy_prefix, unk_id=spec.unk_id, backend=spec.backend)

    # ------------------------------------------------------------------ per-sequence views
    @property
    def vocab_size(self) -> int:
        return int(self.lengths.size)

    @property
    def native_tables(self) -> NativeTables:
        return NativeTables(self._flat, self._start, self._len32)

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
        arr = np.asarray(ids, dtype=np.int64)
        got = self.concat_bytes(arr)
        off = np.concatenate(([0], np.cumsum(self.lengths[arr])))
        out: list[int] = []
        pos = 0  # next byte of ``data`` to spell
        for g0, d0, size in equal_blocks(got, data).tolist():
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
