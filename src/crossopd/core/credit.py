"""Chunk credit assignment: spread each chunk's teacher log-prob over its student tokens.

A credit rule is a function ``rule(student_logps, student_chunk, chunk_teacher_logp) ->
targets`` on numpy float64 arrays (the built-ins, ``CreditRule`` and the contract a rule meets
are in ``crossopd.core.credit_rules``; every name there is importable from here too). Rules are
looked up by ``get_rule``, which takes a built-in name, a name given to ``register_rule``, a
``package.module:function`` import path, a ``CreditRule`` or the function itself;
``assign_credit`` applies one to an alignment, on the compiled path when the rule has a native
code.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any, TypeVar, overload

import numpy as np

from crossopd.core._native import dpca, native_available
from crossopd.core.align import Alignment
from crossopd.core.credit_rules import (
    BUILTIN_RULES,
    NATIVE_CODES,
    PROPORTIONAL_EPS,
    CreditRule,
    RuleFn,
    chunk,
    is_torch,
    last,
    proportional,
    segment_sum,
    uniform,
)

__all__ = [
    "BUILTIN_RULES",
    "NATIVE_CODES",
    "PROPORTIONAL_EPS",
    "CreditRule",
    "CreditSpec",
    "RuleFn",
    "assign_credit",
    "chunk",
    "credit_rule",
    "get_rule",
    "last",
    "proportional",
    "register_rule",
    "rule_names",
    "uniform",
    "unregister_rule",
]

CreditSpec = str | CreditRule | RuleFn
_F = TypeVar("_F", bound=Callable[..., Any])

# the built-in functions take torch tensors as they are; any other rule sees numpy float64
_TORCH_READY = frozenset(id(r.fn) for r in BUILTIN_RULES.values())
_registry: dict[str, CreditRule] = dict(BUILTIN_RULES)


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
    if is_torch(x):
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
    torch_mode = is_torch(student_logps)
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
        chunk_lt = segment_sum(t_lp, t_chunk, n)
    else:
        t_ok = t_chunk >= 0
        chunk_lt = segment_sum(t_lp[t_ok], t_chunk[t_ok], n)
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
