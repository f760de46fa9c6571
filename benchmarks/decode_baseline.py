"""BASELINE: a decode-based chunk aligner following the paper's description.

Two pointers walk the student and teacher ids; the pending span on each side is decoded with the
tokenizer's own ``decode`` after every step and the two strings are compared. Equal strings close
a chunk; otherwise the side whose decoded text is shorter advances (catch-up). Equal-length but
different strings (typically a partial UTF-8 character decoded as U+FFFD on one side) cannot be
matched and are given up as an "unalignable" chunk with no signal. This is what crossopd's byte
view replaces; it is here only to be measured against.
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
    unalignable = 0
    i = j = 0
    i0 = j0 = 0
    while i < len(s) and j < len(t):
        s_text = student_decode(s[i0 : i + 1])
        t_text = teacher_decode(t[j0 : j + 1])
        if s_text == t_text:
            chunks.append((list(range(i0, i + 1)), list(range(j0, j + 1))))
            i, j = i + 1, j + 1
            i0, j0 = i, j
        elif len(s_text) < len(t_text):
            i += 1
        elif len(s_text) > len(t_text):
            j += 1
        else:  # same length, different text: give the pending spans up
            unalignable += i + 1 - i0
            i, j = i + 1, j + 1
            i0, j0 = i, j
    unalignable += len(s) - i0
    return chunks, unalignable
