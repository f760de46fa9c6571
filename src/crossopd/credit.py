"""Chunk credit assignment: spread each chunk's teacher log-prob over its student tokens.

A credit rule is a function ``rule(student_logps, student_chunk, chunk_teacher_logp) ->
targets`` on numpy float64 arrays (DESIGN section 4): ``student_chunk[i]`` is the chunk index of
student token i (-1 = unaligned), ``chunk_teacher_logp[c]`` is ``L_T`` of chunk c, and the
targets are NaN where ``student_chunk < 0``. Rules are looked up by ``get_rule``, which takes a
built-in name, a name given to ``register_rule``, a ``package.module:function`` import path, a
``CreditRule`` or the function itself.

The built-ins are segment sums over the chunk index, so the cost is a few array passes whatever
the chunk count; they also accept torch tensors (same device, same dtype family out as in). For
chunk c with teacher total ``L_T`` and student total ``L_S``, ``proportional``, ``uniform`` and
``last`` give targets ``q_i`` with ``sum(q_i for i in c) == L_T`` (DESIGN section 1;
``sums_to_teacher``). ``chunk`` breaks that invariant on purpose: chunk-level REINFORCE gives
every student token of the chunk the whole chunk log-ratio as its advantage, ``q_i = log p_i +
(L_T - L_S)`` so ``A_i = L_T - L_S`` before the clamp: the single-sample estimate of the chunk's
reverse-KL term, broadcast instead of shared out.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, TypeVar, overload

import numpy as np

from crossopd._native import dpca, native_available
from crossopd.align import Alignment

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


CreditSpec = str | CreditRule | RuleFn
_F = TypeVar("_F", bound=Callable[..., Any])


@overload
def credit_rule(fn: _F, *, sums_to_teacher: bool = False) -> _F: ...
@overload
def credit_rule(fn: None = None, *, sums_to_teacher: bool = False) -> Callable[[_F], _F]: ...
def credit_rule(fn: _F | None = None, *, sums_to_teacher: bool = False) -> Any:
    """Mark a plain rule function: ``@credit_rule(sums_to_teacher=True)``.

    Sets the attribute ``fn.sums_to_teacher`` (which ``get_rule`` reads for a function given by
    import path or as a callable) and returns the function itself, so it stays a plain function.
    A function without the attribute counts as ``sums_to_teacher=False``.
    """

    def mark(f: _F) -> _F:
        f.sums_to_teacher = bool(sums_to_teacher)  # type: ignore[attr-defined]
        return f

    return mark if fn is None else mark(fn)


# ------------------------------------------------------------------------ the built-in rules


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


def _where(cond: Any, a: Any, b: Any) -> Any:
    if _is_torch(cond):
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
    if _is_torch(student_logps):
        import torch

        out = torch.full_like(student_logps, float("nan"))
    else:
        out = np.full(student_logps.shape, np.nan)
    out[ok] = q_in
    return out


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
    l_s = _segment_sum(s_in, seg, n)[seg]
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
    l_s = _segment_sum(s_in, seg, n)[seg]
    is_last = seg[1:] != seg[:-1]
    if _is_torch(seg):
        import torch

        is_last = torch.cat([is_last, torch.ones(1, dtype=torch.bool, device=seg.device)])
    else:
        is_last = np.append(is_last, True)
    return _scatter(student_logps, ok, _where(is_last, l_t - (l_s - s_in), s_in))


def chunk(student_logps: Any, student_chunk: Any, chunk_teacher_logp: Any) -> Any:
    """Chunk-level REINFORCE: ``q_i = log p_i + (L_T - L_S)``, so ``A_i = L_T - L_S``."""
    ok, seg, s_in = _aligned(student_logps, student_chunk)
    n = len(chunk_teacher_logp)
    l_s = _segment_sum(s_in, seg, n)[seg]
    # l_t - (l_s - s_in) rather than s_in + (l_t - l_s): on a 1:1 chunk l_s - s_in is exactly 0,
    # so the target is the teacher's log-prob bit for bit (standard OPD)
    return _scatter(student_logps, ok, chunk_teacher_logp[seg] - (l_s - s_in))


BUILTIN_RULES: MappingProxyType[str, CreditRule] = MappingProxyType({
    "proportional": CreditRule("proportional", proportional, True, 0),
    "uniform": CreditRule("uniform", uniform, True, 1),
    "last": CreditRule("last", last, True, 2),
    "chunk": CreditRule("chunk", chunk, False, None),
})
# the built-in functions take torch tensors as they are; any other rule sees numpy float64
_TORCH_READY = frozenset(id(r.fn) for r in BUILTIN_RULES.values())
_registry: dict[str, CreditRule] = dict(BUILTIN_RULES)

# Built-in names by kind, kept for the modules that still import them: RULES are the
# sum-invariant ones, ABLATION_RULES the advantage-level ablations.
RULES: tuple[str, ...] = tuple(n for n, r in BUILTIN_RULES.items() if r.sums_to_teacher)
ABLATION_RULES: tuple[str, ...] = tuple(
    n for n, r in BUILTIN_RULES.items() if not r.sums_to_teacher)
ALL_RULES: tuple[str, ...] = RULES + ABLATION_RULES


# ------------------------------------------------------------------------------ the registry


def rule_names() -> tuple[str, ...]:
    """Every name ``get_rule`` knows without an import path: the built-ins, then registered
    rules in registration order."""
    return tuple(_registry)


@overload
def register_rule(name: str, fn: RuleFn, *, sums_to_teacher: bool | None = None,
                  replace: bool = False) -> CreditRule: ...
@overload
def register_rule(name: str, fn: None = None, *, sums_to_teacher: bool | None = None,
                  replace: bool = False) -> Callable[[_F], _F]: ...
def register_rule(
    name: str,
    fn: RuleFn | None = None,
    *,
    sums_to_teacher: bool | None = None,
    replace: bool = False,
) -> Any:
    """Register ``fn`` as credit rule ``name`` (then ``credit_rule: name`` and
    ``assign_credit(..., rule=name)`` find it in this process). Returns the ``CreditRule``;
    without ``fn`` returns a decorator that registers and returns the function.

    ``sums_to_teacher=None`` reads the function's ``sums_to_teacher`` attribute (see
    ``credit_rule``). Built-in names cannot be replaced; another registered name only with
    ``replace=True``.
    """
    if fn is None:
        def decorate(f: _F) -> _F:
            register_rule(name, f, sums_to_teacher=sums_to_teacher, replace=replace)
            return f

        return decorate
    if not isinstance(name, str) or not name or ":" in name:
        raise ValueError(f"credit rule name {name!r}: a non-empty string without ':' (a colon "
                         "marks an import path)")
    if name in BUILTIN_RULES:
        raise ValueError(f"credit rule {name!r} is a built-in and cannot be replaced")
    if sums_to_teacher is None:
        sums_to_teacher = bool(getattr(fn, "sums_to_teacher", False))
    rule = CreditRule(name, fn, sums_to_teacher=bool(sums_to_teacher))
    old = _registry.get(name)
    if old is not None and old != rule and not replace:
        raise ValueError(f"credit rule {name!r} is already registered (pass replace=True)")
    _registry[name] = rule
    return rule


def unregister_rule(name: str) -> None:
    """Forget a rule given to ``register_rule`` (built-ins stay); an unknown name is a no-op."""
    if name in BUILTIN_RULES:
        raise ValueError(f"credit rule {name!r} is a built-in and cannot be removed")
    _registry.pop(name, None)


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text}" if text else type(e).__name__


def _from_callable(fn: RuleFn, name: str) -> CreditRule:
    for r in _registry.values():  # a registered function keeps its declared rule (and C code)
        if r.fn is fn:
            return r
    return CreditRule(name, fn, sums_to_teacher=bool(getattr(fn, "sums_to_teacher", False)))


def _import_rule(spec: str) -> CreditRule:
    module_name, _, attr = spec.partition(":")
    module_name, attr = module_name.strip(), attr.strip()
    if not module_name or not attr:
        raise ValueError(f"credit rule {spec!r} is not an import path "
                         "'package.module:function'")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        missing = e.name or ""
        if missing and (module_name == missing or module_name.startswith(missing + ".")):
            raise ValueError(f"cannot import credit rule {spec!r}: no module named "
                             f"{missing!r}") from None
        raise ValueError(f"cannot import credit rule {spec!r}: importing {module_name!r} "
                         f"raised {_one_line(e)}") from e
    except Exception as e:  # the user's module itself raised while importing
        raise ValueError(f"cannot import credit rule {spec!r}: importing {module_name!r} "
                         f"raised {_one_line(e)}") from e
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            raise ValueError(f"cannot import credit rule {spec!r}: module {module_name!r} has "
                             f"no attribute {attr!r}")
        obj = getattr(obj, part)
    if isinstance(obj, CreditRule):
        return obj
    if not callable(obj):
        raise ValueError(f"credit rule {spec!r} is not a function (got "
                         f"{type(obj).__name__})")
    return _from_callable(obj, spec)


def get_rule(spec: CreditSpec) -> CreditRule:
    """The ``CreditRule`` for a built-in or registered name, a ``package.module:function``
    import path, a ``CreditRule`` or a rule function.

    A function (by path or as a callable) counts as ``sums_to_teacher`` only when it carries the
    attribute ``sums_to_teacher = True`` (``@credit_rule(sums_to_teacher=True)``); it never has
    a native code. Raises ``ValueError`` with a one-line message otherwise.
    """
    if isinstance(spec, CreditRule):
        return spec
    if isinstance(spec, str):
        rule = _registry.get(spec)
        if rule is not None:
            return rule
        if ":" in spec:
            return _import_rule(spec)
        extra = [n for n in _registry if n not in BUILTIN_RULES]
        registered = f"; registered: {', '.join(extra)}" if extra else ""
        raise ValueError(f"unknown credit rule {spec!r}; built-ins: {', '.join(BUILTIN_RULES)}"
                         f"{registered}; or an import path 'package.module:function'")
    if callable(spec):
        name = getattr(spec, "__qualname__", None) or type(spec).__name__
        return _from_callable(spec, f"{getattr(spec, '__module__', '?')}:{name}")
    raise ValueError(f"credit rule must be a name, an import path, a CreditRule or a function, "
                     f"got {type(spec).__name__}")


# --------------------------------------------------------------------------------- the entry


def _to_float64(x: Any) -> np.ndarray:
    if _is_torch(x):
        import torch

        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _read_only(x: np.ndarray) -> np.ndarray:
    view = x.view()
    view.flags.writeable = False  # a user rule must not edit the alignment or the log-probs
    return view


def assign_credit(
    alignment: Alignment,
    teacher_logps: Any,
    student_logps: Any,
    rule: CreditSpec = "proportional",
) -> Any:
    """Per-student-token targets ``q`` under ``rule`` (anything ``get_rule`` takes): for the
    sum-invariant rules, chunk sums equal the teacher's chunk log-prob; for ``rule="chunk"`` the
    advantages ``q_i - log p_i`` equal the chunk's ``L_T - L_S``.

    ``teacher_logps`` has one entry per teacher token and ``student_logps`` one per student token
    (rollout-time log-probs). Returns the same array type as ``student_logps`` with NaN where the
    student token is unaligned. The built-ins run on torch tensors as they are; any other rule
    gets numpy float64 copies and its result goes back to the input's dtype and device.
    """
    r = get_rule(rule)
    torch_mode = _is_torch(student_logps)
    if torch_mode:
        import torch

        s_lp = student_logps
        t_lp = torch.as_tensor(teacher_logps, dtype=s_lp.dtype, device=s_lp.device)
        s_chunk = torch.as_tensor(alignment.student_chunk, device=s_lp.device)
        t_chunk = torch.as_tensor(alignment.teacher_chunk, device=s_lp.device)
    else:
        s_lp = np.asarray(student_logps, dtype=np.float64)
        t_lp = np.asarray(teacher_logps, dtype=np.float64)
        s_chunk, t_chunk = alignment.student_chunk, alignment.teacher_chunk
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
    # only a rule that declares a C code reaches credit_full: the code selects what C computes
    if (r.native_code is not None and alignment.fully_aligned and not torch_mode
            and native_available()):
        out = np.empty(s_lp.shape, dtype=np.float64)
        dpca.credit_full(
            s_chunk,
            t_chunk,
            np.ascontiguousarray(s_lp),
            np.ascontiguousarray(t_lp),
            r.native_code,
            out,
        )
        return out
    if torch_mode and id(r.fn) not in _TORCH_READY:
        q = assign_credit(alignment, _to_float64(t_lp), _to_float64(s_lp), r)
        return torch.as_tensor(q, dtype=s_lp.dtype, device=s_lp.device)
    if alignment.fully_aligned:
        chunk_lt = _segment_sum(t_lp, t_chunk, n)
    else:
        t_ok = t_chunk >= 0
        chunk_lt = _segment_sum(t_lp[t_ok], t_chunk[t_ok], n)
    if id(r.fn) in _TORCH_READY:
        return r.fn(s_lp, s_chunk, chunk_lt)
    # a copy: the caller may edit the targets in place, and a rule may hand back a read-only view
    q = np.array(r.fn(_read_only(s_lp), _read_only(s_chunk), _read_only(chunk_lt)),
                 dtype=np.float64)
    if q.shape != s_lp.shape:
        raise ValueError(f"credit rule {r.name!r} returned shape {q.shape}, expected "
                         f"{s_lp.shape} (one target per student token)")
    if not alignment.fully_aligned:  # unaligned tokens carry no signal whatever the rule says
        q = np.where(s_chunk >= 0, q, np.nan)
    return q
