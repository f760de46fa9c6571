"""The ``chunk`` credit ablation (chunk-level REINFORCE) against its definition: every student
token of a chunk gets the chunk's log-ratio ``L_T - L_S`` as its advantage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given
from test_credit import alignments  # the same random alignments as the other rules' tests

from crossopd import assign_credit
from crossopd.core.align import align_lengths
from crossopd.core.credit import BUILTIN_RULES
from crossopd.run.config import ConfigError, TrainConfig, validate

pytestmark = pytest.mark.core


def chunk_log_ratio(a, t_lp, s_lp) -> np.ndarray:
    """L_T(c) - L_S(c) for each student token's chunk, NaN where unaligned (a plain loop)."""
    out = np.full(s_lp.size, np.nan)
    for i, c in enumerate(a.student_chunk):
        if c >= 0:
            out[i] = t_lp[a.teacher_chunk == c].sum() - s_lp[a.student_chunk == c].sum()
    return out


def test_chunk_is_an_ablation_not_a_sum_invariant_rule():
    assert not BUILTIN_RULES["chunk"].sums_to_teacher
    cfg = TrainConfig(credit_rule="chunk")
    cfg.teacher.model = "teacher-dir"
    validate(cfg)  # accepted by the config validation
    with pytest.raises(ConfigError, match="credit_rule"):
        validate(TrainConfig(credit_rule="chunks"))


@given(case=alignments())
def test_every_token_gets_its_chunks_log_ratio(case):
    a, s_lp, t_lp = case
    q = assign_credit(a, t_lp, s_lp, rule="chunk")
    assert np.array_equal(np.isnan(q), a.student_chunk < 0)  # NaN exactly where unaligned
    np.testing.assert_allclose(q - s_lp, chunk_log_ratio(a, t_lp, s_lp), rtol=0, atol=1e-9)


@given(case=alignments())
def test_one_to_one_chunks_get_the_teacher_logprob_exactly(case):
    a, s_lp, t_lp = case
    s_sizes = np.bincount(a.student_chunk[a.student_chunk >= 0], minlength=a.num_chunks)
    t_sizes = np.bincount(a.teacher_chunk[a.teacher_chunk >= 0], minlength=a.num_chunks)
    one = np.flatnonzero((s_sizes == 1) & (t_sizes == 1))
    s_idx = np.flatnonzero(np.isin(a.student_chunk, one))
    t_idx = np.flatnonzero(np.isin(a.teacher_chunk, one))  # same chunk order on both sides
    q = assign_credit(a, t_lp, s_lp, rule="chunk")
    assert np.array_equal(q[s_idx], t_lp[t_idx])  # bit for bit: standard per-token OPD
    for rule in BUILTIN_RULES:  # every rule gives standard OPD there, bit for bit
        other = assign_credit(a, t_lp, s_lp, rule=rule)
        assert np.array_equal(other[s_idx], t_lp[t_idx]), rule


@given(case=alignments())
def test_torch_matches_numpy_and_native_setting_is_irrelevant(case):
    a, s_lp, t_lp = case
    q_np = assign_credit(a, t_lp, s_lp, rule="chunk")
    q_t = assign_credit(a, torch.from_numpy(t_lp), torch.from_numpy(s_lp), rule="chunk")
    assert isinstance(q_t, torch.Tensor) and q_t.dtype == torch.float64
    np.testing.assert_array_equal(q_t.numpy(), q_np)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CROSSOPD_NATIVE", "0")
        np.testing.assert_array_equal(assign_credit(a, t_lp, s_lp, rule="chunk"), q_np)


def test_worked_example_against_proportional():
    # one 2:1 chunk ("ab" = one teacher token) then a 1:1 chunk ("c")
    a = align_lengths(np.array([1, 1, 1]), np.array([2, 1]), b"abc", b"abc")
    s_lp, t_lp = np.array([-1.0, -2.0, -0.5]), np.array([-1.5, -0.25])
    adv_chunk = assign_credit(a, t_lp, s_lp, rule="chunk") - s_lp
    adv_prop = assign_credit(a, t_lp, s_lp, rule="proportional") - s_lp
    np.testing.assert_allclose(adv_chunk, [1.5, 1.5, 0.25])  # L_T - L_S = -1.5 + 3
    np.testing.assert_allclose(adv_prop, [0.5, 1.0, 0.25])  # the log-ratio shared out
    assert adv_prop[:2].sum() == pytest.approx(adv_chunk[0])
