"""Chunk credit assignment: spread each chunk's teacher log-prob over its student tokens.

For chunk c with teacher total ``L_T`` and student total ``L_S`` every rule of ``RULES`` returns
one target ``q_i`` per student token with ``sum(q_i for i in c) == L_T`` (DESIGN section 1). All
rules are segment sums over the chunk index, so the cost is a few array passes whatever the chunk
count. Works on numpy arrays and on torch tensors (same device, same dtype family out as in).

``ABLATION_RULES`` are accepted too but break that invariant on purpose: ``chunk`` (chunk-level
REINFORCE) gives every student token of the chunk the whole chunk log-ratio as its advantage,
``q_i = log p_i + (L_T - L_S)`` so ``A_i = L_T - L_S`` before the clamp: the single-sample
estimate of the chunk's reverse-KL term, broadcast instead of shared out.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from crossopd._native import dpca, native_available
from crossopd.align import Alignment

Rule = Literal["proportional", "uniform", "last", "chunk"]
RULES: tuple[str, ...] = ("proportional", "uniform", "last")  # order = native rule code
# advantage-level ablations: chunk sums of q are not L_T, so not among RULES (the C path and
# every sum-invariant check iterate RULES)
ABLATION_RULES: tuple[str, ...] = ("chunk",)
ALL_RULES: tuple[str, ...] = RULES + ABLATION_RULES
PROPORTIONAL_EPS = 1e-8


def _is_torch(x: Any) -> bool:
    return type(x).__module__.startswith("torch")


def _segment_sum(values: Any, seg: Any, n: int) -> Any:
    if _is_torch(values):
        import torch

        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        return out.index_add_(0, seg, values)
    return np.bincount(seg, weights=values, minlength=n)


def _segment_count(seg: Any, n: int) -> Any:
    if _is_torch(seg):
        import torch

        return torch.bincount(seg, minlength=n)
    return np.bincount(seg, minlength=n)


def assign_credit(
    alignment: Alignment,
    teacher_logps: Any,
    student_logps: Any,
    rule: Rule = "proportional",
) -> Any:
    """Per-student-token targets ``q`` whose chunk sums equal the teacher's chunk log-prob
    (``rule="chunk"``: whose advantages ``q_i - log p_i`` equal the chunk's ``L_T - L_S``).

    ``teacher_logps`` has one entry per teacher token and ``student_logps`` one per student token
    (rollout-time log-probs). Returns the same array type as ``student_logps`` with NaN where the
    student token is unaligned.
    """
    if rule not in ALL_RULES:
        raise ValueError(f"unknown credit rule {rule!r}; choose one of {', '.join(ALL_RULES)}")
    torch_mode = _is_torch(student_logps)
    if torch_mode:
        import torch

        s_lp = student_logps
        t_lp = torch.as_tensor(teacher_logps, dtype=s_lp.dtype, device=s_lp.device)
        s_chunk = torch.as_tensor(alignment.student_chunk, device=s_lp.device)
        t_chunk = torch.as_tensor(alignment.teacher_chunk, device=s_lp.device)
        where, nan = torch.where, float("nan")
    else:
        s_lp = np.asarray(student_logps, dtype=np.float64)
        t_lp = np.asarray(teacher_logps, dtype=np.float64)
        s_chunk, t_chunk = alignment.student_chunk, alignment.teacher_chunk
        where, nan = np.where, np.nan
    if s_lp.shape != tuple(s_chunk.shape):
        raise ValueError(
            f"student_logps has shape {tuple(s_lp.shape)} but the alignment has "
            f"{s_chunk.shape[0]} student tokens"
        )
    if t_lp.shape != tuple(t_chunk.shape):
        raise ValueError(
            f"teacher_logps has shape {tuple(t_lp.shape)} but the alignment has "
            f"{t_chunk.shape[0]} teacher tokens"
        )
    n = alignment.num_chunks
    if alignment.fully_aligned and not torch_mode and rule in RULES and native_available():
        out = np.empty(s_lp.shape, dtype=np.float64)
        dpca.credit_full(
            s_chunk,
            t_chunk,
            np.ascontiguousarray(s_lp),
            np.ascontiguousarray(t_lp),
            RULES.index(rule),
            out,
        )
        return out
    if alignment.fully_aligned:  # no masks, no scatter back
        s_seg, t_seg, s_in, t_in = s_chunk, t_chunk, s_lp, t_lp
    else:
        s_ok, t_ok = s_chunk >= 0, t_chunk >= 0
        s_seg, t_seg, s_in, t_in = s_chunk[s_ok], t_chunk[t_ok], s_lp[s_ok], t_lp[t_ok]
    l_t = _segment_sum(t_in, t_seg, n)[s_seg]  # L_T of each student token's chunk
    l_s = _segment_sum(s_in, s_seg, n)[s_seg]
    if rule == "uniform" or rule == "proportional":
        count = _segment_count(s_seg, n)[s_seg]
        uniform = l_t / count
    if rule == "uniform":
        q_in = uniform
    elif rule == "proportional":
        # a one-token chunk takes L_T itself: (L_T / L_S) * log p may round off it by an ulp
        small = (abs(l_s) < PROPORTIONAL_EPS) | (count == 1)
        ratio = l_t / where(small, 1.0, l_s)
        q_in = where(small, uniform, ratio * s_in)
    elif rule == "chunk":
        # l_t - (l_s - s_in) rather than s_in + (l_t - l_s): on a 1:1 chunk l_s - s_in is
        # exactly 0, so the target is the teacher's log-prob bit for bit (standard OPD)
        q_in = l_t - (l_s - s_in)
    else:  # "last": the chunk's last student token absorbs the difference
        is_last = s_seg[1:] != s_seg[:-1]
        if torch_mode:
            is_last = torch.cat([is_last, torch.ones(1, dtype=torch.bool, device=s_lp.device)])
        else:
            is_last = np.append(is_last, True)
        q_in = where(is_last, l_t - (l_s - s_in), s_in)
    if alignment.fully_aligned:
        return q_in
    out = torch.full_like(s_lp, nan) if torch_mode else np.full(s_lp.shape, nan)
    out[s_ok] = q_in
    return out
