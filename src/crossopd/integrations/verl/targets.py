"""The verl worker's teacher step for one sample, as plain functions (no verl types): what goes
into verl's ``teacher_logprobs``/``teacher_ids`` fields and which response tokens keep a
signal.

verl's teacher fields follow vLLM's prompt log-probs shifted by one: row ``p`` of a sequence of
length ``S`` holds the log-prob of token ``p + 1`` (the last row is padding), and the loss reads
the response rows ``P - 1 .. S - 2``. crossopd writes its credit target ``q_i`` of response token
``i`` into row ``P - 1 + i``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from crossopd.step.bridge import Message, TeacherRequest
from crossopd.step.data import Example
from crossopd.step.score import SampleCredit, credit_targets
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, TeacherSide
from crossopd.step.stats import StepStats
from crossopd.step.teaching import teacher_requests


class TrajectoryError(ValueError):
    """A trajectory crossopd cannot score as one response (tool or user turns inside it)."""


@dataclass(frozen=True)
class VerlTargets:
    """One sample's fields for verl: ``teacher_ids``/``teacher_logprobs`` shaped ``(S, 1)``
    over prompt + response, and the response mask with no-signal tokens removed."""

    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    response_mask: list[int]
    credit: SampleCredit
    stats: StepStats


def check_single_turn(response_mask: Sequence[int], num_turns: int) -> None:
    """crossopd scores one assistant turn: a response with tool or user tokens inside it (mask
    0) or more than one assistant turn is refused, never scored as one response."""
    if num_turns > 2 or not all(int(m) == 1 for m in response_mask):
        raise TrajectoryError(
            f"crossopd: a multi-turn trajectory ({num_turns} turns, "
            f"{sum(int(m) == 0 for m in response_mask)} tool/user tokens in the response) cannot "
            "be scored as one response; use a single-turn agent loop (agent_name: "
            "single_turn_agent) with crossopd's teacher step")


def as_messages(raw_prompt: object) -> list[Message]:
    """verl's ``raw_prompt`` (a list, or a numpy array of message dicts) as chat messages."""
    messages = [dict(m) for m in list(raw_prompt)]  # type: ignore[call-overload]
    if not messages or not all("role" in m and "content" in m for m in messages):
        raise ValueError("crossopd: raw_prompt must be chat messages ({role, content} dicts); "
                         "set data.return_raw_chat=True")
    return messages


def bridge_request(student: StudentSide, teacher: TeacherSide, messages: list[Message],
                   response_ids: Sequence[int], reference: str | None = None) -> TeacherRequest:
    """The sample's response spelled in the teacher's own prompt format and vocabulary."""
    ex = Example(messages, reference=reference)
    return teacher_requests(student, teacher, [ex], [np.asarray(response_ids, np.int64)])[0]


def verl_targets(student: StudentSide, teacher: TeacherSide, req: TeacherRequest,
                 prompt_ids: Sequence[int], response_ids: Sequence[int],
                 rollout_logps: Sequence[float], teacher_logps: np.ndarray | None,
                 settings: StepSettings) -> VerlTargets:
    """Credit on the rollout log-probs, laid out as verl's teacher fields."""
    old = np.asarray(rollout_logps, dtype=np.float64)
    if old.shape != (len(response_ids),):
        raise ValueError(f"crossopd: {old.size} rollout log-probs for {len(response_ids)} "
                         "response tokens; set actor_rollout_ref.rollout.calculate_log_probs="
                         "True")
    credit = credit_targets(req, teacher_logps, old, student.vocab, teacher.vocab,
                            rule=settings.credit, special_penalty=settings.penalty)
    stats = StepStats()
    stats.add(credit.alignment, req, old, credit.kl_targets,
              penalized=int(credit.penalized.sum()))
    signal = ~np.isnan(credit.targets)
    n_prompt, n = len(prompt_ids), len(prompt_ids) + len(response_ids)
    ids = np.zeros((n, 1), dtype=np.int32)
    ids[:-1, 0] = np.concatenate([np.asarray(prompt_ids[1:], np.int64),
                                  np.asarray(response_ids, np.int64)])
    # float64: the targets stay exact (verl pads and batches them as they come)
    logps = np.zeros((n, 1), dtype=np.float64)
    logps[n_prompt - 1: n - 1, 0] = np.where(signal, credit.targets, 0.0)
    return VerlTargets(torch.from_numpy(ids), torch.from_numpy(logps),
                       signal.astype(int).tolist(), credit, stats)


def teacher_span(req: TeacherRequest, shifted_logps: torch.Tensor) -> np.ndarray:
    """The scored span's log-probs from verl's teacher pool answer for ``req.teacher_ids``
    (shifted by one, ``(S_t, 1)``)."""
    start, end = req.scored_span
    return shifted_logps[start - 1: end - 1, 0].double().numpy()
