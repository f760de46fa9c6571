"""BASELINE: a decode-based chunk aligner following the paper's description.

Two pointers walk the student and teacher ids; the pending span on each side is decoded with the
tokenizer's own ``decode`` after every step and the two strings are compared. Equal strings
without a replacement character close a chunk; otherwise the side whose decoded text is shorter
advances (catch-up; the student on a tie). Partial UTF-8 decodes to U+FFFD, so the catch-up can
step past a common boundary and produce larger chunks than necessary; whatever is pending when
one side runs out is "unalignable" and gets no signal. This is what crossopd's byte view
replaces; it is here only to be measured against.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

Decode = Callable[[list[int]], str]


def decode_align(
    student_ids: Sequence[int],
    teacher_ids: Sequence[int],
    student_decode: Decode,
    teacher_decode: Decode,
) -> tuple[list[tuple[list[int], list[int]]], int]:
    """Returns (chunks as (student positions, teacher positions), unalignable student tokens)."""
    s, t = list(student_ids), list(teacher_ids)
    chunks: list[tuple[list[int], list[int]]] = []
    i = j = 0
    i0 = j0 = 0
    while i < len(s) and j < len(t):
        s_text = student_decode(s[i0 : i + 1])
        t_text = teacher_decode(t[j0 : j + 1])
        if s_text == t_text and "\ufffd" not in s_text:
            chunks.append((list(range(i0, i + 1)), list(range(j0, j + 1))))
            i, j = i + 1, j + 1
            i0, j0 = i, j
        elif len(s_text) <= len(t_text):
            i += 1
        else:
            j += 1
    return chunks, len(s) - i0
