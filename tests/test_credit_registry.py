"""Credit rules as a registry: user rules by import path, by name and as callables; one-line
errors for bad specs (also from the config); only rules with a C code reach the compiled path."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given
from test_credit import alignments  # the same random alignments as the built-ins' tests

from crossopd import assign_credit
from crossopd import credit as credit_mod
from crossopd.core.align import align_lengths
from crossopd.core.credit import (
    BUILTIN_RULES,
    CreditRule,
    credit_rule,
    get_rule,
    register_rule,
    rule_names,
    unregister_rule,
)
from crossopd.run.config import ConfigError, load_config

pytestmark = pytest.mark.core

HALF = "user_rules:half_and_half"  # tests/user_rules.py; pytest puts tests/ on sys.path
NATIVE = tuple(n for n, r in BUILTIN_RULES.items() if r.native_code is not None)


def two_chunks():
    """One 2:1 chunk ("ab" = one teacher token), then a 1:1 chunk ("c")."""
    a = align_lengths(np.array([1, 1, 1]), np.array([2, 1]), b"abc", b"abc")
    return a, np.array([-1.0, -2.0, -0.5]), np.array([-3.0, -0.25])


def user_rules():
    return importlib.import_module("user_rules")


@pytest.fixture
def registered():
    """Registered names, removed again after the test (the registry is process-wide)."""
    names: list[str] = []
    yield names
    for name in names:
        unregister_rule(name)


def test_built_ins():
    assert tuple(BUILTIN_RULES) == ("proportional", "uniform", "last", "chunk")
    assert [r.native_code for r in BUILTIN_RULES.values()] == [0, 1, 2, None]
    assert [r.sums_to_teacher for r in BUILTIN_RULES.values()] == [True, True, True, False]
    assert rule_names()[:4] == tuple(BUILTIN_RULES)
    for name, rule in BUILTIN_RULES.items():
        assert get_rule(name) is rule and get_rule(rule) is rule
        assert get_rule(rule.fn) is rule  # the bare function keeps its C code


def test_the_rule_module_names_stay_importable_from_credit():
    from crossopd.core import credit_rules

    for name in ("BUILTIN_RULES", "NATIVE_CODES", "PROPORTIONAL_EPS", "CreditRule", "RuleFn",
                 "proportional", "uniform", "last", "chunk"):
        assert getattr(credit_mod, name) is getattr(credit_rules, name), name
    assert set(credit_mod.__all__) <= set(dir(credit_mod))


def test_import_path_rule_gives_its_targets():
    a, s_lp, t_lp = two_chunks()
    rule = get_rule(HALF)
    assert rule.name == HALF and rule.sums_to_teacher and rule.native_code is None
    q = assign_credit(a, t_lp, s_lp, rule=HALF)
    # chunk 0: L_T = -3 shared as 1/2 * (1/2, 1/2) + 1/2 * (1/3, 2/3); chunk 1 gets L_T itself
    np.testing.assert_allclose(q, [-1.25, -1.75, -0.25], rtol=0, atol=1e-12)
    assert q[2] == t_lp[1]  # bit for bit on the 1:1 chunk
    fn = user_rules().half_and_half
    for spec in (fn, rule, CreditRule("mine", fn)):
        np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, rule=spec), q)


@given(case=alignments())
def test_user_rule_on_random_alignments(case):
    a, s_lp, t_lp = case
    q = assign_credit(a, t_lp, s_lp, rule=HALF)
    assert isinstance(q, np.ndarray) and q.dtype == np.float64
    assert np.array_equal(np.isnan(q), a.student_chunk < 0)
    for c in range(a.num_chunks):  # it declares sums_to_teacher: hold it to that
        assert q[a.student_chunk == c].sum() == pytest.approx(t_lp[a.teacher_chunk == c].sum(),
                                                               abs=1e-6)
    q_t = assign_credit(a, torch.from_numpy(t_lp), torch.from_numpy(s_lp), rule=HALF)
    assert isinstance(q_t, torch.Tensor) and q_t.dtype == torch.float64
    np.testing.assert_array_equal(q_t.numpy(), q)
    q32 = assign_credit(a, torch.from_numpy(t_lp).float(), torch.from_numpy(s_lp).float(), HALF)
    assert q32.dtype == torch.float32  # back to the input's dtype


def test_the_documented_rule_runs_as_written():
    text = (Path(__file__).parents[1] / "docs" / "alignment.md").read_text(encoding="utf-8")
    section = text[text.index("## Your own credit rule"):]
    code = re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)
    namespace: dict = {}
    exec(compile(code, "alignment.md", "exec"), namespace)
    documented = get_rule(namespace["half_and_half"])
    assert documented.sums_to_teacher
    a, s_lp, t_lp = two_chunks()
    np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, rule=documented),
                                  assign_credit(a, t_lp, s_lp, rule=HALF))


def test_plain_function_does_not_claim_the_sum():
    a, s_lp, t_lp = two_chunks()
    rule = get_rule("user_rules:plain_teacher_mean")
    assert not rule.sums_to_teacher and rule.native_code is None
    np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, rule=rule), [-3.0, -3.0, -0.25])

    def lam(s, c, lt):
        return s + 0.0

    assert get_rule(lam).sums_to_teacher is False
    assert get_rule(credit_rule(sums_to_teacher=True)(lam)).sums_to_teacher is True


def test_registered_name_works_in_assign_credit_and_config(registered):
    rule = register_rule("test_half", user_rules().half_and_half)
    registered.append("test_half")
    assert rule.sums_to_teacher and "test_half" in rule_names()
    assert get_rule("test_half") is rule
    a, s_lp, t_lp = two_chunks()
    np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, rule="test_half"),
                                  assign_credit(a, t_lp, s_lp, rule=HALF))
    cfg = load_config(None, ["teacher.model=smollm2", "credit_rule=test_half"])
    assert cfg.credit_rule == "test_half"
    register_rule("test_half", user_rules().half_and_half)  # the same rule again: fine

    @register_rule("test_plain", sums_to_teacher=False)
    def plain(s, c, lt):
        return s

    registered.append("test_plain")
    assert get_rule("test_plain").fn is plain and not get_rule("test_plain").sums_to_teacher
    with pytest.raises(ValueError, match="already registered"):
        register_rule("test_half", plain)
    register_rule("test_half", plain, replace=True)
    with pytest.raises(ValueError, match="built-in"):
        register_rule("uniform", plain)
    with pytest.raises(ValueError, match="import path"):
        register_rule("a:b", plain)
    unregister_rule("test_plain")
    with pytest.raises(ValueError, match="unknown credit rule 'test_plain'"):
        get_rule("test_plain")


BAD = [
    ("first", "unknown credit rule 'first'; built-ins: proportional, uniform, last, chunk"),
    ("user_rules.half_and_half", "unknown credit rule"),  # a dot where the colon goes
    ("no_such_rules_module:f", "no module named 'no_such_rules_module'"),
    ("user_rules:no_such_rule", "module 'user_rules' has no attribute 'no_such_rule'"),
    ("user_rules:NOT_A_RULE", "is not a function (got int)"),
    ("user_rules:", "is not an import path 'package.module:function'"),
]


@pytest.mark.parametrize(("spec", "message"), BAD)
def test_bad_specs_give_one_line_errors(spec, message):
    a, s_lp, t_lp = two_chunks()
    with pytest.raises(ValueError, match=re.escape(message)) as err:
        assign_credit(a, t_lp, s_lp, rule=spec)
    assert "\n" not in str(err.value) and spec in str(err.value)
    with pytest.raises(ConfigError, match=re.escape(message)) as err:
        load_config(None, ["teacher.model=smollm2", f"credit_rule={spec}"])
    assert str(err.value).startswith("credit_rule: ") and "\n" not in str(err.value)


def test_a_module_that_fails_to_import_is_named(tmp_path, monkeypatch):
    (tmp_path / "broken_rules.py").write_text("import no_such_dependency_xyz\n")
    (tmp_path / "raising_rules.py").write_text("raise RuntimeError('bad\\nconfig')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ValueError, match="importing 'broken_rules' raised ModuleNotFoundError: "
                                         "No module named 'no_such_dependency_xyz'"):
        get_rule("broken_rules:f")
    with pytest.raises(ConfigError, match="RuntimeError: bad config") as err:
        load_config(None, ["teacher.model=smollm2", "credit_rule=raising_rules:f"])
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match="got int"):
        get_rule(3)  # type: ignore[arg-type]


def test_rule_results_are_checked_and_inputs_read_only():
    a = align_lengths(np.array([1, 1]), np.array([1, 1]), b"ab", b"aZ")  # "b" unaligned
    assert not a.fully_aligned
    s_lp, t_lp = np.array([-1.0, -2.0]), np.array([-0.5, -4.0])

    def everywhere(s, c, lt):
        return np.zeros_like(s)  # also writes where unaligned: assign_credit masks that

    np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, everywhere), [0.0, np.nan])

    def wrong_shape(s, c, lt):
        return np.zeros(5)

    with pytest.raises(ValueError, match="returned shape"):
        assign_credit(a, t_lp, s_lp, wrong_shape)

    def in_place(s, c, lt):
        s[:] = 0.0
        return s

    with pytest.raises(ValueError, match="read-only"):
        assign_credit(a, t_lp, s_lp, in_place)
    assert s_lp.tolist() == [-1.0, -2.0]
    with pytest.raises(ValueError, match="native_code"):
        CreditRule("x", everywhere, native_code=7)
    with pytest.raises(ValueError, match="callable"):
        CreditRule("x", 3)  # type: ignore[arg-type]


class Refuse:
    def credit_full(self, *args):
        raise AssertionError("a rule without a C code reached credit_full")


class Record:
    def __init__(self, real):
        self.real, self.codes = real, []

    def credit_full(self, *args):
        self.codes.append(args[4])
        return self.real.credit_full(*args)


def test_only_rules_with_a_c_code_reach_the_compiled_path(monkeypatch):
    a = align_lengths(np.array([2, 1, 1]), np.array([1, 2, 1]), b"abcd", b"abcd")
    assert a.fully_aligned
    s_lp, t_lp = np.array([-1.0, -2.0, -0.5]), np.array([-0.3, -2.5, -0.2])
    real = credit_mod.dpca
    monkeypatch.setattr(credit_mod, "dpca", Refuse())
    q = assign_credit(a, t_lp, s_lp, rule=HALF)  # chunks "abc" (2:2) and "d" (1:1)
    assert q[:2].sum() == pytest.approx(-2.8) and q[2] == -0.2
    # a built-in function under a CreditRule without a code stays in Python too
    prop = assign_credit(a, t_lp, s_lp, rule=CreditRule("py", BUILTIN_RULES["proportional"].fn,
                                                        sums_to_teacher=True))
    assign_credit(a, t_lp, s_lp, rule="chunk")
    if not credit_mod.native_available():
        pytest.skip("no compiled fast path in this install")
    record = Record(real)
    monkeypatch.setattr(credit_mod, "dpca", record)
    for name in NATIVE:
        assign_credit(a, t_lp, s_lp, rule=name)
    assert record.codes == [BUILTIN_RULES[n].native_code for n in NATIVE]
    np.testing.assert_allclose(assign_credit(a, t_lp, s_lp, "proportional"), prop, rtol=1e-12)
