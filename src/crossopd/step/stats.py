"""What a step measures: alignment and signal counts over its rollouts, and time per phase."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np

from crossopd.step.bridge import TeacherRequest

TIMING_PREFIX = "time/"
# what each teacher of a run with several reports as ``teachers/<name>/<stat>``
TEACHER_STATS = ("sequences", "signal_tokens", "coverage", "one_to_one_share", "kl_per_token",
                 "kl_per_byte", "stop_rate", "overflowed_sequences")


@contextmanager
def timed(times: dict[str, float], phase: str) -> Iterator[None]:
    """Adds the wall time of the block to ``times[phase]``."""
    t0 = time.perf_counter()
    try:
        yield
    finally:
        times[phase] = times.get(phase, 0.0) + time.perf_counter() - t0


def add_timings(stats: dict[str, float], times: dict[str, float], tokens: int) -> None:
    """``time/<phase>_s`` and ``time/<phase>_tok_per_s`` (student tokens) for each phase."""
    for k, v in times.items():
        stats[f"{TIMING_PREFIX}{k}_s"] = v
        stats[f"{TIMING_PREFIX}{k}_tok_per_s"] = tokens / v if v > 0 else 0.0


class StepStats:
    """Alignment and signal statistics over the rollouts of one step (or one evaluation).

    Every token that gets no signal is counted under the reason why: unaligned bytes, the
    syntax of a tool call the teacher writes otherwise (format tokens), masked special tokens,
    a sequence that overflowed the teacher's context, the environment's turns of a
    trajectory, or a turn whose tool call did not parse (``unparsed_calls: mask``). ``add``
    takes one scored unit: a single-turn response, or one assistant turn."""

    KEYS = ("sequences", "turns", "tokens", "bytes", "aligned_bytes", "chunks", "one_to_one",
            "unaligned_tokens", "format_tokens", "masked_special", "penalized_special",
            "stop_chunks", "stopped", "overflowed", "signal_tokens", "kl_sum", "env_tokens",
            "unparsed_tool_calls", "masked_unparsed")

    def __init__(self, totals: dict[str, float] | None = None) -> None:
        """``totals``: sums to start from, e.g. the sums of several processes added up."""
        self.totals: dict[str, float] = dict.fromkeys(self.KEYS, 0.0)
        self.totals.update(totals or {})

    def add(self, a: Any, req: TeacherRequest, logps: np.ndarray, q_kl: np.ndarray,
            penalized: int = 0, *, new_sequence: bool = True, reformatted: bool = False,
            masked_unparsed: int = 0) -> None:
        """``q_kl``: targets whose chunk sums are the teacher's (NaN where no teacher signal);
        ``penalized``: special tokens that got a penalty instead of no signal;
        ``new_sequence``: the unit starts a rollout (False for a trajectory's later turns);
        ``reformatted``: the teacher scored its own syntax for the turn's tool call, so its
        unaligned tokens are that call's syntax (format tokens); ``masked_unparsed``: the
        unit's tokens when it is a turn whose tool call did not parse and got no signal."""
        c, counts = self.totals, a.counts
        c["sequences"] += int(new_sequence)
        c["turns"] += 1
        c["tokens"] += len(logps)
        c["bytes"] += counts["student_bytes"]
        c["aligned_bytes"] += counts["aligned_student_bytes"] if not req.overflow else 0
        c["chunks"] += a.num_chunks
        c["one_to_one"] += counts["one_to_one_chunks"]
        c["format_tokens" if reformatted else "unaligned_tokens"] += \
            counts["unaligned_student_tokens"]
        stop = req.student_stop_index is not None and not req.overflow
        c["masked_special"] += counts["special_student_tokens"] - int(stop) - penalized
        c["penalized_special"] += penalized
        c["stop_chunks"] += int(stop)
        c["stopped"] += int(req.student_stop_index is not None)
        c["overflowed"] += int(req.overflow)
        ok = ~np.isnan(q_kl)
        c["signal_tokens"] += int(ok.sum())
        c["kl_sum"] += float((logps[ok] - q_kl[ok]).sum())
        c["masked_unparsed"] += masked_unparsed

    def add_environment(self, env_tokens: int, unparsed_tool_calls: int) -> None:
        """A trajectory's environment tokens (never trained) and its assistant turns that look
        like a tool call but do not parse (scored as written)."""
        self.totals["env_tokens"] += env_tokens
        self.totals["unparsed_tool_calls"] += unparsed_tool_calls

    def merge(self, other: StepStats) -> None:
        for k, v in other.totals.items():
            self.totals[k] += v

    def result(self) -> dict[str, float]:
        c = self.totals
        return {
            "sequences": c["sequences"],
            "kl_per_token": c["kl_sum"] / max(c["signal_tokens"], 1),
            "kl_per_byte": c["kl_sum"] / max(c["aligned_bytes"], 1),
            "coverage": c["aligned_bytes"] / max(c["bytes"], 1),
            "one_to_one_share": c["one_to_one"] / max(c["chunks"], 1),
            "unaligned_tokens": c["unaligned_tokens"],
            "masked_special_tokens": c["masked_special"],
            "penalized_special_tokens": c["penalized_special"],
            "stop_chunks": c["stop_chunks"],
            "stop_rate": c["stopped"] / max(c["turns"], 1),
            "overflowed_sequences": c["overflowed"],
            "response_tokens": c["tokens"],
            "signal_tokens": c["signal_tokens"],
            "assistant_turns": c["turns"],
            "env_tokens": c["env_tokens"],
            "format_tokens": c["format_tokens"],
            "unparsed_tool_calls": c["unparsed_tool_calls"],
            "masked_unparsed_tokens": c["masked_unparsed"],
        }
