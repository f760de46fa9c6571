"""Held-out evaluation: fresh student samples scored by the run's teachers, the task metric,
and a few samples to read."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch

from crossopd.step.data import Example
from crossopd.step.multiturn import Toolbox
from crossopd.step.rollout import rollout_and_score
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, Teachers
from crossopd.step.stats import TIMING_PREFIX


def evaluate(
    student: StudentSide,
    teachers: Teachers,
    examples: Sequence[Example],
    settings: StepSettings,
    *,
    seed: int,
    samples: int = 3,
    samples_per_prompt: int = 1,
    toolbox: Toolbox | None = None,
) -> dict:
    """Reverse KL per byte (teacher vs student on fresh student samples, ``samples_per_prompt``
    each; comparable across tokenizers), stop rate, accuracy when the data has answers
    (``answers.answer_correct``), and the first ``samples`` prompts with their responses. Uses
    its own RNG stream so training randomness is untouched and every evaluation sees the same
    sampling noise. With several teachers, also the reverse KL to each
    (``teachers/<name>/kl_per_byte``, over the prompts it scores)."""
    from crossopd.evaluation.graders import answer_correct

    k = samples_per_prompt
    each = dataclasses.replace(settings, samples_per_prompt=k)
    # every device's generator: manual_seed below reseeds CUDA too
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        s = rollout_and_score(student, teachers, examples, each, toolbox=toolbox)
    result = {key: v for key, v in s.stats.items() if not key.startswith(TIMING_PREFIX)}
    # each rollout's last assistant turn: the whole response, or a trajectory's answer
    last = {u.rollout: u for u in s.units}
    texts = [student.vocab.concat_bytes(s.sequences[i][a + last[i].start:a + last[i].end])
             .decode("utf-8", "replace") for i, (a, _) in enumerate(s.spans)]
    answers = [e.answer for e in examples]
    if any(a is not None for a in answers):
        # per prompt, the mean over its k samples (None: no answer): before/after pair up
        result["correct"] = [
            None if a is None else
            float(np.mean([answer_correct(t, a) for t in texts[i * k:(i + 1) * k]]))
            for i, a in enumerate(answers)]
        hits = [x for x in result["correct"] if x is not None]
        result["accuracy"] = sum(hits) / len(hits)
    result["samples"] = [{"prompt": e.messages[-1]["content"], "response": texts[i * k],
                          "answer": e.answer} for i, e in enumerate(examples[:samples])]
    return result
