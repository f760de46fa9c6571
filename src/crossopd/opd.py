"""One OPD step as a library: sample from the student, score with teachers of other families,
align, assign credit, and take a PPO-clip step on the per-token reverse-KL advantage.

Every engine builds on these functions: the native loop, the TRL trainer, the verl worker and
the benchmarks. Each takes only the sides and settings it uses and holds no trainer-framework
types. The pieces, smallest first:

- ``credit_targets``: one sample's teacher request, teacher log-probs and rollout log-probs ->
  its alignment, targets and what the statistics read (pure; no model);
- ``score_rollouts``: a step's responses -> ``Scored`` (bridging and teacher calls through
  ``crossopd.teaching``, student log-probs, credit, advantages and signal masks, statistics,
  timings), computed once;
- ``rollout_and_score``: HF ``generate`` rollouts, then ``score_rollouts``;
- ``update``: PPO-clip over a ``Scored``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from crossopd.align import Alignment
from crossopd.bridge import TeacherRequest, align_bridged
from crossopd.config import RolloutConfig
from crossopd.credit import CreditSpec, assign_credit, get_rule
from crossopd.loss import LossConfig, advantages, policy_loss
from crossopd.prompts import Example
from crossopd.rollout.hf import sample
from crossopd.scoring import score_sequences, token_budget_batches
from crossopd.sides import StudentSide, Teachers
from crossopd.stats import TEACHER_STATS, StepStats, add_timings, timed
from crossopd.teaching import assignments, mix_targets, score_all, teacher_requests
from crossopd.tokens import ByteVocab


# ------------------------------------------------------------------------------- one sample
@dataclass(frozen=True)
class SampleCredit:
    """Credit for one rollout: ``targets`` (NaN: no signal) train the student; ``kl_targets``
    (NaN where the teacher gave no judgement) are what the KL statistics read."""

    alignment: Alignment
    targets: np.ndarray
    kl_targets: np.ndarray
    penalized: np.ndarray  # special tokens sampled mid-response that got the penalty


def credit_targets(req: TeacherRequest, teacher_logps: np.ndarray | None,
                   old_logps: np.ndarray, student_vocab: ByteVocab, teacher_vocab: ByteVocab,
                   *, rule: CreditSpec = "proportional", special_penalty: float | None = None,
                   alignment: Alignment | None = None) -> SampleCredit:
    """Align one bridged request and assign credit on its rollout log-probs.

    ``teacher_logps``: the teacher's log-probs of ``req.teacher_ids[req.scored_span]`` (None: an
    overflowed or empty request, no signal). ``special_penalty``: the advantage
    ``-special_penalty`` for special tokens sampled mid-response (None: they get no signal).
    ``alignment``: the request's alignment when already computed."""
    a = alignment if alignment is not None else align_bridged(req, student_vocab, teacher_vocab)
    credit = get_rule(rule)
    if teacher_logps is None:
        q = np.full(len(old_logps), np.nan)
    else:
        q = np.asarray(assign_credit(a, teacher_logps, old_logps, rule=credit), dtype=np.float64)
    # the KL statistics read sum(log p - q) per chunk, which is L_S - L_T only for rules whose
    # targets sum to the chunk's teacher log-prob: another rule's rollouts report the uniform
    # rule's KL, so every rule's KL is the same number
    q_kl = q.copy()
    if not credit.sums_to_teacher and teacher_logps is not None:
        q_kl = np.asarray(assign_credit(a, teacher_logps, old_logps, rule="uniform"))
    hit = penalize_specials(q, old_logps, req, student_vocab.special, special_penalty)
    q_kl[hit] = np.nan  # a penalty is not the teacher's judgement: kept out of the KL
    return SampleCredit(a, q, q_kl, hit)


def penalize_specials(q: np.ndarray, logps: np.ndarray, req: TeacherRequest,
                      special: np.ndarray, penalty: float | None) -> np.ndarray:
    """Targets that give special tokens sampled mid-response the advantage ``-penalty``, in
    place; returns where. Teacher-independent: no teacher writes such a token."""
    if penalty is None:
        return np.zeros(len(q), dtype=bool)
    hit = special[req.student_response]  # a copy (fancy indexing)
    if req.student_stop_index is not None:
        hit[req.student_stop_index] = False
    q[hit] = logps[hit] - penalty
    return hit


# ------------------------------------------------------------------------------- a step's data
@dataclass
class Scored:
    """A step's rollouts with everything computed for them, once: what the update, the
    statistics and the diagnostics read."""

    examples: list[Example]
    sequences: list[list[int]]  # student prompt + response
    spans: list[tuple[int, int]]  # response positions in ``sequences``
    old_logps: list[torch.Tensor]  # rollout log-probs per response token (float64, CPU)
    teacher_names: list[str]  # the routed teacher (with a mix: its first teacher)
    requests: list[TeacherRequest]
    alignments: list[Alignment]
    teacher_logps: list[np.ndarray | None]  # None: overflowed or empty, no teacher signal
    targets: list[torch.Tensor]  # credit q per response token, NaN where no signal
    advantages: list[torch.Tensor]  # clamp(q - old logp); 0 where no signal
    signal: list[torch.Tensor]  # bool: the token counts in the loss
    stats: dict[str, float]
    totals: dict[str, float] = field(default_factory=dict)  # StepStats sums
    times: dict[str, float] = field(default_factory=dict)  # seconds per phase
    # StepStats sums per teacher (each over the rollouts it scored)
    teacher_totals: dict[str, dict[str, float]] = field(default_factory=dict)


def score_rollouts(
    student: StudentSide,
    teachers: Teachers,
    examples: Sequence[Example],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[np.ndarray],
    *,
    credit_rule: CreditSpec = "proportional",
    max_batch_tokens: int = 8192,
    old_logps: Sequence[torch.Tensor] | None = None,
    temperature: float = 1.0,
    special_penalty: float | None = None,
    adv_clamp: float = LossConfig().adv_clamp,
    mix: Mapping[str, float] | None = None,
) -> Scored:
    """Teacher scoring, alignment, credit and advantages for sampled responses (from any
    rollout engine). Each example is scored by its teacher (``teaching.route``), or with
    ``mix`` (name -> weight) by every listed teacher, their targets combined
    (``teaching.mix_targets``).

    ``old_logps`` are the student's rollout-time log-probs of each response token under the
    sampling distribution; when not given they are computed here with the student at
    ``temperature``. With several teachers, ``stats`` also has ``teachers/<name>/<stat>``."""
    times: dict[str, float] = {}
    plan = assignments(examples, teachers, mix)
    with timed(times, "bridge"):  # teacher prompts + teacher tokenization
        reqs = {name: teacher_requests(student, teachers[name], [examples[i] for i in idx],
                                       [responses[i] for i in idx])
                for name, idx in plan.items()}
    with timed(times, "teacher"):
        found = score_all(teachers, reqs)

    sequences = [list(p) + np.asarray(r).tolist() for p, r in zip(prompts, responses)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
    with timed(times, "student_logps"):
        if old_logps is None:
            with torch.no_grad(), student.autocast():
                old_logps = score_sequences(student.model, sequences, spans,
                                            temperature=temperature,
                                            max_batch_tokens=max_batch_tokens,
                                            pad_id=student.pad_id)
        old = [o.detach().double().cpu() for o in old_logps]

    n = len(examples)
    per: dict[str, list[tuple[TeacherRequest, np.ndarray | None, SampleCredit] | None]] = {}
    team = {name: StepStats() for name in teachers}  # zeros for a teacher without rows
    with timed(times, "align_credit"):
        for name, idx in plan.items():
            rows: list = [None] * n
            for i, req, lp in zip(idx, reqs[name], found[name]):
                c = credit_targets(req, lp, old[i].numpy(), student.vocab, teachers[name].vocab,
                                   rule=credit_rule, special_penalty=special_penalty)
                team[name].add(c.alignment, req, old[i].numpy(), c.kl_targets,
                               penalized=int(c.penalized.sum()))
                rows[i] = (req, lp, c)
            per[name] = rows
        names = [next(k for k in plan if per[k][i] is not None) for i in range(n)]
        stats, partial = StepStats(), 0
        targets, advs, signal = [], [], []
        for i in range(n):
            req, lp, c = per[names[i]][i]  # the routed teacher, or the first of the mix
            q, q_kl = c.targets, c.kl_targets
            if mix:
                weights = list(mix.values())
                q, partial_i = mix_targets([per[k][i][2].targets for k in mix], weights)
                q_kl, _ = mix_targets([per[k][i][2].kl_targets for k in mix], weights)
                partial += partial_i
            stats.add(c.alignment, req, old[i].numpy(), q_kl, penalized=int(c.penalized.sum()))
            q_t = torch.from_numpy(q)
            a, v = advantages(q_t, old[i], adv_clamp)
            targets.append(q_t)
            advs.append(a)
            signal.append(v)
    out = stats.result()
    if len(teachers) > 1:
        for name, st in team.items():
            out.update({f"teachers/{name}/{k}": v for k, v in st.result().items()
                        if k in TEACHER_STATS})
        if mix:
            out["mix_partial_tokens"] = partial
    add_timings(out, times, sum(len(r) for r in responses))
    first = [per[names[i]][i] for i in range(n)]
    return Scored(list(examples), sequences, spans, old, names, [r[0] for r in first],
                  [r[2].alignment for r in first], [r[1] for r in first], targets, advs,
                  signal, out, dict(stats.totals), times,
                  {name: dict(st.totals) for name, st in team.items()})


def sample_rollouts(
    student: StudentSide, examples: Sequence[Example], rollout: RolloutConfig
) -> tuple[list[Example], list[list[int]], list[np.ndarray]]:
    """(examples, student prompt ids, sampled response ids), ``samples_per_prompt`` each."""
    n = rollout.samples_per_prompt
    exs = [e for e in examples for _ in range(n)]
    # one template rendering per prompt, repeated for its samples
    prompts = [p for e in examples for p in [student.fmt.prompt_ids(e.messages)] * n]
    with student.autocast():
        responses = sample(student.model, prompts, max_new_tokens=rollout.max_new_tokens,
                           temperature=rollout.temperature, top_p=rollout.top_p,
                           stop_ids=student.fmt.stop_ids, pad_id=student.pad_id)
    return exs, prompts, responses


def rollout_and_score(
    student: StudentSide,
    teachers: Teachers,
    examples: Sequence[Example],
    rollout: RolloutConfig,
    *,
    credit_rule: CreditSpec = "proportional",
    max_batch_tokens: int = 8192,
    adv_clamp: float = LossConfig().adv_clamp,
    mix: Mapping[str, float] | None = None,
) -> Scored:
    """One step's data: HF ``generate`` rollouts, then ``score_rollouts``."""
    times: dict[str, float] = {}
    with timed(times, "rollout"):
        exs, prompts, responses = sample_rollouts(student, examples, rollout)
    scored = score_rollouts(student, teachers, exs, prompts, responses, credit_rule=credit_rule,
                            max_batch_tokens=max_batch_tokens, temperature=rollout.temperature,
                            special_penalty=rollout.special_token_penalty(),
                            adv_clamp=adv_clamp, mix=mix)
    scored.times.update(times)
    add_timings(scored.stats, times, int(scored.stats["response_tokens"]))
    return scored


# ------------------------------------------------------------------------------- update
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
    loss_cfg: LossConfig,
    *,
    grad_clip: float = 1.0,
    epochs: int = 1,
    max_batch_tokens: int = 8192,
    temperature: float = 1.0,
) -> dict[str, float]:
    """PPO-clip over the step's rollouts, ``epochs`` optimizer steps, in token-budgeted
    micro-batches (gradient accumulation weighted so the result is the token mean over the whole
    step). ``temperature`` is the rollout's: the ratio compares the same tempered distributions.

    The schedule counts optimizer steps: ``epochs`` per call, also on a step without signal
    (which skips the optimizer), so the learning rate after step N is the same whatever N's
    rollouts were."""
    total_valid = sum(int(v.sum()) for v in s.signal)
    out = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0, **advantage_stats(s)}
    if total_valid == 0:  # nothing to learn from; the schedule still counts the step
        for _ in range(epochs):
            scheduler.step()
        return out
    micro = token_budget_batches([len(x) for x in s.sequences], max_batch_tokens)
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
                                        grad=True, max_batch_tokens=max_batch_tokens,
                                        temperature=temperature)
            lp = torch.cat(logps).double()
            old = torch.cat([s.old_logps[i] for i in mb]).to(lp.device)
            adv = torch.cat([s.advantages[i] for i in mb]).to(lp.device)
            loss, st = policy_loss(lp, old, adv, valid.to(lp.device), loss_cfg)
            (loss * n_mb / total_valid).backward()
            loss_sum += float(loss.detach()) * n_mb
            clip_sum += st["clip_frac"] * n_mb
        grad_norm = torch.nn.utils.clip_grad_norm_(student.model.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        out.update(loss=loss_sum / total_valid, clip_frac=clip_sum / total_valid,
                   grad_norm=float(grad_norm))
    return out
