"""Dual-Pointer Chunk Alignment (DPCA) over byte boundaries.

A chunk is a maximal-by-minimality run of student tokens and teacher tokens that spell the same
bytes and start and end on a byte offset where *both* tokenizations have a token boundary. With
equal byte strings the sync points are the intersection of the two prefix-sum offset sets; the
whole computation is a handful of numpy passes, O(m + k + bytes), no decode calls.

When the two byte strings differ (a lossy teacher normaliser, an ``<unk>``), the equal stretches
found by a byte diff are aligned the same way inside each stretch and everything else is marked
unaligned (chunk index -1).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING

import numpy as np

from crossopd.core._native import dpca, native_available
from crossopd.core.bytediff import equal_blocks

if TYPE_CHECKING:
    from crossopd.core.tokens import ByteVocab

UNALIGNED = -1


@dataclass(frozen=True)
class Alignment:
    """Chunk index per student and per teacher token (-1 = unaligned).

    Chunks are numbered 0..num_chunks-1 in text order; each chunk's tokens are contiguous on
    both sides (byteless special tokens in between are -1). Diagnostics (coverage, 1:1 share,
    unaligned counts) are computed on first use, so the hot path pays only for the indices.
    """

    student_chunk: np.ndarray
    teacher_chunk: np.ndarray
    num_chunks: int
    bytes_equal: bool
    student_lengths: np.ndarray = field(repr=False)
    teacher_lengths: np.ndarray = field(repr=False)
    # every token of both sides is in a chunk (lets credit skip masking)
    fully_aligned: bool = False

    @classmethod
    def unaligned(cls, student_lengths: np.ndarray, teacher_lengths: np.ndarray) -> Alignment:
        """No chunks at all: every token of both sides gets no signal (and is counted)."""
        return cls(
            student_chunk=np.full(student_lengths.size, UNALIGNED, np.int64),
            teacher_chunk=np.full(teacher_lengths.size, UNALIGNED, np.int64),
            num_chunks=0,
            bytes_equal=False,
            student_lengths=student_lengths,
            teacher_lengths=teacher_lengths,
        )

    def extended(
        self,
        student_lengths: np.ndarray,
        teacher_lengths: np.ndarray,
        last_chunk: tuple[int, int] | None = None,
    ) -> Alignment:
        """This alignment as the prefix of longer token sequences (the extra tokens unaligned),
        with ``last_chunk = (student index, teacher start)`` adding one final chunk that pairs
        that student token with every teacher token from ``teacher start`` on (a stop chunk)."""
        s_chunk = np.full(student_lengths.size, UNALIGNED, np.int64)
        s_chunk[: self.student_chunk.size] = self.student_chunk
        t_chunk = np.full(teacher_lengths.size, UNALIGNED, np.int64)
        t_chunk[: self.teacher_chunk.size] = self.teacher_chunk
        n = self.num_chunks
        if last_chunk is not None:
            s_chunk[last_chunk[0]] = n
            t_chunk[last_chunk[1] :] = n
            n += 1
        return Alignment(
            student_chunk=s_chunk,
            teacher_chunk=t_chunk,
            num_chunks=n,
            bytes_equal=self.bytes_equal,
            student_lengths=student_lengths,
            teacher_lengths=teacher_lengths,
        )

    @cached_property
    def counts(self) -> dict[str, int]:
        """Chunk shapes and what is unaligned, in tokens and bytes."""
        s_len, t_len = self.student_lengths, self.teacher_lengths
        s_chunk, t_chunk, n = self.student_chunk, self.teacher_chunk, self.num_chunks
        s_sizes = np.bincount(s_chunk[s_chunk >= 0], minlength=n)
        t_sizes = np.bincount(t_chunk[t_chunk >= 0], minlength=n)
        one_to_one = int(np.count_nonzero((s_sizes == 1) & (t_sizes == 1)))
        s_un = (s_chunk < 0) & (s_len > 0)
        t_un = (t_chunk < 0) & (t_len > 0)
        total = int(s_len.sum())
        unaligned_bytes = int(s_len[s_un].sum())
        return {
            "student_bytes": total,
            "aligned_student_bytes": total - unaligned_bytes,
            "one_to_one_chunks": one_to_one,
            "many_chunks": n - one_to_one,
            "unaligned_student_tokens": int(s_un.sum()),
            "unaligned_teacher_tokens": int(t_un.sum()),
            "unaligned_student_bytes": unaligned_bytes,
            "unaligned_teacher_bytes": int(t_len[t_un].sum()),
            "special_student_tokens": int(np.count_nonzero(s_len == 0)),
            "special_teacher_tokens": int(np.count_nonzero(t_len == 0)),
        }

    @property
    def coverage(self) -> float:
        """Fraction of the student's response bytes that lie inside aligned chunks."""
        c = self.counts
        return 1.0 if c["student_bytes"] == 0 else c["aligned_student_bytes"] / c["student_bytes"]

    @property
    def one_to_one_share(self) -> float:
        return self.counts["one_to_one_chunks"] / self.num_chunks if self.num_chunks else 1.0

    @property
    def student_one_to_one(self) -> np.ndarray:
        """Per student token: whether its chunk is one student token against one teacher token
        (plain per-token OPD there); False for unaligned tokens."""
        s_chunk, t_chunk, n = self.student_chunk, self.teacher_chunk, self.num_chunks
        s_sizes = np.bincount(s_chunk[s_chunk >= 0], minlength=n)
        t_sizes = np.bincount(t_chunk[t_chunk >= 0], minlength=n)
        one = np.append((s_sizes == 1) & (t_sizes == 1), False)  # index -1: unaligned
        return one[s_chunk]

    @property
    def unaligned_student_tokens(self) -> int:
        return self.counts["unaligned_student_tokens"]

    def stats(self) -> dict[str, float | int | bool]:
        """Scalar diagnostics, ready for a metrics line or JSON."""
        return {
            "num_chunks": self.num_chunks,
            "coverage": self.coverage,
            "bytes_equal": self.bytes_equal,
            "student_tokens": int(self.student_chunk.size),
            "teacher_tokens": int(self.teacher_chunk.size),
            "one_to_one_share": self.one_to_one_share,
            **self.counts,
        }


def _offsets(lengths: np.ndarray) -> np.ndarray:
    """Byte offset of every token start, plus the total at the end (length n + 1)."""
    out = np.zeros(lengths.size + 1, dtype=np.int64)
    np.cumsum(lengths, out=out[1:])
    return out


def _chunks_equal_bytes(
    s_off: np.ndarray, t_off: np.ndarray, s_len: np.ndarray, t_len: np.ndarray, total: int
) -> tuple[np.ndarray, np.ndarray, int, bool]:
    """DPCA when both sides spell the same ``total`` bytes.

    A token end is a sync point when the other side also has a token ending there. A token's
    chunk is the number of sync points strictly before its end, i.e. an exclusive cumsum.
    Tokens without bytes (special tokens) have no place in the byte view: -1. The last value
    says whether every token got a chunk.
    """
    s_end, t_end = s_off[1:], t_off[1:]
    on_s = np.zeros(total + 1, dtype=bool)
    on_t = np.zeros(total + 1, dtype=bool)
    on_s[s_end] = True
    on_t[t_end] = True
    s_sync, t_sync = on_t[s_end], on_s[t_end]
    byteless = not (s_len.all() and t_len.all())
    if byteless:  # a byteless token repeats the previous end offset; only real ends count
        s_sync &= s_len > 0
        t_sync &= t_len > 0
    s_chunk = np.cumsum(s_sync)
    s_chunk -= s_sync
    t_chunk = np.cumsum(t_sync)
    t_chunk -= t_sync
    if byteless:
        s_chunk[s_len == 0] = UNALIGNED
        t_chunk[t_len == 0] = UNALIGNED
    return s_chunk, t_chunk, int(np.count_nonzero(s_sync)), not byteless


def _block_keys(
    off: np.ndarray, length: np.ndarray, starts: np.ndarray, sizes: np.ndarray, stride: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Place each token of one side inside the equal block that contains it entirely.

    Returns (inside mask, start key, end key) where key = block * stride + offset-in-block, so
    positions of different blocks never collide even when blocks touch on one side.
    """
    tok_start, tok_end = off[:-1], off[1:]
    blk = np.searchsorted(starts, tok_start, side="right") - 1
    safe = np.maximum(blk, 0)
    inside = (blk >= 0) & (tok_end <= starts[safe] + sizes[safe]) & (length > 0)
    base = safe * stride - starts[safe]
    return inside, base + tok_start, base + tok_end


def _chunks_diff(
    s_off: np.ndarray,
    t_off: np.ndarray,
    s_len: np.ndarray,
    t_len: np.ndarray,
    blocks: np.ndarray,
) -> tuple[np.ndarray, np.ndarray, int]:
    """DPCA restricted to the equal blocks of a byte diff; everything else is unaligned."""
    if blocks.shape[0] == 0:
        return (
            np.full(s_len.size, UNALIGNED, np.int64),
            np.full(t_len.size, UNALIGNED, np.int64),
            0,
        )
    stride = int(max(s_off[-1], t_off[-1])) + 1
    s_in, s_k0, s_k1 = _block_keys(s_off, s_len, blocks[:, 0], blocks[:, 2], stride)
    t_in, t_k0, t_k1 = _block_keys(t_off, t_len, blocks[:, 1], blocks[:, 2], stride)
    s_marks = np.union1d(s_k0[s_in], s_k1[s_in])
    t_marks = np.union1d(t_k0[t_in], t_k1[t_in])
    sync = np.intersect1d(s_marks, t_marks, assume_unique=True)
    # Consecutive sync points in the same block delimit a chunk; a pair straddling two blocks
    # delimits nothing (the bytes between them differ or are not boundaries on both sides).
    valid = np.zeros(sync.size, dtype=bool)
    valid[1:] = (sync[1:] // stride) == (sync[:-1] // stride)
    chunk_id = np.cumsum(valid) - 1
    num_chunks = int(valid.sum())

    def number(inside: np.ndarray, k1: np.ndarray) -> np.ndarray:
        out = np.full(k1.size, UNALIGNED, dtype=np.int64)
        if sync.size == 0:
            return out
        pos = np.searchsorted(sync, k1, side="left")
        pos_c = np.minimum(pos, sync.size - 1)
        ok = inside & (pos < sync.size) & valid[pos_c]
        out[ok] = chunk_id[pos_c[ok]]
        return out

    return number(s_in, s_k1), number(t_in, t_k1), num_chunks


def align_lengths(
    student_lengths: np.ndarray,
    teacher_lengths: np.ndarray,
    student_bytes: bytes,
    teacher_bytes: bytes,
) -> Alignment:
    """DPCA from per-token byte lengths and the two concatenated byte strings."""
    s_len, t_len = np.asarray(student_lengths), np.asarray(teacher_lengths)
    s_off, t_off = _offsets(s_len), _offsets(t_len)
    equal = student_bytes == teacher_bytes
    if equal:
        s_chunk, t_chunk, n, full = _chunks_equal_bytes(
            s_off, t_off, s_len, t_len, len(student_bytes)
        )
    else:
        blocks = equal_blocks(student_bytes, teacher_bytes)
        s_chunk, t_chunk, n = _chunks_diff(s_off, t_off, s_len, t_len, blocks)
        full = False
    return Alignment(
        student_chunk=s_chunk,
        teacher_chunk=t_chunk,
        num_chunks=n,
        bytes_equal=equal,
        student_lengths=s_len,
        teacher_lengths=t_len,
        fully_aligned=full,
    )


def align(
    student_ids: np.ndarray | list[int],
    teacher_ids: np.ndarray | list[int],
    student_vocab: ByteVocab,
    teacher_vocab: ByteVocab,
) -> Alignment:
    """Align a student response with the teacher's tokens for the same bytes.

    ``student_ids`` are the ids exactly as sampled; ``teacher_ids`` are usually
    ``teacher_vocab.encode_bytes(student_vocab.concat_bytes(student_ids))``. Tokens without bytes
    (special tokens) are unaligned and counted in ``special_*_tokens``.
    """
    s_ids = np.ascontiguousarray(student_ids, dtype=np.int64).reshape(-1)
    t_ids = np.ascontiguousarray(teacher_ids, dtype=np.int64).reshape(-1)
    if native_available():
        s_chunk = np.empty(s_ids.size, dtype=np.int64)
        t_chunk = np.empty(t_ids.size, dtype=np.int64)
        sv, tv = student_vocab.native_tables, teacher_vocab.native_tables
        status, n = dpca.align_equal(
            s_ids, t_ids, sv.flat, sv.start, sv.lengths, tv.flat, tv.start, tv.lengths,
            s_chunk, t_chunk,
        )
        if status == 1:
            s_len, t_len = sv.lengths[s_ids], tv.lengths[t_ids]
            return Alignment(
                student_chunk=s_chunk,
                teacher_chunk=t_chunk,
                num_chunks=n,
                bytes_equal=True,
                student_lengths=s_len,
                teacher_lengths=t_len,
                fully_aligned=bool(s_len.all() and t_len.all()),
            )
    s_len, s_bytes = student_vocab.spell(student_vocab.check_ids(s_ids, "student"))
    t_len, t_bytes = teacher_vocab.spell(teacher_vocab.check_ids(t_ids, "teacher"))
    return align_lengths(s_len, t_len, s_bytes, t_bytes)


def align_text(
    data: bytes, student_vocab: ByteVocab, teacher_vocab: ByteVocab
) -> tuple[list[int], list[int], Alignment]:
    """``data`` as the student would spell it (its own canonical tokenization, as if sampled),
    the teacher ids spelling the same bytes, and their alignment."""
    s_ids = student_vocab.encode_bytes(data)
    t_ids = teacher_vocab.encode_bytes(student_vocab.concat_bytes(s_ids))
    return s_ids, t_ids, align(s_ids, t_ids, student_vocab, teacher_vocab)
