"""Slow, obviously-correct references the vectorised code is checked against."""

from __future__ import annotations

import numpy as np

from crossopd import Alignment, ByteVocab


def decoded_bytes(v: ByteVocab, ids) -> bytes | None:
    """UTF-8 of the tokenizer's own decode, or None when it is not clean (U+FFFD shows a partial
    character). SentencePiece's decoder drops one leading dummy-prefix space: put it back."""
    ids = list(ids)
    text = v.decode(ids)
    if "\ufffd" in text:
        return None
    out = text.encode("utf-8")
    if v.dummy_prefix and ids and v.token_bytes(ids[:1])[0].startswith(b" "):
        out = b" " + out
    return out


def boundaries(v: ByteVocab, ids) -> set[int]:
    lens = [len(b) for b in v.token_bytes(ids)]
    return set(np.cumsum([0, *lens]).tolist())


def chunk_spans(a: Alignment, v: ByteVocab, ids, side: str) -> dict[int, tuple[int, int]]:
    """(first byte, end byte) of every chunk on one side, by a plain loop."""
    chunk = a.student_chunk if side == "student" else a.teacher_chunk
    spans: dict[int, tuple[int, int]] = {}
    pos = 0
    for c, b in zip(chunk.tolist(), v.token_bytes(ids)):
        if c >= 0:
            lo, _ = spans.get(c, (pos, pos))
            spans[c] = (lo, pos + len(b))
        pos += len(b)
    return spans


def check_alignment(a: Alignment, s_ids, t_ids, sv: ByteVocab, tv: ByteVocab) -> None:
    """Every chunk spells the same bytes on both sides, chunks are contiguous, in order, and
    minimal (no inner offset is a boundary on both sides)."""
    s_pieces, t_pieces = sv.token_bytes(s_ids), tv.token_bytes(t_ids)
    assert len(a.student_chunk) == len(s_ids) and len(a.teacher_chunk) == len(t_ids)
    for side, chunk, pieces in (
        ("student", a.student_chunk, s_pieces),
        ("teacher", a.teacher_chunk, t_pieces),
    ):
        seen = chunk[chunk >= 0]
        assert (np.diff(seen) >= 0).all(), f"{side} chunks out of order"
        assert set(seen.tolist()) == set(range(a.num_chunks)), f"{side} misses chunks"
        has_bytes = np.array([len(p) > 0 for p in pieces], dtype=bool)
        assert (chunk[~has_bytes] == -1).all(), f"{side} byteless token inside a chunk"
        for c in range(a.num_chunks):  # contiguous, apart from byteless special tokens
            where = np.flatnonzero(chunk[has_bytes] == c)
            assert (np.diff(where) == 1).all(), f"{side} chunk {c} not contiguous"
    for c in range(a.num_chunks):
        sp = [s_pieces[i] for i in np.flatnonzero(a.student_chunk == c)]
        tp = [t_pieces[j] for j in np.flatnonzero(a.teacher_chunk == c)]
        assert b"".join(sp) == b"".join(tp), f"chunk {c}: {sp} vs {tp}"
        s_inner = set(np.cumsum([len(p) for p in sp])[:-1].tolist())
        t_inner = set(np.cumsum([len(p) for p in tp])[:-1].tolist())
        assert not (s_inner & t_inner), f"chunk {c} can be split at {s_inner & t_inner}"
    for i, c in enumerate(a.student_chunk.tolist()):
        if c < 0 and s_pieces[i]:
            assert not a.bytes_equal, "a token with bytes is unaligned although bytes are equal"


def brute_force_sync_offsets(s_ids, t_ids, sv: ByteVocab, tv: ByteVocab) -> set[int]:
    """Byte offsets where a student prefix and a teacher prefix decode cleanly to the same text."""
    s_pref = {}
    for i in range(len(s_ids) + 1):
        d = decoded_bytes(sv, s_ids[:i])
        if d is not None:
            s_pref[d] = len(d)
    out = set()
    for j in range(len(t_ids) + 1):
        d = decoded_bytes(tv, t_ids[:j])
        if d is not None and d in s_pref:
            out.add(len(d))
    return out


def _proportional(l_t: float, s: list[float]) -> list[float]:
    if abs(sum(s)) < 1e-8:
        return _uniform(l_t, s)
    return [l_t / sum(s) * x for x in s]


def _uniform(l_t: float, s: list[float]) -> list[float]:
    return [l_t / len(s)] * len(s)


def _last(l_t: float, s: list[float]) -> list[float]:
    return [*s[:-1], l_t - sum(s[:-1])]


def _chunk(l_t: float, s: list[float]) -> list[float]:
    return [x + (l_t - sum(s)) for x in s]


# one chunk's targets from its L_T and its student log-probs, as DESIGN section 1 writes each
# built-in rule; the tests check that this covers every built-in of the registry
CHUNK_DEFINITIONS = {"proportional": _proportional, "uniform": _uniform, "last": _last,
                     "chunk": _chunk}


def credit_reference(a: Alignment, t_lp, s_lp, rule: str) -> np.ndarray:
    """A credit rule of ``CHUNK_DEFINITIONS``, one chunk at a time."""
    define = CHUNK_DEFINITIONS[rule]
    q = np.full(len(s_lp), np.nan)
    for c in range(a.num_chunks):
        idx = [i for i, x in enumerate(a.student_chunk.tolist()) if x == c]
        jdx = [j for j, x in enumerate(a.teacher_chunk.tolist()) if x == c]
        l_t = sum(t_lp[j] for j in jdx)
        for i, target in zip(idx, define(l_t, [s_lp[i] for i in idx])):
            q[i] = target
    return q
