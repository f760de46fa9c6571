"""A verl run's trained samples against crossopd's native step library (what ``smoke`` checks):
the worker recorded, for every training sample, the student's ids as sampled, the rollout
log-probs, the teacher log-probs it got and the targets, mask and counts it produced
(``+crossopd.record_dir``). Here the same ids go through ``crossopd.step.score.score_rollouts`` with
the teacher scoring in process, one sequence per forward pass:

- ``max_abs_diff_teacher_logprobs``: the run's teacher (HTTP server or verl's pool) against the
  native in-process scoring of the same teacher ids;
- ``max_abs_diff_targets`` and ``mask_equal``: the native bridge, alignment and credit on the
  run's own teacher log-probs against the run's targets and response mask (exact), per
  assistant turn for a tool-calling trajectory;
- ``max_abs_diff_metrics``: the native counts of the last step's samples against the ``opd/``
  metrics verl's tracker logged for that step.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.integrations.verl.teacher_step import opd_metrics, student_side
from crossopd.step.data import Example
from crossopd.step.settings import StepSettings, TeacherConfig

TEACHER_TOLERANCE = 1e-4
METRICS = ("sequences", "coverage", "one_to_one_share", "signal_tokens", "kl_per_token",
           "stop_rate", "overflowed_sequences", "unaligned_tokens", "assistant_turns",
           "env_tokens", "format_tokens", "unparsed_tool_calls")


def read_records(directory: Path) -> list[dict]:
    rows = [json.loads(line) for f in sorted(directory.glob("*.jsonl"))
            for line in f.read_text().splitlines()]
    return sorted(rows, key=lambda r: r["global_steps"])


def _nan(values: list) -> np.ndarray:
    return np.array([np.nan if v is None else v for v in values], dtype=np.float64)


def compare(out: Path, student: str, t_cfg: TeacherConfig, logged: dict[str, float],
            settings: StepSettings | None = None, tool_format: str | None = "hermes"
            ) -> dict[str, Any]:
    """The comparison for the run in ``out`` (module docstring); ``t_cfg``: the teacher in
    process, with the run's prompt format; ``settings``: the run's (default: crossopd's
    defaults); ``tool_format``: verl's ``multi_turn.format``. The native step scores every
    sequence in a forward pass of its own (``max_batch_tokens=1``), as the worker does. A
    trajectory (a sample of crossopd's tool agent loop) is read from its recorded student
    tokens and conversation, and compared unit by unit (one per assistant turn)."""
    from crossopd.integrations.verl.targets import sample_response
    from crossopd.models.hub import load_hf_tokenizer
    from crossopd.step.score import rollout_credit, score_rollouts
    from crossopd.step.sides import check_teacher, teacher_side

    settings = replace(settings or StepSettings.build(), max_batch_tokens=1)
    records = read_records(out / "samples")
    if not records:
        return {"ok": False, "error": f"no samples recorded under {out / 'samples'}"}
    s_side = student_side(load_hf_tokenizer(student), tool_format)
    t_side = teacher_side(t_cfg, check_teacher(t_cfg), max_batch_tokens=1)
    exs = [Example(r["messages"], tools=(r.get("conversation") or {}).get("tools"))
           for r in records]
    old = [torch.tensor(r["rollout_logprobs"], dtype=torch.float64) for r in records]
    responses = [sample_response(s_side, r["messages"], r["response_ids"],
                                 r.get("student_mask") or [1] * len(r["response_ids"]),
                                 r.get("conversation")) for r in records]
    native = score_rollouts(s_side, {"teacher": t_side}, exs, [r["prompt_ids"] for r in records],
                            responses, settings, old_logps=old)
    d_teacher, d_targets, mask_equal = 0.0, 0.0, True
    per_rollout: dict[int, list[int]] = {}  # each rollout's units (indices), in order
    for k, u in enumerate(native.units):
        per_rollout.setdefault(u.rollout, []).append(k)
    for i, (r, response, o) in enumerate(zip(records, responses, old)):
        units = per_rollout.get(i, [])
        run_lps = [None if lp is None else np.asarray(lp) for lp in r["teacher_logprobs"]]
        mine = [native.teacher_logps[k] for k in units]
        if len(run_lps) != len(units) or any((a is None) != (b is None)
                                             for a, b in zip(mine, run_lps)):
            return {"ok": False, "error": "the run and the native step disagree on the "
                    "requests of a sample or on which the teacher could score"}
        for a, b in zip(mine, run_lps):
            if a is not None:
                d_teacher = max(d_teacher, float(np.abs(a - b).max()))
        ours, _ = rollout_credit(s_side, t_side, [native.units[k] for k in units], run_lps,
                                 o.numpy(), settings, response)
        theirs = _nan(r["targets"])
        mask_equal &= bool(np.array_equal(~np.isnan(ours), np.asarray(r["response_mask"]) == 1))
        mask_equal &= bool(np.array_equal(np.isnan(ours), np.isnan(theirs)))
        both = ~np.isnan(ours) & ~np.isnan(theirs)
        if both.any():
            d_targets = max(d_targets, float(np.abs(ours[both] - theirs[both]).max()))
    last = max(r["global_steps"] for r in records)
    step = [dict(r["stats"], teacher="teacher") for r in records if r["global_steps"] == last]
    mine_metrics = {k[4:]: v for k, v in opd_metrics(step).items()}
    d_metrics = max(abs(mine_metrics[k] - logged.get(k, np.inf)) for k in METRICS
                    if k in mine_metrics)
    ok = (mask_equal and d_targets <= 1e-12 and d_teacher <= TEACHER_TOLERANCE
          and d_metrics <= 1e-9)
    return {"ok": ok, "sequences": len(records), "last_step_sequences": len(step),
            "trajectories": sum(r.get("conversation") is not None for r in records),
            "max_abs_diff_teacher_logprobs": d_teacher, "max_abs_diff_targets": d_targets,
            "mask_equal": mask_equal, "max_abs_diff_metrics": d_metrics,
            "native_coverage": native.stats["coverage"],
            "native_assistant_turns": native.stats["assistant_turns"],
            "native_env_tokens": native.stats["env_tokens"]}
