"""Teacher scoring backends: one small protocol, several places the teacher can live.

``score(sequences, spans)`` returns, for every sequence ``ids`` with span ``(start, end)``, the
teacher's log-probability of each realised token ``ids[p]`` given ``ids[:p]`` for ``start <= p <
end`` (a float64 array of length ``end - start``).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Protocol

import numpy as np


class TeacherError(RuntimeError):
    """The teacher could not score a request (after retries, for remote teachers)."""


class Teacher(Protocol):
    max_length: int | None

    def score(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]: ...


def check_spans(sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]) -> None:
    if len(sequences) != len(spans):
        raise ValueError(f"{len(sequences)} sequences but {len(spans)} spans")
    for i, (seq, (start, end)) in enumerate(zip(sequences, spans)):
        if not 1 <= start <= end <= len(seq):
            raise ValueError(
                f"sequence {i}: span ({start}, {end}) must satisfy 1 <= start <= end <= "
                f"{len(seq)} (position 0 has no context to be scored from)"
            )


def status_line(message: str) -> None:
    """A ``crossopd: ...`` status line on stderr (waiting for a teacher, say), flushed at once
    so it shows while the wait goes on, and kept off stdout, which may be piped as data."""
    print(f"crossopd: {message}", file=sys.stderr, flush=True)


__all__ = ["Teacher", "TeacherError", "check_spans", "status_line"]
