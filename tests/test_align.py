"""DPCA against brute-force references on real tokenizer pairs."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from crossopd import align
from crossopd.core.align import _chunks_diff, _chunks_equal_bytes, _offsets, align_lengths

from reference import boundaries, brute_force_sync_offsets, check_alignment, chunk_spans
from strategies import texts

pytestmark = pytest.mark.core  # the array core: `pytest -m core`

PAIRS = [
    ("smollm2", "gemma3-270m"),
    ("gemma3-270m", "smollm2"),
    ("llama3", "mistral-v3"),
    ("mistral-v3", "cl100k"),
    ("cl100k", "tekken"),
    ("tekken", "gemma3-270m"),
    ("mistral-v1", "llama3"),
]


def _ids(get_vocab, student, teacher, text):
    sv, tv = get_vocab(student), get_vocab(teacher)
    s_ids = sv.encode_bytes(text.encode("utf-8"))
    t_ids = tv.encode_bytes(sv.concat_bytes(s_ids))
    return sv, tv, s_ids, t_ids


@pytest.mark.parametrize("student,teacher", PAIRS)
@given(text=texts())
def test_same_text_full_coverage_and_brute_force_boundaries(get_vocab, student, teacher, text):
    sv, tv, s_ids, t_ids = _ids(get_vocab, student, teacher, text)
    a = align(s_ids, t_ids, sv, tv)
    check_alignment(a, s_ids, t_ids, sv, tv)
    if tv.concat_bytes(t_ids) != sv.concat_bytes(s_ids):
        # only SmolLM2 lacks tokens for some bytes (0xF1-0xFF, a few control characters)
        assert teacher == "smollm2" and not a.bytes_equal
        return
    assert a.bytes_equal and a.coverage == 1.0
    assert a.unaligned_student_tokens == 0
    spans = chunk_spans(a, sv, s_ids, "student")
    assert spans == chunk_spans(a, tv, t_ids, "teacher")
    chunk_bounds = {0} | {hi for _, hi in spans.values()}
    # every boundary is a token boundary on both sides ...
    assert chunk_bounds <= boundaries(sv, s_ids) & boundaries(tv, t_ids)
    # ... and every offset where both decoded prefixes are clean and equal is a boundary
    assert brute_force_sync_offsets(s_ids, t_ids, sv, tv) <= chunk_bounds


@pytest.mark.parametrize("student,teacher", PAIRS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 40))
def test_random_student_ids_invalid_utf8(get_vocab, student, teacher, seed, n):
    """Ids drawn at random: partial UTF-8 everywhere. Byte-capable teachers spell it all."""
    sv, tv = get_vocab(student), get_vocab(teacher)
    rng = np.random.default_rng(seed)
    s_ids = rng.integers(0, sv.vocab_size, size=n)
    data = sv.concat_bytes(s_ids)
    t_ids = tv.encode_bytes(data)
    a = align(s_ids, t_ids, sv, tv)
    check_alignment(a, s_ids, t_ids, sv, tv)
    if tv.concat_bytes(t_ids) == data:
        assert a.coverage == 1.0
    else:  # only SmolLM2 as teacher lacks some byte tokens
        assert teacher == "smollm2" and 0.0 <= a.coverage <= 1.0
    assert a.counts["special_student_tokens"] == int(sv.special[s_ids].sum())


@pytest.mark.parametrize("student,teacher", PAIRS[:3])
@given(
    text=texts(),
    edits=st.lists(
        st.tuples(
            st.integers(0, 200), st.integers(0, 4), st.sampled_from(["", "X", "ß", " ", "é"])
        ),
        max_size=3,
    ),
)
def test_differing_bytes_align_equal_stretches_only(get_vocab, student, teacher, text, edits):
    """A teacher that saw different bytes: chunks only where bytes agree; the rest unaligned."""
    sv, tv = get_vocab(student), get_vocab(teacher)
    s_ids = sv.encode_bytes(text.encode())
    other = text
    for pos, cut, ins in edits:
        pos = min(pos, len(other))
        other = other[:pos] + ins + other[pos + cut :]
    t_ids = tv.encode_bytes(other.encode())
    a = align(s_ids, t_ids, sv, tv)
    check_alignment(a, s_ids, t_ids, sv, tv)
    stats = a.stats()
    s_bytes = sv.concat_bytes(s_ids)
    assert stats["aligned_student_bytes"] + stats["unaligned_student_bytes"] == len(s_bytes)
    if tv.concat_bytes(t_ids) == s_bytes:
        assert a.coverage == 1.0


@pytest.mark.parametrize("student,teacher", PAIRS)
@given(text=texts())
def test_diff_path_equals_direct_path_on_equal_bytes(get_vocab, student, teacher, text):
    sv, tv, s_ids, t_ids = _ids(get_vocab, student, teacher, text)
    assume(sv.concat_bytes(s_ids) == tv.concat_bytes(t_ids))
    s_len, t_len = sv.lengths[s_ids], tv.lengths[t_ids]
    s_off, t_off = _offsets(s_len), _offsets(t_len)
    total = int(s_off[-1])
    direct = _chunks_equal_bytes(s_off, t_off, s_len, t_len, total)[:3]
    blocks = np.array([[0, 0, total]], dtype=np.int64).reshape(-1, 3)[: 1 if total else 0]
    via_diff = _chunks_diff(s_off, t_off, s_len, t_len, blocks)
    np.testing.assert_array_equal(direct[0], via_diff[0])
    np.testing.assert_array_equal(direct[1], via_diff[1])
    assert direct[2] == via_diff[2]


def test_special_tokens_are_unaligned_and_counted(get_vocab):
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    im_end = sv.backend.token_to_id("<|im_end|>")
    s_ids = [*sv.encode_bytes(b"Hi there"), im_end]
    t_ids = tv.encode_bytes(b"Hi there")
    a = align(s_ids, t_ids, sv, tv)
    assert a.student_chunk[-1] == -1
    assert a.counts["special_student_tokens"] == 1
    assert a.coverage == 1.0 and a.unaligned_student_tokens == 0


def test_known_many_to_many_chunk(get_vocab):
    """SmolLM2 splits CJK into partial-UTF-8 byte tokens; Gemma has whole characters."""
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    s_ids = sv.encode_bytes("你好".encode())
    t_ids = tv.encode_bytes("你好".encode())
    a = align(s_ids, t_ids, sv, tv)
    assert a.coverage == 1.0
    spans = chunk_spans(a, sv, s_ids, "student")
    # no chunk ever ends inside a character
    assert all(hi in (0, 3, 6) for _, hi in spans.values())


def test_empty_inputs():
    a = align_lengths(np.zeros(0, np.int64), np.zeros(0, np.int64), b"", b"")
    assert a.num_chunks == 0 and a.coverage == 1.0
    a = align_lengths(np.array([3]), np.zeros(0, np.int64), b"abc", b"")
    assert a.num_chunks == 0 and a.coverage == 0.0 and a.unaligned_student_tokens == 1


def test_hand_made_example_is_exact():
    # student: "ab" "c" "de"   teacher: "a" "bc" "d" "e"   -> chunks: [ab c | a bc], [de | d e]
    a = align_lengths(np.array([2, 1, 2]), np.array([1, 2, 1, 1]), b"abcde", b"abcde")
    assert a.student_chunk.tolist() == [0, 0, 1]
    assert a.teacher_chunk.tolist() == [0, 0, 1, 1]
    assert a.num_chunks == 2 and a.counts["one_to_one_chunks"] == 0
    # teacher spells "abXde": only the stretch after the difference can align
    b = align_lengths(np.array([2, 1, 2]), np.array([1, 2, 1, 1]), b"abcde", b"abXde")
    assert b.student_chunk.tolist() == [-1, -1, 0]
    assert b.teacher_chunk.tolist() == [-1, -1, 0, 0]
    assert b.coverage == pytest.approx(2 / 5)


def _both_paths(s_ids, t_ids, sv, tv):
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSOPD_NATIVE", "0")
        ref = align(s_ids, t_ids, sv, tv)
    return ref, align(s_ids, t_ids, sv, tv)


def test_native_extension_is_built():
    """`make install` compiles the C fast path; the numpy path stays as reference and fallback."""
    from crossopd.core.align import native_available

    assert native_available()


@pytest.mark.parametrize("student,teacher", PAIRS)
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(0, 60), text=texts())
def test_native_path_equals_numpy_reference(get_vocab, student, teacher, seed, n, text):
    sv, tv = get_vocab(student), get_vocab(teacher)
    rng = np.random.default_rng(seed)
    # random ids (special tokens and partial UTF-8 included) and a real text
    for s_ids in (
        rng.integers(0, sv.vocab_size, size=n),
        np.asarray(sv.encode_bytes(text.encode()), dtype=np.int64),
    ):
        t_ids = tv.encode_bytes(sv.concat_bytes(s_ids))
        if n % 3 == 0 and t_ids:  # sometimes a teacher with different bytes
            t_ids = t_ids[1:]
        ref, fast = _both_paths(s_ids, t_ids, sv, tv)
        np.testing.assert_array_equal(ref.student_chunk, fast.student_chunk)
        np.testing.assert_array_equal(ref.teacher_chunk, fast.teacher_chunk)
        assert ref.num_chunks == fast.num_chunks and ref.bytes_equal == fast.bytes_equal
        assert ref.stats() == fast.stats() and ref.fully_aligned == fast.fully_aligned


def test_native_path_rejects_bad_ids(monkeypatch, get_vocab):
    sv, tv = get_vocab("llama3"), get_vocab("mistral-v3")
    for env in ("0", "1"):
        monkeypatch.setenv("CROSSOPD_NATIVE", env)
        with pytest.raises(ValueError, match="student ids \\[-1\\]"):
            align([5, -1], [5], sv, tv)
        with pytest.raises(ValueError, match="teacher ids"):
            align([5], [tv.vocab_size], sv, tv)
