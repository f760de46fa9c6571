"""The ``crossopd`` distillation loss for verl: crossopd's PPO-clip with dual clip on
``A = clamp(q - old logp, ±adv_clamp)``, per token; verl's ``agg_loss`` takes the token mean over
``response_mask``, from which the worker removed every token without a signal.

verl's own policy-gradient path (``use_policy_gradient: True``) would apply its vanilla PPO loss
with a dual clip fixed at 3.0 to the negated per-token loss; this loss is the policy loss itself,
so it runs with ``use_policy_gradient: False`` and ``loss_max_clamp: null`` (checked). The clip
range is ``distillation_loss.clip_ratio_low/high``, the dual clip the actor's ``clip_ratio_c``.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    DistillationLossSettings,
    register_distillation_loss,
)
from verl.workers.utils.padding import no_padding_2_padding

from crossopd.loss import LossConfig, per_token_loss

LOSS_NAME = "crossopd"


class LossSettingsError(ValueError):
    """verl's distillation settings would change crossopd's loss."""


def loss_config(actor_config: Any, distillation_config: Any) -> LossConfig:
    """crossopd's loss settings from verl's keys (docs/scale.md has the table)."""
    dl = distillation_config.distillation_loss
    if dl.use_policy_gradient:
        raise LossSettingsError(
            "distillation.distillation_loss.loss_mode=crossopd is the policy loss itself: set "
            "distillation.distillation_loss.use_policy_gradient=False")
    if dl.loss_max_clamp is not None:
        raise LossSettingsError(
            "distillation.distillation_loss.loss_mode=crossopd clamps the advantage, not the "
            "loss: set distillation.distillation_loss.loss_max_clamp=null")
    return LossConfig(clip_low=dl.clip_ratio_low, clip_high=dl.clip_ratio_high,
                      dual_clip=actor_config.clip_ratio_c)


def _padded(x: torch.Tensor, fill: Any) -> torch.Tensor:
    return x.to_padded_tensor(fill) if x.is_nested else x


def crossopd_loss(config: Any, distillation_config: Any, model_output: dict,
                  data: Any) -> tuple[torch.Tensor, dict[str, Any]]:
    """Per-token loss ``(bsz, response_len)`` and metrics, verl's distillation-loss signature.
    ``data["teacher_logprobs"]`` holds crossopd's credit targets (the worker's)."""
    cfg = loss_config(config, distillation_config)
    logps = no_padding_2_padding(model_output["log_probs"], data)
    q = no_padding_2_padding(data["teacher_logprobs"], data).squeeze(-1)
    old = _padded(data["old_log_probs"], 0.0)
    mask = _padded(data["response_mask"], False).bool()
    adv = torch.where(mask, (q.to(old) - old).clamp(-cfg.adv_clamp, cfg.adv_clamp),
                      torch.zeros_like(old))
    per_token, clipped = per_token_loss(logps, old.to(logps), adv.to(logps).detach(), cfg)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    n = mask.sum().clamp(min=1)
    metrics = {"opd/clip_frac": float((clipped & mask).sum() / n),
               "opd/adv_mean": float(adv[mask].mean()) if mask.any() else 0.0}
    return per_token, metrics


def register() -> None:
    """Put ``crossopd`` into verl's distillation-loss registry (once per process)."""
    if LOSS_NAME not in DISTILLATION_LOSS_REGISTRY:
        register_distillation_loss(
            DistillationLossSettings(names=[LOSS_NAME], use_estimator=True))(crossopd_loss)
