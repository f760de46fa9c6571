"""Credit rules against their definitions and a slow reference loop."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crossopd import assign_credit
from crossopd.core.align import align_lengths
from crossopd.core.credit import BUILTIN_RULES

from reference import CHUNK_DEFINITIONS, credit_reference

pytestmark = pytest.mark.core  # the array core: `pytest -m core`

BUILT_IN = tuple(BUILTIN_RULES)
SUM_INVARIANT = tuple(n for n, r in BUILTIN_RULES.items() if r.sums_to_teacher)
NATIVE = tuple(n for n, r in BUILTIN_RULES.items() if r.native_code is not None)


@st.composite
def alignments(draw):
    """Random tokenizations of a random byte string, possibly with a differing teacher (some
    tokens unaligned) and sometimes cut identically on both sides (all chunks 1:1)."""
    total = draw(st.integers(0, 60))
    data = bytes(draw(st.lists(st.integers(97, 100), min_size=total, max_size=total)))

    def cuts():
        c = sorted(set(draw(st.lists(st.integers(1, max(total - 1, 1)), max_size=total))))
        c = [x for x in c if 0 < x < total]
        return np.diff([0, *c, total]).astype(np.int64) if total else np.zeros(0, np.int64)

    s_len = cuts()
    t_len = s_len.copy() if draw(st.booleans()) else cuts()
    t_data = data
    if draw(st.booleans()) and total:
        k = draw(st.integers(0, total - 1))
        t_data = data[:k] + b"Z" + data[k + 1 :]
    a = align_lengths(s_len, t_len, data, t_data)
    s_lp = -np.asarray(
        draw(st.lists(st.floats(0, 8), min_size=s_len.size, max_size=s_len.size)), dtype=np.float64
    )
    t_lp = -np.asarray(
        draw(st.lists(st.floats(0, 8), min_size=t_len.size, max_size=t_len.size)), dtype=np.float64
    )
    return a, s_lp, t_lp


def test_every_built_in_has_a_loop_definition():
    assert set(CHUNK_DEFINITIONS) == set(BUILT_IN)
    assert SUM_INVARIANT == ("proportional", "uniform", "last") and NATIVE == SUM_INVARIANT


@pytest.mark.parametrize("rule", BUILT_IN)
@given(case=alignments())
def test_rules_match_reference(rule, case):
    a, s_lp, t_lp = case
    q = assign_credit(a, t_lp, s_lp, rule=rule)
    ref = credit_reference(a, t_lp, s_lp, rule)
    np.testing.assert_allclose(q, ref, rtol=1e-9, atol=1e-9)
    assert np.array_equal(np.isnan(q), a.student_chunk < 0)  # NaN exactly where unaligned


@pytest.mark.parametrize("rule", SUM_INVARIANT)
@given(case=alignments())
def test_sum_invariant_rules_sum_to_teacher(rule, case):
    a, s_lp, t_lp = case
    q = assign_credit(a, t_lp, s_lp, rule=rule)
    ref = credit_reference(a, t_lp, s_lp, rule)
    for c in range(a.num_chunks):
        l_t = t_lp[a.teacher_chunk == c].sum()
        assert q[a.student_chunk == c].sum() == pytest.approx(l_t, abs=1e-6)
        assert ref[a.student_chunk == c].sum() == pytest.approx(l_t, abs=1e-6)


@pytest.mark.parametrize("rule", BUILT_IN)
def test_one_to_one_chunk_gets_teacher_logprob(rule):
    a = align_lengths(np.array([1, 1, 1]), np.array([1, 1, 1]), b"abc", b"abc")
    q = assign_credit(a, np.array([-0.5, -1.0, -2.0]), np.array([-3.0, -0.1, -4.0]), rule=rule)
    np.testing.assert_allclose(q, [-0.5, -1.0, -2.0])


def test_proportional_falls_back_to_uniform_when_student_is_certain():
    a = align_lengths(np.array([1, 1]), np.array([2]), b"ab", b"ab")
    q = assign_credit(a, np.array([-1.0]), np.array([0.0, 0.0]), rule="proportional")
    np.testing.assert_allclose(q, [-0.5, -0.5])


def test_proportional_keeps_student_surprise_shape():
    a = align_lengths(np.array([1, 1]), np.array([2]), b"ab", b"ab")
    q = assign_credit(a, np.array([-3.0]), np.array([-1.0, -2.0]), rule="proportional")
    np.testing.assert_allclose(q, [-1.0, -2.0])


@pytest.mark.parametrize("rule", BUILT_IN)
@given(case=alignments())
def test_torch_matches_numpy(rule, case):
    a, s_lp, t_lp = case
    q_np = assign_credit(a, t_lp, s_lp, rule=rule)
    q_t = assign_credit(a, torch.from_numpy(t_lp), torch.from_numpy(s_lp), rule=rule)
    assert isinstance(q_t, torch.Tensor) and q_t.dtype == torch.float64
    np.testing.assert_allclose(q_t.numpy(), q_np, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_bad_rule_and_shapes_are_rejected():
    a = align_lengths(np.array([1]), np.array([1]), b"a", b"a")
    with pytest.raises(ValueError, match="unknown credit rule"):
        assign_credit(a, np.zeros(1), np.zeros(1), rule="first")
    with pytest.raises(ValueError, match="student tokens"):
        assign_credit(a, np.zeros(1), np.zeros(2))
    with pytest.raises(ValueError, match="teacher tokens"):
        assign_credit(a, np.zeros(3), np.zeros(1))


@pytest.mark.parametrize("rule", NATIVE)
@given(case=alignments())
def test_native_credit_equals_numpy_path(rule, case):
    a, s_lp, t_lp = case
    fast = assign_credit(a, t_lp, s_lp, rule=rule)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSOPD_NATIVE", "0")
        slow = assign_credit(a, t_lp, s_lp, rule=rule)
    np.testing.assert_allclose(fast, slow, rtol=1e-12, atol=1e-12, equal_nan=True)


def test_fully_aligned_cases_take_the_native_path():
    from crossopd.core.align import native_available

    a = align_lengths(np.array([2, 1]), np.array([1, 2]), b"abc", b"abc")
    assert a.fully_aligned and native_available()
