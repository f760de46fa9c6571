"""A step's sampled responses -> everything the update and the statistics read, computed once:
bridging to each teacher's own format, teacher scores, alignment (DPCA), credit, advantages and
signal masks.

- ``credit_targets``: one sample's teacher request, teacher log-probs and rollout log-probs ->
  its alignment, targets and what the statistics read (pure; no model);
- ``score_rollouts``: a step's responses -> ``Scored``, in named phases (bridge, teacher,
  student log-probs, credit, combine).

Sampling is ``crossopd.step.rollout``, the update ``crossopd.step.update``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from crossopd.core.align import Alignment
from crossopd.core.credit import CreditSpec, assign_credit, get_rule
from crossopd.core.tokens import ByteVocab
from crossopd.models.scoring import score_sequences
from crossopd.step.bridge import TeacherRequest, align_bridged
from crossopd.step.data import Example
from crossopd.step.loss import advantages
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, Teachers
from crossopd.step.stats import TEACHER_STATS, StepStats, add_timings, timed
from crossopd.step.teaching import assignments, mix_targets, score_all, teacher_requests


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
    settings: StepSettings,
    *,
    old_logps: Sequence[torch.Tensor] | None = None,
) -> Scored:
    """Teacher scoring, alignment, credit and advantages for sampled responses (from any
    rollout engine). Each example is scored by its teacher (``teaching.route``), or with
    ``settings.mix`` (name -> weight) by every listed teacher, their targets combined
    (``teaching.mix_targets``).

    ``old_logps`` are the student's rollout-time log-probs of each response token under the
    sampling distribution; when not given they are computed here with the student at
    ``settings.temperature``. With several teachers, ``stats`` also has
    ``teachers/<name>/<stat>``."""
    times: dict[str, float] = {}
    plan = assignments(examples, teachers, settings.mix)
    with timed(times, "bridge"):  # teacher prompts + teacher tokenization
        reqs = {name: teacher_requests(student, teachers[name], [examples[i] for i in idx],
                                       [responses[i] for i in idx])
                for name, idx in plan.items()}
    with timed(times, "teacher"):
        found = score_all(teachers, reqs)
    sequences = [list(p) + np.asarray(r).tolist() for p, r in zip(prompts, responses)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
    with timed(times, "student_logps"):
        old = [o.detach().double().cpu() for o in (old_logps if old_logps is not None else
               student_logps(student, sequences, spans, settings))]
    with timed(times, "align_credit"):
        per, team = credit_per_teacher(student, teachers, plan, reqs, found, old, settings)
        scored = combine(examples, sequences, spans, old, plan, per, settings)
    if len(teachers) > 1:
        for name, st in team.items():
            scored.stats.update({f"teachers/{name}/{k}": v for k, v in st.result().items()
                                 if k in TEACHER_STATS})
    add_timings(scored.stats, times, sum(len(r) for r in responses))
    scored.times = times
    scored.teacher_totals = {name: dict(st.totals) for name, st in team.items()}
    return scored


def student_logps(student: StudentSide, sequences: list[list[int]],
                  spans: list[tuple[int, int]], settings: StepSettings) -> list[torch.Tensor]:
    """The student's log-probs of each response token at the rollout temperature."""
    with torch.no_grad(), student.autocast():
        return score_sequences(student.model, sequences, spans, temperature=settings.temperature,
                               max_batch_tokens=settings.max_batch_tokens, pad_id=student.pad_id)


# per teacher name: per rollout (None where that teacher does not score it) its request, its
# teacher log-probs and its credit
Credited = dict[str, list["tuple[TeacherRequest, np.ndarray | None, SampleCredit] | None"]]


def credit_per_teacher(student: StudentSide, teachers: Teachers, plan: dict[str, list[int]],
                       reqs: dict, found: dict, old: list[torch.Tensor],
                       settings: StepSettings) -> tuple[Credited, dict[str, StepStats]]:
    """Each teacher's credit on the rollouts it scores, and its own statistics (zeros for a
    teacher without rollouts)."""
    n = len(old)
    per: Credited = {}
    team = {name: StepStats() for name in teachers}
    for name, idx in plan.items():
        rows: list = [None] * n
        for i, req, lp in zip(idx, reqs[name], found[name]):
            c = credit_targets(req, lp, old[i].numpy(), student.vocab, teachers[name].vocab,
                               rule=settings.credit, special_penalty=settings.penalty)
            team[name].add(c.alignment, req, old[i].numpy(), c.kl_targets,
                           penalized=int(c.penalized.sum()))
            rows[i] = (req, lp, c)
        per[name] = rows
    return per, team


def combine(examples: Sequence[Example], sequences: list[list[int]],
            spans: list[tuple[int, int]], old: list[torch.Tensor], plan: dict[str, list[int]],
            per: Credited, settings: StepSettings) -> Scored:
    """One target per response token from the routed teacher, or the mix of every listed
    teacher's; the advantages, signal masks and step statistics on them."""
    n = len(examples)
    names = [next(k for k in plan if per[k][i] is not None) for i in range(n)]
    stats, partial = StepStats(), 0
    targets, advs, signal = [], [], []
    for i in range(n):
        req, _, c = per[names[i]][i]  # the routed teacher, or the first of the mix
        q, q_kl = c.targets, c.kl_targets
        if settings.mix:
            weights = list(settings.mix.values())
            q, partial_i = mix_targets([per[k][i][2].targets for k in settings.mix], weights)
            q_kl, _ = mix_targets([per[k][i][2].kl_targets for k in settings.mix], weights)
            partial += partial_i
        stats.add(c.alignment, req, old[i].numpy(), q_kl, penalized=int(c.penalized.sum()))
        q_t = torch.from_numpy(q)
        a, v = advantages(q_t, old[i], settings.loss.adv_clamp)
        targets.append(q_t)
        advs.append(a)
        signal.append(v)
    out = stats.result()
    if settings.mix:
        out["mix_partial_tokens"] = partial
    first = [per[names[i]][i] for i in range(n)]
    return Scored(list(examples), sequences, spans, old, names, [r[0] for r in first],
                  [r[2].alignment for r in first], [r[1] for r in first], targets, advs,
                  signal, out, dict(stats.totals))
