"""The teacher side of a step: which teachers score which rollouts, the bridged requests, the
teachers' calls (concurrent when there are several), and how several teachers' targets combine.

Two ways rows reach teachers:
- **routing** (default): each rollout is scored by one teacher, the one its example names
  (``Example.teacher``; the run's first teacher otherwise);
- **mixing** (``mix``: name -> weight): every listed teacher scores every rollout, and the
  per-token targets are the weighted sum of the teachers' targets, weights normalised over the
  teachers that have a signal for the token (``mix_targets``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from crossopd.step.bridge import TeacherRequest, build_teacher_request
from crossopd.step.data import Example
from crossopd.step.sides import StudentSide, Teachers, TeacherSide
from crossopd.step.trajectory import Trajectory, turn_requests


def route(examples: Sequence[Example], teachers: Teachers) -> list[str]:
    """The teacher that scores each example: the one it names, else the run's first."""
    default = next(iter(teachers))
    names = [e.teacher or default for e in examples]
    unknown = sorted(set(names) - set(teachers))
    if unknown:
        raise KeyError(f"no teacher named {', '.join(map(repr, unknown))}; the run has "
                       f"{', '.join(map(repr, teachers))}")
    return names


def assignments(examples: Sequence[Example], teachers: Teachers,
                mix: Mapping[str, float] | None = None) -> dict[str, list[int]]:
    """Teacher name -> the indices of the examples it scores (each once per teacher)."""
    if mix:
        return {name: list(range(len(examples))) for name in mix}
    names = route(examples, teachers)
    out: dict[str, list[int]] = {}
    for i, name in enumerate(names):
        out.setdefault(name, []).append(i)
    return out


def teacher_requests(student: StudentSide, teacher: TeacherSide, examples: Sequence[Example],
                     responses: Sequence[np.ndarray]) -> list[TeacherRequest]:
    """Each single-turn response bridged into the teacher's prompt format and vocabulary."""
    return [build_teacher_request(e.messages, r, student.fmt, teacher.fmt, student.vocab,
                                  teacher.vocab, context=teacher.context, reference=e.reference,
                                  tools=e.tools)
            for e, r in zip(examples, responses)]


@dataclass(frozen=True)
class Unit:
    """What the teacher scores as one request: a single-turn response, or one assistant turn
    of a trajectory (``[start, end)`` in the rollout's response)."""

    rollout: int
    start: int
    end: int
    request: TeacherRequest
    reformatted: bool = False  # the teacher scores its own syntax for the turn's tool call
    unparsed: bool = False  # a tool call that does not parse, its bytes verbatim


def teacher_units(student: StudentSide, teacher: TeacherSide, examples: Sequence[Example],
                  responses: Sequence[np.ndarray | Trajectory], rollouts: Sequence[int]
                  ) -> list[Unit]:
    """The teacher's requests for these rollouts (numbered ``rollouts``), one per assistant
    turn, in order."""
    single = [k for k, r in enumerate(responses) if not isinstance(r, Trajectory)]
    reqs = dict(zip(single, teacher_requests(student, teacher, [examples[k] for k in single],
                                             [responses[k] for k in single])))
    out: list[Unit] = []
    # each side's tool syntax, probed once per call (only when there are trajectories)
    syntax = (student.tool_syntax(), teacher.tool_syntax()) if len(reqs) < len(responses) \
        else None
    for k, (e, r) in enumerate(zip(examples, responses)):
        if k in reqs:
            out.append(Unit(rollouts[k], 0, len(reqs[k].student_response), reqs[k]))
            continue
        for tr in turn_requests(e.messages, r, syntax[0], student.vocab, syntax[1],
                                teacher.vocab, context=teacher.context,
                                reference=e.reference, tools=e.tools):
            out.append(Unit(rollouts[k], tr.start, tr.end, tr.request, tr.reformatted,
                            tr.unparsed))
    return out


def score_requests(teacher: TeacherSide, reqs: Sequence[TeacherRequest]
                   ) -> list[np.ndarray | None]:
    """Teacher log-probs per request; None for an overflowed or empty one."""
    live = [i for i, q in enumerate(reqs) if not q.overflow and q.stop_end > q.response_start]
    found = teacher.scorer.score([reqs[i].teacher_ids for i in live],
                                  [reqs[i].scored_span for i in live]) if live else []
    out: list[np.ndarray | None] = [None] * len(reqs)
    for i, lp in zip(live, found):
        out[i] = lp
    return out


def score_all(teachers: Teachers, requests: Mapping[str, Sequence[TeacherRequest]]
              ) -> dict[str, list[np.ndarray | None]]:
    """Every teacher's requests scored; several teachers at once (each HTTP teacher through
    its own URL pool and patience; in-process teachers share the device)."""
    if len(requests) == 1:
        ((name, reqs),) = requests.items()
        return {name: score_requests(teachers[name], reqs)}
    with ThreadPoolExecutor(max_workers=len(requests)) as pool:
        futures = {name: pool.submit(score_requests, teachers[name], reqs)
                   for name, reqs in requests.items()}
        return {name: f.result() for name, f in futures.items()}


def mix_targets(targets: Sequence[np.ndarray], weights: Sequence[float]
                ) -> tuple[np.ndarray, int]:
    """(the weighted sum of the teachers' targets per token, weights renormalised over the
    teachers with a signal there (NaN where none has one); how many tokens had a signal from
    some teachers but not all)."""
    q = np.stack(targets)  # [teachers, tokens]
    w = np.asarray(weights, dtype=np.float64)[:, None] * ~np.isnan(q)
    total = w.sum(0)
    mixed = np.where(total > 0, np.nansum(q * w, 0) / np.where(total > 0, total, 1.0), np.nan)
    has = ~np.isnan(q)
    partial = int((has.any(0) & ~has.all(0)).sum())
    return mixed, partial
