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
from crossopd.step.sides import StudentSide, Teachers, TeacherSide
from crossopd.step.stats import TEACHER_STATS, StepStats, add_timings, timed
from crossopd.step.teaching import Unit, assignments, mix_targets, score_all, teacher_units
from crossopd.step.trajectory import Trajectory


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
    statistics and the diagnostics read. Per rollout: ``sequences`` .. ``signal``; per scored
    unit (a single-turn response, or one assistant turn of a trajectory, in rollout order; one
    unit per rollout when no rollout is a trajectory): ``units`` .. ``teacher_logps``."""

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
    units: list[Unit] = field(default_factory=list)


def response_ids(response: np.ndarray | Trajectory) -> np.ndarray:
    """Every id after the prompt: a response's, or a trajectory's assistant and environment
    tokens."""
    return response.ids if isinstance(response, Trajectory) else np.asarray(response)


def score_rollouts(
    student: StudentSide,
    teachers: Teachers,
    examples: Sequence[Example],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[np.ndarray | Trajectory],
    settings: StepSettings,
    *,
    old_logps: Sequence[torch.Tensor] | None = None,
) -> Scored:
    """Teacher scoring, alignment, credit and advantages for sampled responses (from any
    rollout engine). Each example is scored by its teacher (``teaching.route``), or with
    ``settings.mix`` (name -> weight) by every listed teacher, their targets combined
    (``teaching.mix_targets``). A ``Trajectory`` response is scored turn by turn; its
    environment tokens get no signal and are counted.

    ``old_logps`` are the student's rollout-time log-probs of each response token under the
    sampling distribution; when not given they are computed here with the student at
    ``settings.temperature``. With several teachers, ``stats`` also has
    ``teachers/<name>/<stat>``."""
    times: dict[str, float] = {}
    plan = assignments(examples, teachers, settings.mix)
    with timed(times, "bridge"):  # teacher prompts + teacher tokenization
        units = {name: teacher_units(student, teachers[name], [examples[i] for i in idx],
                                     [responses[i] for i in idx], idx)
                 for name, idx in plan.items()}
    with timed(times, "teacher"):
        found = score_all(teachers, {name: [u.request for u in us] for name, us in units.items()})
    ids = [response_ids(r) for r in responses]
    sequences = [list(p) + r.tolist() for p, r in zip(prompts, ids)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, ids)]
    with timed(times, "student_logps"):
        old = [o.detach().double().cpu() for o in (old_logps if old_logps is not None else
               student_logps(student, sequences, spans, settings))]
    with timed(times, "align_credit"):
        per, team = credit_per_teacher(student, teachers, units, found, old, settings)
        scored = combine(examples, sequences, spans, old, responses, per, settings)
    if len(teachers) > 1:
        for name, st in team.items():
            scored.stats.update({f"teachers/{name}/{k}": v for k, v in st.result().items()
                                 if k in TEACHER_STATS})
    add_timings(scored.stats, times, sum(len(r) for r in ids))
    scored.times = times
    scored.teacher_totals = {name: dict(st.totals) for name, st in team.items()}
    return scored


def rollout_credit(student: StudentSide, teacher: TeacherSide, units: Sequence[Unit],
                   teacher_logps: Sequence[np.ndarray | None], old: np.ndarray,
                   settings: StepSettings, response: np.ndarray | Trajectory
                   ) -> tuple[np.ndarray, StepStats]:
    """One rollout scored by one teacher, on its own (an engine that scores a sample at a
    time): ``units`` are its requests in order, ``old`` its rollout log-probs. The target of
    each response token (NaN outside assistant turns and where there is no signal) and the
    rollout's statistics, as ``score_rollouts`` computes them without a mix."""
    q, stats = np.full(len(old), np.nan), StepStats()
    for j, (u, lp) in enumerate(zip(units, teacher_logps, strict=True)):
        o = old[u.start:u.end]
        masked = masked_unparsed(u, settings)
        c = credit_targets(u.request, None if masked else lp, o, student.vocab, teacher.vocab,
                           rule=settings.credit, special_penalty=settings.penalty)
        q[u.start:u.end] = c.targets
        stats.add(c.alignment, u.request, o, c.kl_targets, penalized=int(c.penalized.sum()),
                  new_sequence=j == 0, reformatted=u.reformatted, masked_unparsed=masked)
    if isinstance(response, Trajectory):
        stats.add_environment(response.env_tokens, response.unparsed_tool_calls)
    return q, stats


def student_logps(student: StudentSide, sequences: list[list[int]],
                  spans: list[tuple[int, int]], settings: StepSettings) -> list[torch.Tensor]:
    """The student's log-probs of each response token at the rollout temperature."""
    with torch.no_grad(), student.autocast():
        return score_sequences(student.model, sequences, spans, temperature=settings.temperature,
                               max_batch_tokens=settings.max_batch_tokens, pad_id=student.pad_id)


def masked_unparsed(u: Unit, settings: StepSettings) -> int:
    """The unit's tokens when it gets no signal as a turn whose tool call did not parse
    (``unparsed_calls: mask``), else 0."""
    return u.end - u.start if u.unparsed and settings.unparsed_calls == "mask" else 0


# per teacher name: per rollout its units, each with its teacher log-probs and its credit
Credited = dict[str, dict[int, list["tuple[Unit, np.ndarray | None, SampleCredit]"]]]


def credit_per_teacher(student: StudentSide, teachers: Teachers, units: dict[str, list[Unit]],
                       found: dict, old: list[torch.Tensor], settings: StepSettings
                       ) -> tuple[Credited, dict[str, StepStats]]:
    """Each teacher's credit on the units it scores, and its own statistics (zeros for a
    teacher without rollouts)."""
    per: Credited = {}
    team = {name: StepStats() for name in teachers}
    for name, us in units.items():
        rows: dict[int, list] = {}
        for u, lp in zip(us, found[name]):
            o = old[u.rollout].numpy()[u.start:u.end]
            masked = masked_unparsed(u, settings)
            c = credit_targets(u.request, None if masked else lp, o, student.vocab,
                               teachers[name].vocab, rule=settings.credit,
                               special_penalty=settings.penalty)
            team[name].add(c.alignment, u.request, o, c.kl_targets,
                           penalized=int(c.penalized.sum()), new_sequence=u.rollout not in rows,
                           reformatted=u.reformatted, masked_unparsed=masked)
            rows.setdefault(u.rollout, []).append((u, lp, c))
        per[name] = rows
    return per, team


def combine(examples: Sequence[Example], sequences: list[list[int]],
            spans: list[tuple[int, int]], old: list[torch.Tensor],
            responses: Sequence[np.ndarray | Trajectory], per: Credited,
            settings: StepSettings) -> Scored:
    """One target per response token from the routed teacher, or the mix of every listed
    teacher's (NaN on a trajectory's environment tokens); the advantages, signal masks and
    step statistics on them."""
    n = len(examples)
    names = [next(k for k in per if i in per[k]) for i in range(n)]
    stats, partial = StepStats(), 0
    targets, advs, signal, first = [], [], [], []
    for i in range(n):
        q = np.full(len(old[i]), np.nan)
        for j, (u, lp, c) in enumerate(per[names[i]][i]):  # the routed teacher's units
            q_u, q_kl = c.targets, c.kl_targets
            if settings.mix:
                weights = list(settings.mix.values())
                q_u, partial_j = mix_targets([per[k][i][j][2].targets for k in settings.mix],
                                             weights)
                q_kl, _ = mix_targets([per[k][i][j][2].kl_targets for k in settings.mix],
                                      weights)
                partial += partial_j
            q[u.start:u.end] = q_u
            stats.add(c.alignment, u.request, old[i].numpy()[u.start:u.end], q_kl,
                      penalized=int(c.penalized.sum()), new_sequence=j == 0,
                      reformatted=u.reformatted, masked_unparsed=masked_unparsed(u, settings))
            first.append((u, lp, c))
        if isinstance(responses[i], Trajectory):
            stats.add_environment(responses[i].env_tokens, responses[i].unparsed_tool_calls)
        q_t = torch.from_numpy(q)
        a, v = advantages(q_t, old[i], settings.loss.adv_clamp)
        targets.append(q_t)
        advs.append(a)
        signal.append(v)
    out = stats.result()
    if settings.mix:
        out["mix_partial_tokens"] = partial
    return Scored(list(examples), sequences, spans, old, names, [u.request for u, _, _ in first],
                  [c.alignment for _, _, c in first], [lp for _, lp, _ in first], targets, advs,
                  signal, out, dict(stats.totals), units=[u for u, _, _ in first])
