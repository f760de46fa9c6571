"""The built-in credit rules and the ``CreditRule`` record; ``crossopd.core.credit`` holds the
registry.

A credit rule is a function ``rule(student_logps, student_chunk, chunk_teacher_logp) ->
targets`` on numpy float64 arrays: ``student_chunk[i]`` is the chunk index of student token i
(-1 = unaligned), ``chunk_teacher_logp[c]`` is ``L_T`` of chunk c, and the targets are NaN where
``student_chunk < 0``.

The built-ins are segment sums over the chunk index, so the cost is a few array passes whatever
the chunk count; they also accept torch tensors (same device, same dtype family out as in). For
chunk c with teacher total ``L_T`` and student total ``L_S``, ``proportional``, ``uniform`` and
``last`` give targets ``q_i`` with ``sum(q_i for i in c) == L_T`` (``sums_to_teacher``).
``chunk`` breaks that invariant on purpose: chunk-level REINFORCE gives every student token of
the chunk the whole chunk log-ratio as its advantage, ``q_i = log p_i + (L_T - L_S)`` so
``A_i = L_T - L_S`` before the clamp: the single-sample estimate of the chunk's reverse-KL term,
broadcast instead of shared out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import numpy as np

RuleFn = Callable[[Any, Any, Any], Any]
PROPORTIONAL_EPS = 1e-8
# the rule codes that _dpca.c's credit_full knows; any other code would silently run one of them
NATIVE_CODES = MappingProxyType({0: "proportional", 1: "uniform", 2: "last"})


@dataclass(frozen=True)
class CreditRule:
    """A named credit rule.

    ``sums_to_teacher``: the targets of each chunk add up to its ``L_T`` (the training KL
    statistics rely on that; see docs/alignment.md). ``native_code``: the rule code under which
    ``_dpca.c``'s ``credit_full`` computes the same targets, None for a rule it does not know;
    only a rule with a code ever takes the compiled path.
    """

    name: str
    fn: RuleFn
    sums_to_teacher: bool = False
    native_code: int | None = None

    def __post_init__(self) -> None:
        if not callable(self.fn):
            raise ValueError(f"credit rule {self.name!r}: fn must be callable, got "
                             f"{type(self.fn).__name__}")
        if self.native_code is not None and self.native_code not in NATIVE_CODES:
            raise ValueError(f"credit rule {self.name!r}: native_code {self.native_code!r} is "
                             f"not a code of the compiled path ({dict(NATIVE_CODES)})")

    def __call__(self, student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
        return self.fn(student_logps, student_chunk, chunk_teacher_logp)


# ------------------------------------------------------------------- numpy / torch helpers
# is_torch and segment_sum are public because assign_credit (crossopd.core.credit) uses them too.


def is_torch(x: Any) -> bool:
    """Whether ``x`` is a torch object (checked by module name, so torch is never imported)."""
    return type(x).__module__.startswith("torch")


def segment_sum(values: Any, seg: Any, n: int) -> Any:
    """Per-segment sums of ``values`` (segment ids ``seg`` in ``[0, n)``), numpy or torch."""
    if is_torch(values):
        import torch

        out = torch.zeros(n, dtype=values.dtype, device=values.device)
        return out.index_add_(0, seg, values)
    return np.bincount(seg, weights=values, minlength=n)


def _segment_count(seg: Any, n: int) -> Any:
    if is_torch(seg):
        import torch

        return torch.bincount(seg, minlength=n)
    return np.bincount(seg, minlength=n)


def _where(cond: Any, a: Any, b: Any) -> Any:
    if is_torch(cond):
        import torch

        return torch.where(cond, a, b)
    return np.where(cond, a, b)


def _aligned(student_logps: Any, student_chunk: Any) -> tuple[Any, Any, Any]:
    """(mask to scatter back or None when every token is aligned, chunk index and log-prob of
    each aligned token). Skipping the mask keeps the fully aligned case free of copies."""
    ok = student_chunk >= 0
    if bool(ok.all()):
        return None, student_chunk, student_logps
    return ok, student_chunk[ok], student_logps[ok]


def _scatter(student_logps: Any, ok: Any, q_in: Any) -> Any:
    if ok is None:
        return q_in
    if is_torch(student_logps):
        import torch

        out = torch.full_like(student_logps, float("nan"))
    else:
        out = np.full(student_logps.shape, np.nan)
    out[ok] = q_in
    return out


# ------------------------------------------------------------------------ the built-in rules


def uniform(student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
    """``q_i = L_T / |I_c|``."""
    ok, seg, _ = _aligned(student_logps, student_chunk)
    n = len(chunk_teacher_logp)
    return _scatter(student_logps, ok, chunk_teacher_logp[seg] / _segment_count(seg, n)[seg])


def proportional(student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
    """``q_i = (L_T / L_S) * log p_i`` (the paper's Eq. 8), uniform when ``|L_S| < 1e-8``."""
    ok, seg, s_in = _aligned(student_logps, student_chunk)
    n = len(chunk_teacher_logp)
    l_t = chunk_teacher_logp[seg]
    l_s = segment_sum(s_in, seg, n)[seg]
    count = _segment_count(seg, n)[seg]
    # a one-token chunk takes L_T itself: (L_T / L_S) * log p may round off it by an ulp
    small = (abs(l_s) < PROPORTIONAL_EPS) | (count == 1)
    ratio = l_t / _where(small, 1.0, l_s)
    return _scatter(student_logps, ok, _where(small, l_t / count, ratio * s_in))


def last(student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
    """The chunk's last student token gets ``L_T - sum(others)``, the others keep ``log p_i``.
    Chunks are contiguous runs of ``student_chunk`` (as ``align`` makes them)."""
    ok, seg, s_in = _aligned(student_logps, student_chunk)
    n = len(chunk_teacher_logp)
    l_t = chunk_teacher_logp[seg]
    l_s = segment_sum(s_in, seg, n)[seg]
    is_last = seg[1:] != seg[:-1]
    if is_torch(seg):
        import torch

        is_last = torch.cat([is_last, torch.ones(1, dtype=torch.bool, device=seg.device)])
    else:
        is_last = np.append(is_last, True)
    return _scatter(student_logps, ok, _where(is_last, l_t - (l_s - s_in), s_in))


def chunk(student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
    """Chunk-level REINFORCE: ``q_i = log p_i + (L_T - L_S)``, so ``A_i = L_T - L_S``."""
    ok, seg, s_in = _aligned(student_logps, student_chunk)
    n = len(chunk_teacher_logp)
    l_s = segment_sum(s_in, seg, n)[seg]
    # l_t - (l_s - s_in) rather than s_in + (l_t - l_s): on a 1:1 chunk l_s - s_in is exactly 0,
    # so the target is the teacher's log-prob bit for bit (standard OPD)
    return _scatter(student_logps, ok, chunk_teacher_logp[seg] - (l_s - s_in))


BUILTIN_RULES: MappingProxyType[str, CreditRule] = MappingProxyType({
    "proportional": CreditRule("proportional", proportional, True, 0),
    "uniform": CreditRule("uniform", uniform, True, 1),
    "last": CreditRule("last", last, True, 2),
    "chunk": CreditRule("chunk", chunk, False, None),
})
