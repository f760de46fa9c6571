"""Rollouts for engines that sample with HF ``generate`` (the native engine, held-out evaluation,
the benchmarks): ``samples_per_prompt`` responses per example, then ``score_rollouts``."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from crossopd.models.sampling import sample
from crossopd.step.data import Example
from crossopd.step.multiturn import Toolbox, sample_trajectories
from crossopd.step.score import Scored, score_rollouts
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, Teachers
from crossopd.step.stats import add_timings, timed


def sample_rollouts(
    student: StudentSide, examples: Sequence[Example], settings: StepSettings
) -> tuple[list[Example], list[list[int]], list[np.ndarray]]:
    """(examples, student prompt ids, sampled response ids), ``samples_per_prompt`` each."""
    n = settings.samples_per_prompt
    exs = [e for e in examples for _ in range(n)]
    # one template rendering per prompt, repeated for its samples
    prompts = [p for e in examples for p in [student.fmt.prompt_ids(e.messages)] * n]
    with student.autocast():
        responses = sample(student.model, prompts, max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, top_p=settings.top_p,
                           stop_ids=student.fmt.stop_ids, pad_id=student.pad_id)
    return exs, prompts, responses


def rollout_and_score(student: StudentSide, teachers: Teachers, examples: Sequence[Example],
                      settings: StepSettings, *, toolbox: Toolbox | None = None) -> Scored:
    """One step's data: HF ``generate`` rollouts (multi-turn, calling tools, with a
    ``toolbox``), then ``score_rollouts``."""
    times: dict[str, float] = {}
    with timed(times, "rollout"):
        if toolbox is None:
            exs, prompts, responses = sample_rollouts(student, examples, settings)
        else:
            exs, prompts, responses = sample_trajectories(student, examples, settings, toolbox)
    scored = score_rollouts(student, teachers, exs, prompts, responses, settings)
    scored.times.update(times)
    add_timings(scored.stats, times, int(scored.stats["response_tokens"]))
    if toolbox is not None:
        scored.stats.update({k: float(v) for k, v in toolbox.counts.items()})
        toolbox.counts.update(dict.fromkeys(toolbox.counts, 0))
    return scored
