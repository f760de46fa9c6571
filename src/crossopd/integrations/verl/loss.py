"""crossopd's objective in verl's registries: PPO-clip with dual clip on the per-token advantage
``A = clamp(q - old logp, +-adv_clamp)``, token mean over the tokens with a signal
(``crossopd.step.loss.per_token_loss``).

- ``crossopd`` advantage estimator (``algorithm.adv_estimator=crossopd``) and policy loss
  (``actor_rollout_ref.actor.policy_loss.loss_mode=crossopd``): mode ``advantage``, where the
  worker already put ``A`` into the token-level reward. The estimator passes it through on the
  response mask (no discount, no group baseline: OPD's reward is per token); the policy loss is
  crossopd's, with verl's clip keys (``clip_ratio_low/high``, ``clip_ratio_c``).
- ``crossopd`` distillation loss (``distillation.distillation_loss.loss_mode=crossopd``): mode
  ``pool``, where ``teacher_logprobs`` carries the credit targets ``q``.

verl's own policy-gradient path for distillation (``use_policy_gradient: True``) would apply its
vanilla PPO loss with a dual clip fixed at 3.0 to the negated per-token loss; the distillation
loss here is the policy loss itself, so it runs with ``use_policy_gradient: False`` and
``loss_max_clamp: null`` (checked).

A mini-batch can hold no token with a signal (every sequence in it overflowed the teacher's
context, or verl's padding samples). Its loss is then exactly zero, as in crossopd's own
engines: the token mean divides by ``max(tokens, 1)``. verl's distillation path also takes the
min and max of the per-token loss over the masked tokens of every micro-batch, which fails on
none; for such a micro-batch the loss shows verl's metric one token whose loss is zero, which
changes neither the loss nor its gradient.
"""

from __future__ import annotations

from typing import Any

import torch
from verl.trainer.distillation.losses import (
    DISTILLATION_LOSS_REGISTRY,
    DistillationLossSettings,
    register_distillation_loss,
)
from verl.trainer.ppo.core_algos import (
    ADV_ESTIMATOR_REGISTRY,
    POLICY_LOSS_REGISTRY,
    agg_loss,
    register_adv_est,
    register_policy_loss,
)
from verl.utils import tensordict_utils as tu
from verl.workers.utils.padding import no_padding_2_padding

from crossopd.step.loss import LossConfig, per_token_loss

NAME = "crossopd"


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


def _one_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """A mask of ``mask``'s layout with only its first entry set."""
    if mask.is_nested:
        values = torch.zeros_like(mask.values())
        values[0] = 1
        return torch.nested.nested_tensor_from_jagged(values, mask.offsets())
    out = torch.zeros_like(mask)
    out.view(-1)[0] = 1
    return out


def _guard_empty(data: Any, mask: torch.Tensor) -> None:
    """What verl's distillation path needs of a micro-batch without signal (module docstring)."""
    if not tu.get_non_tensor_data(data=data, key="batch_num_tokens", default=1):
        tu.assign_non_tensor(data, batch_num_tokens=1)
    if not mask.any():
        data["response_mask"] = _one_token_mask(data["response_mask"])


def clip_metrics(clipped: torch.Tensor, adv: torch.Tensor, mask: torch.Tensor) -> dict[str, float]:
    n = mask.sum().clamp(min=1)
    return {"opd/clip_frac": float((clipped & mask).sum() / n),
            "opd/adv_mean": float(adv[mask].mean()) if mask.any() else 0.0}


def crossopd_distillation_loss(config: Any, distillation_config: Any, model_output: dict,
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
    _guard_empty(data, mask)
    return per_token, clip_metrics(clipped, adv, mask)


def crossopd_policy_loss(old_log_prob: torch.Tensor, log_prob: torch.Tensor,
                         advantages: torch.Tensor, response_mask: torch.Tensor,
                         loss_agg_mode: str = "token-mean", config: Any = None,
                         rollout_is_weights: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, dict[str, Any]]:
    """verl's policy-loss signature; ``advantages`` is crossopd's ``A`` (the worker's, through
    the ``crossopd`` estimator)."""
    if rollout_is_weights is not None:
        raise LossSettingsError("actor_rollout_ref.actor.policy_loss.loss_mode=crossopd: leave "
                                "algorithm.rollout_correction off (OPD's advantage is computed "
                                "on the rollout's own log-probs)")
    cfg = LossConfig(clip_low=config.clip_ratio_low, clip_high=config.clip_ratio_high,
                     dual_clip=config.clip_ratio_c)
    mask = response_mask.bool()
    per_token, clipped = per_token_loss(log_prob, old_log_prob, advantages.detach(), cfg)
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    info = dict(config.global_batch_info)
    if not info.get("batch_num_tokens", 1):  # a mini-batch without signal: its loss is zero
        info["batch_num_tokens"] = 1
    loss = agg_loss(loss_mat=per_token, loss_mask=mask, loss_agg_mode=loss_agg_mode, **info)
    metrics = {"actor/pg_clipfrac": clip_metrics(clipped, advantages, mask)["opd/clip_frac"]}
    return loss, metrics


def crossopd_advantage(token_level_rewards: torch.Tensor, response_mask: torch.Tensor,
                       config: Any = None, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The worker's per-token advantage (verl's token-level reward), on the response mask:
    (advantages, returns)."""
    adv = token_level_rewards * response_mask
    return adv, adv


def register() -> None:
    """Put ``crossopd`` into verl's loss, policy-loss and estimator registries (once per
    process)."""
    if NAME not in DISTILLATION_LOSS_REGISTRY:
        register_distillation_loss(DistillationLossSettings(names=[NAME], use_estimator=True))(
            crossopd_distillation_loss)
    if NAME not in POLICY_LOSS_REGISTRY:
        register_policy_loss(NAME)(crossopd_policy_loss)
    if NAME not in ADV_ESTIMATOR_REGISTRY:
        register_adv_est(NAME)(crossopd_advantage)
