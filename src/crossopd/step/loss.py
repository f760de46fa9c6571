"""The OPD policy loss: PPO-clip with dual clip over per-token advantages, token-mean.

``A_i = clamp(q_i - log p_i, -adv_clamp, adv_clamp)`` where ``q_i`` is the chunk credit target
and ``log p_i`` the rollout-time log-prob. Tokens without a signal (a NaN target: unaligned,
masked, overflowed) have no advantage and do not count in the token mean. With one update per
rollout ``ratio == 1`` and this is REINFORCE with the per-token reverse-KL reward.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class LossConfig:
    clip_low: float = field(default=0.2, metadata={
        "help": "PPO clip below: ratio >= 1 - clip_low."})
    clip_high: float = field(default=0.28, metadata={
        "help": "PPO clip above: ratio <= 1 + clip_high (clip-higher)."})
    dual_clip: float = field(default=10.0, metadata={
        "help": "Dual clip: the loss of a negative advantage is at most -A * dual_clip."})
    adv_clamp: float = field(default=10.0, metadata={
        "help": "Per-token advantages q - log p are clamped to [-adv_clamp, adv_clamp]."})


def advantages(targets: torch.Tensor, old_logps: torch.Tensor,
               adv_clamp: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(advantage, signal mask), both shaped like ``targets``: zero advantage and no signal where
    the target is NaN."""
    valid = ~torch.isnan(targets)
    adv = torch.where(valid, targets - old_logps, torch.zeros_like(old_logps))
    return adv.clamp(-adv_clamp, adv_clamp), valid


def per_token_loss(logps: torch.Tensor, old_logps: torch.Tensor, adv: torch.Tensor,
                   cfg: LossConfig = LossConfig()) -> tuple[torch.Tensor, torch.Tensor]:
    """(PPO-clip loss with dual clip per token, where the clip was active); any shape,
    elementwise. Engines that aggregate themselves (verl's ``agg_loss``) take this."""
    ratio = torch.exp(logps - old_logps)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - cfg.clip_low, 1.0 + cfg.clip_high)
    per_token = torch.maximum(unclipped, clipped)
    # dual clip: with A < 0 a huge ratio would make the loss unbounded; cap it at -A * c
    per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * cfg.dual_clip), per_token)
    return per_token, clipped > unclipped


def policy_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    adv: torch.Tensor,
    valid: torch.Tensor,
    cfg: LossConfig = LossConfig(),
) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean PPO-clip loss with dual clip for negative advantages; any shape, elementwise."""
    per_token, was_clipped = per_token_loss(logps, old_logps, adv, cfg)
    n = valid.sum()
    loss = torch.where(valid, per_token, torch.zeros_like(per_token)).sum() / n.clamp(min=1)
    with torch.no_grad():
        clip_frac = (was_clipped & valid).sum() / n.clamp(min=1)
    return loss, {"clip_frac": float(clip_frac), "tokens": int(n)}
