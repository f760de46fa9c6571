"""The verl worker's teacher step for one sample, as plain functions (no verl types): what goes
into verl's ``teacher_logprobs``/``teacher_ids`` fields and which response tokens keep a
signal. A sample is one response, or a trajectory of assistant turns and tool results (from
crossopd's tool agent loop), scored turn by turn as the native step scores it.

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
from crossopd.step.score import response_ids, rollout_credit
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, TeacherSide
from crossopd.step.stats import StepStats
from crossopd.step.teaching import Unit, teacher_units
from crossopd.step.trajectory import Trajectory, env_groups, student_runs, trajectory_from_mask


class TrajectoryError(ValueError):
    """A trajectory crossopd cannot score as one response (tool or user turns inside it)."""


# the extra field in which crossopd's tool agent loop hands the worker the conversation after
# the prompt (``messages``, as verl's tool agent loop keeps it) and its tool schemas (``tools``)
CONVERSATION = "crossopd_conversation"


@dataclass(frozen=True)
class VerlTargets:
    """One sample's fields for verl: ``teacher_ids``/``teacher_logprobs`` shaped ``(S, 1)``
    over prompt + response, the response mask with no-signal tokens removed, and the credit
    target of every response token (NaN where no signal)."""

    teacher_ids: torch.Tensor
    teacher_logprobs: torch.Tensor
    response_mask: list[int]
    targets: np.ndarray
    stats: StepStats


def check_single_turn(response_mask: Sequence[int], num_turns: int) -> None:
    """Without crossopd's tool agent loop there is no conversation to render on the teacher's
    side: a response with tool or user tokens inside it (mask 0) or more than one assistant
    turn is refused, never scored as one response."""
    if num_turns > 2 or not all(int(m) == 1 for m in response_mask):
        raise TrajectoryError(
            f"crossopd: a multi-turn trajectory ({num_turns} turns, "
            f"{sum(int(m) == 0 for m in response_mask)} tool/user tokens in the response) "
            "without its conversation: run tools through crossopd's tool agent loop "
            "(actor_rollout_ref.rollout.agent.default_agent_loop=crossopd_tool_agent), or a "
            "single-turn agent loop (single_turn_agent)")


def as_messages(raw_prompt: object) -> list[Message]:
    """verl's ``raw_prompt`` (a list, or a numpy array of message dicts) as chat messages."""
    messages = [dict(m) for m in list(raw_prompt)]  # type: ignore[call-overload]
    if not messages or not all("role" in m and "content" in m for m in messages):
        raise ValueError("crossopd: raw_prompt must be chat messages ({role, content} dicts); "
                         "set data.return_raw_chat=True")
    return messages


def sample_response(student: StudentSide, messages: list[Message], response_ids: Sequence[int],
                    response_mask: Sequence[int], conversation: dict | None
                    ) -> np.ndarray | Trajectory:
    """The sample as the step library scores it: a single response, or, from crossopd's tool
    agent loop, a trajectory: each run of ``response_mask`` 1 an assistant turn, the tool
    messages of the conversation the environment between them. verl's loop keeps no message
    for a last turn it stopped at its length or turn limit, and keeps the tool messages whose
    tokens no longer fitted: the environment after the last turn is not scored either way."""
    ids = np.asarray(response_ids, dtype=np.int64)
    if conversation is None:
        return ids
    mask = np.asarray(response_mask, dtype=bool)
    turns = len(student_runs(mask))
    env = (env_groups(conversation["messages"]) + [[]] * turns)[:turns]
    return trajectory_from_mask(ids, mask, env, messages, student.tool_syntax(), student.vocab,
                                conversation.get("tools"))


def sample_units(student: StudentSide, teacher: TeacherSide, messages: list[Message],
                 response: np.ndarray | Trajectory, reference: str | None = None,
                 tools: list[dict] | None = None) -> list[Unit]:
    """The sample's teacher requests: its response, or each assistant turn of its trajectory,
    spelled in the teacher's own prompt format and vocabulary."""
    ex = Example(messages, reference=reference, tools=tools)
    return teacher_units(student, teacher, [ex], [response], [0])


def verl_targets(student: StudentSide, teacher: TeacherSide, units: Sequence[Unit],
                 prompt_ids: Sequence[int], response: np.ndarray | Trajectory,
                 rollout_logps: Sequence[float], teacher_logps: Sequence[np.ndarray | None],
                 settings: StepSettings) -> VerlTargets:
    """Credit on the rollout log-probs, laid out as verl's teacher fields."""
    ids = response_ids(response)
    old = np.asarray(rollout_logps, dtype=np.float64)
    if old.shape != (len(ids),):
        raise ValueError(f"crossopd: {old.size} rollout log-probs for {len(ids)} "
                         "response tokens; set actor_rollout_ref.rollout.calculate_log_probs="
                         "True")
    q, stats = rollout_credit(student, teacher, units, teacher_logps, old, settings, response)
    signal = ~np.isnan(q)
    n_prompt, n = len(prompt_ids), len(prompt_ids) + len(ids)
    seq = np.zeros((n, 1), dtype=np.int32)
    seq[:-1, 0] = np.concatenate([np.asarray(prompt_ids[1:], np.int64), ids])
    # float64: the targets stay exact (verl pads and batches them as they come)
    logps = np.zeros((n, 1), dtype=np.float64)
    logps[n_prompt - 1: n - 1, 0] = np.where(signal, q, 0.0)
    return VerlTargets(torch.from_numpy(seq), torch.from_numpy(logps),
                       signal.astype(int).tolist(), q, stats)


def teacher_span(req: TeacherRequest, shifted_logps: torch.Tensor) -> np.ndarray:
    """The scored span's log-probs from verl's teacher pool answer for ``req.teacher_ids``
    (shifted by one, ``(S_t, 1)``)."""
    start, end = req.scored_span
    return shifted_logps[start - 1: end - 1, 0].double().numpy()
