"""The vectorised loss against a slow per-token reference, clipping and masking included."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from crossopd.step.loss import LossConfig, advantages, policy_loss

pytestmark = pytest.mark.core  # the array core: `pytest -m core`


def reference_loss(logps, old, targets, mask, cfg: LossConfig):
    total, n = 0.0, 0
    for lp, ol, q, m in zip(logps, old, targets, mask):
        if not m or math.isnan(q):
            continue
        a = max(-cfg.adv_clamp, min(cfg.adv_clamp, q - ol))
        r = math.exp(lp - ol)
        rc = max(1 - cfg.clip_low, min(1 + cfg.clip_high, r))
        term = max(-a * r, -a * rc)
        if a < 0:
            term = min(term, -a * cfg.dual_clip)
        total += term
        n += 1
    return total / max(n, 1)


floats = st.floats(-12, 0, allow_nan=False)


@given(rows=st.lists(st.tuples(floats, floats, st.one_of(floats, st.just(float("nan")),
                                                          st.floats(-40, 5)), st.booleans()),
                     min_size=0, max_size=40),
       cfg=st.sampled_from([LossConfig(), LossConfig(0.1, 0.1, 3.0, 2.0)]))
def test_loss_matches_slow_reference(rows, cfg):
    logps = torch.tensor([r[0] for r in rows], dtype=torch.float64)
    old = torch.tensor([r[1] for r in rows], dtype=torch.float64)
    q = torch.tensor([r[2] for r in rows], dtype=torch.float64)
    mask = torch.tensor([r[3] for r in rows], dtype=torch.bool)
    # a masked token is one without a target
    adv, valid = advantages(torch.where(mask, q, float("nan")), old, cfg.adv_clamp)
    loss, stats = policy_loss(logps, old, adv, valid, cfg)
    ref = reference_loss(logps.tolist(), old.tolist(), q.tolist(), mask.tolist(), cfg)
    assert loss.item() == pytest.approx(ref, rel=1e-9, abs=1e-12)
    assert stats["tokens"] == sum(1 for r in rows if r[3] and not math.isnan(r[2]))


def test_on_policy_gradient_is_reinforce_with_reverse_kl_reward():
    """ratio = 1: d loss / d logp_i = -A_i / N."""
    old = torch.tensor([-1.0, -2.0, -0.5])
    logps = old.clone().requires_grad_(True)
    q = torch.tensor([-0.5, -3.0, float("nan")])
    adv, valid = advantages(q, old)
    loss, _ = policy_loss(logps, old, adv, valid)
    loss.backward()
    torch.testing.assert_close(logps.grad, torch.tensor([-0.5, 1.0, 0.0]) / 2)


def test_dual_clip_bounds_negative_advantage_loss():
    old = torch.tensor([-5.0])
    logps = torch.tensor([0.0])  # ratio e^5 ~ 148
    adv = torch.tensor([-2.0])
    loss, _ = policy_loss(logps, old, adv, torch.tensor([True]), LossConfig(dual_clip=10.0))
    assert loss.item() == pytest.approx(20.0)
