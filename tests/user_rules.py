"""A user's own credit rules, imported by path in tests/test_credit_registry.py (pytest puts
tests/ on sys.path), written as docs/alignment.md shows."""

from __future__ import annotations

import numpy as np

from crossopd.core.credit import credit_rule


@credit_rule(sums_to_teacher=True)
def half_and_half(student_logps, student_chunk, chunk_teacher_logp):
    """Half of each chunk's L_T shared equally, half in proportion to the student's log-probs
    (all to the equal share where the student's chunk log-prob is 0)."""
    ok = student_chunk >= 0
    seg, s_in = student_chunk[ok], student_logps[ok]
    n = len(chunk_teacher_logp)
    count = np.bincount(seg, minlength=n)[seg]
    l_s = np.bincount(seg, weights=s_in, minlength=n)[seg]
    equal = 1.0 / count
    share = np.where(np.abs(l_s) > 1e-8, s_in / np.where(l_s == 0, 1.0, l_s), equal)
    q = np.full(student_logps.shape, np.nan)
    q[ok] = chunk_teacher_logp[seg] * (0.5 * equal + 0.5 * share)
    return q


def plain_teacher_mean(student_logps, student_chunk, chunk_teacher_logp):
    """Not marked: counts as a rule whose chunk sums are not L_T. Every token gets L_T."""
    q = np.full(student_logps.shape, np.nan)
    ok = student_chunk >= 0
    q[ok] = chunk_teacher_logp[student_chunk[ok]]
    return q


NOT_A_RULE = 3
