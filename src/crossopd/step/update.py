"""The native update: PPO-clip with dual clip over a step's ``Scored`` rollouts, token-mean over
the whole step, in token-budgeted micro-batches."""

from __future__ import annotations

import torch

from crossopd.models.scoring import score_sequences, token_budget_batches
from crossopd.step.loss import policy_loss
from crossopd.step.score import Scored
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide


def advantage_stats(s: Scored) -> dict[str, float]:
    """Mean, spread and largest magnitude of the step's advantages on signal tokens."""
    adv = torch.cat([a[v] for a, v in zip(s.advantages, s.signal)]) if s.advantages \
        else torch.zeros(0)
    if adv.numel() == 0:
        adv = torch.zeros(1)
    return {"adv_mean": float(adv.mean()), "adv_std": float(adv.std()) if adv.numel() > 1
            else 0.0, "adv_abs_max": float(adv.abs().max())}


def update(
    student: StudentSide,
    s: Scored,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    settings: StepSettings,
    *,
    grad_clip: float = 1.0,
    epochs: int = 1,
) -> dict[str, float]:
    """PPO-clip over the step's rollouts, ``epochs`` optimizer steps, in token-budgeted
    micro-batches (gradient accumulation weighted so the result is the token mean over the whole
    step), with ``settings.loss``. The ratio compares the rollout's tempered distributions
    (``settings.temperature``).

    The schedule counts optimizer steps: ``epochs`` per call, also on a step without signal
    (which skips the optimizer), so the learning rate after step N is the same whatever N's
    rollouts were."""
    total_valid = sum(int(v.sum()) for v in s.signal)
    out = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, **advantage_stats(s)}
    if total_valid == 0:  # nothing to learn from; the schedule still counts the step
        for _ in range(epochs):
            scheduler.step()
        return out
    micro = token_budget_batches([len(x) for x in s.sequences], settings.max_batch_tokens)
    # The student stays in eval mode: with dropout active the update would score the rollout
    # under a different policy than the one that produced old_logps (ratio != 1 on-policy).
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum = 0.0, 0.0
        for mb in micro:
            valid = torch.cat([s.signal[i] for i in mb])
            n_mb = int(valid.sum())
            if n_mb == 0:
                continue
            with student.autocast():
                logps = score_sequences(student.model, [s.sequences[i] for i in mb],
                                        [s.spans[i] for i in mb], pad_id=student.pad_id,
                                        grad=True, max_batch_tokens=settings.max_batch_tokens,
                                        temperature=settings.temperature)
            lp = torch.cat(logps).double()
            old = torch.cat([s.old_logps[i] for i in mb]).to(lp.device)
            adv = torch.cat([s.advantages[i] for i in mb]).to(lp.device)
            loss, st = policy_loss(lp, old, adv, valid.to(lp.device), settings.loss)
            (loss * n_mb / total_valid).backward()
            loss_sum += float(loss.detach()) * n_mb
            clip_sum += st["clip_frac"] * n_mb
        grad_norm = torch.nn.utils.clip_grad_norm_(student.model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        out.update(loss=loss_sum / total_valid, clip_frac=clip_sum / total_valid,
                   grad_norm=float(grad_norm))
    return out
