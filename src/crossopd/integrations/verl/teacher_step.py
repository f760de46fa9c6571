"""crossopd's teacher step inside a verl agent-loop worker, for one sample at a time: the
messages bridged into the teacher's own prompt format, the response bytes spelled in the
teacher's vocabulary and scored (crossopd's teacher, or verl's teacher pool), aligned (DPCA),
credited on the rollout log-probs, and laid out as verl's fields (``targets``). Tokens without a
signal leave ``response_mask``; each sample's counts ride along in ``extra_fields`` and
crossopd's sampler reports their sums (``opd_metrics``)."""

from __future__ import annotations

import asyncio
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.core.tokens import ByteVocab
from crossopd.integrations.verl.settings import (
    VerlSettings,
    pool_teacher,
    settings_from,
    step_settings,
)
from crossopd.integrations.verl.targets import (
    CONVERSATION,
    as_messages,
    check_single_turn,
    sample_response,
    sample_units,
    teacher_span,
    verl_targets,
)
from crossopd.models.hub import resolve_device
from crossopd.run.config import ConfigError
from crossopd.step.bridge import ChatFormat, TeacherRequest
from crossopd.step.loss import advantages
from crossopd.step.settings import StepSettings
from crossopd.step.sides import (
    DEFAULT_TEACHER,
    StudentSide,
    TeacherSide,
    build_teachers,
    check_teachers,
)
from crossopd.step.stats import TEACHER_STATS, StepStats, timed
from crossopd.step.teaching import score_requests
from crossopd.step.tool_calls import TOOL_FORMATS

STATS_FIELD = "crossopd_stats"
TIME = "time/"  # a count of STATS_FIELD that is seconds of crossopd's work on the sample


def pool_context_check(teacher: TeacherSide, student: StudentSide, max_model_len: int | None,
                       prompt_length: int, response_length: int) -> None:
    """A pool whose context cannot hold the teacher's rendering of a full-length sample fails at
    start with one line: the teacher's prompt format can cost more tokens than the student's,
    and a response is spelled in the teacher's vocabulary."""
    if max_model_len is None:
        return
    probe = [{"role": "user", "content": "Hi"}]
    extra = max(0, len(teacher.fmt.prompt_ids(teacher.context.apply(probe)))
                - len(student.fmt.prompt_ids(probe)))
    need = prompt_length + response_length + len(teacher.fmt.end_of_turn_ids) + extra + 1
    if max_model_len < need:
        raise ConfigError(
            f"the teacher pool's max_model_len {max_model_len} cannot hold a full sample on the "
            f"teacher side (prompt {prompt_length} + response {response_length} + its format "
            f"{extra + len(teacher.fmt.end_of_turn_ids)} + 1 = {need} tokens): raise "
            "distillation.teacher_models.teacher_model.inference.max_model_len")


@dataclass
class TeacherStep:
    """crossopd's teacher step with everything it needs, built once per worker."""

    student: StudentSide
    teachers: dict[str, TeacherSide]
    settings: VerlSettings
    step: StepSettings
    pool: Any = None  # verl's AsyncTeacherLLMServerManager when verl's replicas score
    # how the signal reaches verl: "advantage" (the token-level reward) or "pool" (the targets
    # in the teacher fields, for the crossopd distillation loss); settings.mode by default
    signal: str = ""

    def __post_init__(self) -> None:
        self.signal = self.signal or self.settings.mode

    def teacher_for(self, kwargs: dict) -> TeacherSide:
        """The sample's teacher: the only one, or the one its ``teacher_key`` field names."""
        if len(self.teachers) == 1:
            return next(iter(self.teachers.values()))
        key = self.settings.teacher_key
        value = kwargs.get(key)
        name = value.item() if hasattr(value, "item") else value
        if name not in self.teachers:
            raise ValueError(f"crossopd: the sample's {key} is {name!r}, which names no teacher; "
                             f"crossopd.teachers: {', '.join(self.teachers)}")
        return self.teachers[name]

    async def run(self, output: Any, kwargs: dict) -> torch.Tensor | None:
        """Trim ``output``'s response mask and fill its counts, in place. Returns the per-token
        advantage (float32, response length) in mode ``advantage``; in mode ``pool`` the targets
        go into ``output``'s teacher fields and None is returned. A sample of crossopd's tool
        agent loop (its conversation in ``extra_fields``) is a trajectory, scored turn by turn;
        any other must be a single response."""
        conversation = output.extra_fields.pop(CONVERSATION, None)
        if conversation is None:
            check_single_turn(output.response_mask, output.num_turns)
        times: dict[str, float] = {}
        messages = as_messages(kwargs["raw_prompt"])
        teacher = self.teacher_for(kwargs)
        section = self.settings.teachers.get(teacher.name, self.settings.teacher)
        column = section.reference_column
        reference = (kwargs.get("extra_info") or {}).get(column) if column else None
        sampled = [int(m) for m in output.response_mask]  # 1: the student's token
        with timed(times, "bridge"):
            response = sample_response(self.student, messages, output.response_ids,
                                       output.response_mask, conversation)
            units = sample_units(self.student, teacher, messages, response, reference,
                                 (conversation or {}).get("tools"))
        with timed(times, "teacher"):
            t_lp = await self.score(teacher, [u.request for u in units])
        with timed(times, "align_credit"):
            t = verl_targets(self.student, teacher, units, output.prompt_ids, response,
                             output.response_logprobs or [], t_lp, self.step)
        output.response_mask = t.response_mask
        output.extra_fields[STATS_FIELD] = {"teacher": teacher.name, **t.stats.totals,
                                            **{f"{TIME}{k}": v for k, v in times.items()}}
        if self.settings.record_dir:
            record(self.settings.record_dir, kwargs, messages, output, conversation, sampled,
                   t_lp, t)
        if self.signal == "pool":
            output.extra_fields["teacher_ids"] = t.teacher_ids
            output.extra_fields["teacher_logprobs"] = t.teacher_logprobs
            return None
        old = torch.as_tensor(output.response_logprobs, dtype=torch.float64)
        adv, _ = advantages(torch.from_numpy(t.targets), old, self.step.loss.adv_clamp)
        return adv.float()

    async def score(self, teacher: TeacherSide, reqs: list[TeacherRequest]
                    ) -> list[np.ndarray | None]:
        """The teacher's log-probs of each request's scored span (None: overflowed or empty):
        verl's teacher pool, one sequence at a time, or crossopd's own teacher."""
        if self.pool is None:  # crossopd's teacher blocks on HTTP or a forward pass: off the loop
            return await asyncio.to_thread(score_requests, teacher, reqs)
        out: list[np.ndarray | None] = []
        for req in reqs:
            if req.overflow or req.stop_end <= req.response_start:
                out.append(None)
                continue
            _, shifted = await self.pool.compute_teacher_logprobs_single(
                sequence_ids=req.teacher_ids)
            out.append(teacher_span(req, shifted))
        return out


def record(directory: str, kwargs: dict, messages: list, output: Any,
           conversation: dict | None, sampled: list[int], teacher_logps: list, t: Any) -> None:
    """One training sample as a JSON line, written whole (a line per sample, one file per
    worker process): the teacher's log-probs per request (one per assistant turn), and for a
    trajectory its conversation and which tokens the student sampled."""
    row = {"global_steps": int(kwargs.get("global_steps", 0)), "messages": messages,
           "prompt_ids": list(map(int, output.prompt_ids)),
           "response_ids": list(map(int, output.response_ids)),
           "rollout_logprobs": [float(x) for x in output.response_logprobs or []],
           "teacher_logprobs": [None if lp is None else [float(x) for x in np.asarray(lp)]
                                for lp in teacher_logps],
           "conversation": conversation, "student_mask": sampled,
           "targets": [None if np.isnan(x) else float(x) for x in t.targets],
           "response_mask": list(t.response_mask), "stats": t.stats.totals}
    path = Path(directory) / f"samples-{os.getpid()}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")


def student_side(tokenizer: Any, tool_format: str | None = None) -> StudentSide:
    """The student as the teacher step sees it: its tokenizer's format and byte view (verl
    owns the model); ``tool_format``: verl's tool parser format
    (``actor_rollout_ref.rollout.multi_turn.format``), how the student writes a tool call when
    its template has no syntax for one."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return StudentSide(model=None, tokenizer=tokenizer, fmt=ChatFormat.from_tokenizer(tokenizer),
                       vocab=ByteVocab.from_pretrained(tokenizer), pad_id=int(pad or 0),
                       tool_format=tool_format if tool_format in TOOL_FORMATS else None)


def teacher_step(config: Any, tokenizer: Any, pool: Any = None) -> TeacherStep:
    """The worker's teacher step from a verl config and the student's tokenizer."""
    settings = settings_from(config)
    step = step_settings(config, settings)
    t_cfg = settings.teacher
    from omegaconf import OmegaConf

    student = student_side(tokenizer, OmegaConf.select(
        config, "actor_rollout_ref.rollout.multi_turn.format", default=None))
    own = settings.teachers or ({DEFAULT_TEACHER: t_cfg} if settings.own_teacher else {})
    if own:
        teachers = build_teachers(own, check_teachers(own), device=resolve_device("auto"),
                                  max_batch_tokens=settings.max_batch_tokens)
        return TeacherStep(student, teachers, settings, step)
    from crossopd.models.hub import load_hf_tokenizer

    spec = pool_teacher(config)
    inference = spec.get("inference") or {}
    limit = inference.get("max_model_len")
    t_tok = load_hf_tokenizer(t_cfg.tokenizer or spec.get("model_path"))
    fmt = ChatFormat.from_tokenizer(t_tok, plain_template=t_cfg.plain_template, stop=t_cfg.stop,
                                    max_length=limit - 1 if limit else None)
    teacher = replace(TeacherSide.from_tokenizer(None, t_tok, fmt=fmt),  # type: ignore[arg-type]
                      tool_format=t_cfg.tool_format)
    rollout = config.actor_rollout_ref.rollout
    pool_context_check(teacher, student, limit, rollout.prompt_length, rollout.response_length)
    return TeacherStep(student, {DEFAULT_TEACHER: teacher}, settings, step, pool=pool)


def opd_metrics(stats: Any) -> dict[str, float]:
    """``opd/<name>`` for a batch: the per-sample counts summed, then the ratios; with several
    teachers also ``opd/teachers/<teacher>/<name>``; ``opd/time/<phase>_s``: the seconds of
    each phase of crossopd's step, summed over the batch's samples (they overlap in time)."""
    rows = [s for s in (stats if stats is not None else []) if s]
    total, team, seconds = StepStats(), {}, {}
    for row in rows:
        counts = {k: v for k, v in row.items() if k != "teacher" and not k.startswith(TIME)}
        for k, v in row.items():
            if k.startswith(TIME):
                seconds[k] = seconds.get(k, 0.0) + v
        total.merge(StepStats(counts))
        team.setdefault(row.get("teacher"), StepStats()).merge(StepStats(counts))
    out = {f"opd/{k}": float(v) for k, v in total.result().items()} if rows else {}
    out.update({f"opd/{k}_s": v for k, v in seconds.items()})
    if len(team) > 1:
        for name, st in team.items():
            out.update({f"opd/teachers/{name}/{k}": float(v) for k, v in st.result().items()
                        if k in TEACHER_STATS})
    return out
