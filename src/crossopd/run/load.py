"""What a recipe run loads before its first step, from its ``TrainConfig``: the student side, the
teacher sides (through the one teacher builder, ``crossopd.step.sides``) and the data splits."""

from __future__ import annotations

import dataclasses
import warnings
from typing import Any

import numpy as np
import torch

from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_model, load_hf_tokenizer, resolve_device
from crossopd.models.scoring import check_head
from crossopd.run.config import ConfigError, TrainConfig
from crossopd.step.bridge import TemplateError
from crossopd.step.data import DataError, Example, load_examples
from crossopd.step.multiturn import Toolbox
from crossopd.step.sides import (
    StudentSide,
    TeacherSide,
    build_teachers,
    check_teachers,
    generation_eos,
    side_format,
)


def build_sides(cfg: TrainConfig, student_dtype: torch.dtype | None = None
                ) -> tuple[StudentSide, dict[str, TeacherSide]]:
    """The student and the run's teachers, complete. The student's weights load in float32
    (master weights; ``student.dtype`` is its compute dtype, applied by autocast) unless
    ``student_dtype`` says otherwise (a frozen LoRA base). Tokenizers, prompt formats and the
    teacher servers are checked before any model loads."""
    device = resolve_device(cfg.device)
    sections = cfg.teacher_sections()
    tokenizers = check_teachers(sections)  # fails now, not after loading the models
    s_tok = load_hf_tokenizer(cfg.student.model)
    side_format(s_tok, "student", cfg.student.model)
    student = build_student(cfg, s_tok, device, student_dtype)
    # in-process teachers share the device (docs/teacher.md: several teachers, memory)
    teachers = build_teachers(sections, tokenizers, device=device,
                              max_batch_tokens=cfg.max_batch_tokens)
    return student, teachers


def build_student(cfg: TrainConfig, tokenizer: Any, device: torch.device,
                  dtype: torch.dtype | None = None) -> StudentSide:
    """The student model with its format: turns end on its template's end-of-turn, its
    generation-config EOS ids and, with ``rollout.special_tokens: stop``, any special token."""
    model = load_hf_model(cfg.student.model, dtype=dtype or torch.float32, device=str(device))
    check_head(model)
    vocab = ByteVocab.from_pretrained(tokenizer)
    extra = np.flatnonzero(vocab.special).tolist() if cfg.rollout.special_tokens == "stop" \
        else []
    fmt = side_format(tokenizer, "student", cfg.student.model,
                  eos_ids=[*generation_eos(model), *extra])
    side = StudentSide.from_model(model, tokenizer, fmt=fmt, vocab=vocab,
                                  compute_dtype=getattr(torch, cfg.student.dtype))
    return dataclasses.replace(side, tool_format=cfg.student.tool_format)


def load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training prompts, held-out prompts) as the data section says; each row's teacher is
    checked against the run's teachers now, before any model loads."""
    d = cfg.data
    reference = next(iter(cfg.teacher_sections().values())).reference_column
    examples = routed(load_examples(d.path, d.answer_column, reference, d.teacher_column),
                      cfg, d.path)
    if d.heldout_path:
        heldout = routed(load_examples(d.heldout_path, d.answer_column, reference,
                                       d.teacher_column), cfg, d.heldout_path)
    else:
        n = heldout_rows(len(examples), d.heldout_size, d.path)
        examples, heldout = examples[:-n], examples[-n:]
    return examples, heldout[: cfg.eval_prompts]


def routed(examples: list[Example], cfg: TrainConfig, path: str) -> list[Example]:
    """``examples`` with rows without a teacher sent to ``data.default_teacher``. A row naming a
    teacher the run does not have, or naming one at all under ``teacher_mix`` (every teacher
    scores every row), is a data error with its row number."""
    names = list(cfg.teacher_sections())
    for i, e in enumerate(examples):
        if e.teacher is None:
            continue
        if cfg.teacher_mix:
            raise DataError(f"{path} row {i}: names teacher {e.teacher!r} (column "
                            f"{cfg.data.teacher_column}) but teacher_mix has every teacher "
                            "score every row: drop the column or teacher_mix")
        if e.teacher not in names:
            raise DataError(f"{path} row {i}: no teacher named {e.teacher!r}; teachers: "
                            f"{', '.join(names)}")
    default = cfg.data.default_teacher
    if default is None:
        return examples
    return [e if e.teacher else dataclasses.replace(e, teacher=default) for e in examples]


def heldout_rows(rows: int, heldout_size: int, path: str) -> int:
    """At most a quarter of a small file is held out (with a warning), so ``heldout_size: 16``
    does not train a 20-row file on 4 rows."""
    if rows < 2:
        raise ConfigError(f"{path} has {rows} row(s): need at least 2 (one to train on, one "
                          "held out), or set data.heldout_path")
    cap = max(1, rows // 4)
    if heldout_size > cap:
        warnings.warn(f"{path} has {rows} rows: holding out {cap} (a quarter), not "
                      f"data.heldout_size={heldout_size}, so {rows - cap} remain for training; "
                      "set data.heldout_size or data.heldout_path to choose", stacklevel=2)
        return cap
    return heldout_size


def import_object(spec: str, key: str) -> Any:
    """``package.module:name`` imported; a clear error naming ``key`` otherwise."""
    import importlib

    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: {spec!r} is not an import path 'package.module:name'")
    try:
        module = importlib.import_module(module_name)
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything
        raise ConfigError(f"{key}: cannot import {module_name!r}: {type(e).__name__}: "
                          f"{e}") from e
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ConfigError(f"{key}: {module_name!r} has no {attr!r}") from None


def load_toolbox(cfg: TrainConfig) -> Toolbox | None:
    """The tools and environment factory of a run with tools (None without)."""
    r = cfg.rollout
    if not r.tools and not r.environment:
        return None
    tools = [import_object(t, "rollout.tools") for t in r.tools]
    for spec, fn in zip(r.tools, tools):
        if not callable(fn):
            raise ConfigError(f"rollout.tools: {spec!r} is not a function")
    env = import_object(r.environment, "rollout.environment") if r.environment else None
    return Toolbox(tools, env)


def check_tool_sides(student: StudentSide, teachers: dict[str, TeacherSide]) -> None:
    """Before the first step of a run with tools: every side can write a tool call and render
    a tool turn (a template that drops ``tool_calls`` or a plain template cannot)."""
    probe = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": "probe", "arguments": {}}}]},
             {"role": "tool", "content": "1"}]
    for where, side in (("student", student), *((f"teacher {n}", t) for n, t in
                                                 teachers.items())):
        try:  # a tool turn first (a plain template has none), then a call in its syntax
            side.fmt.render([probe[0], {"role": "assistant", "content": "x"}, probe[2]])
            side.fmt.render(side.tool_syntax().messages(probe))
        except TemplateError as e:
            raise ConfigError(f"rollout.tools: the {where} cannot take part in tool "
                              f"trajectories: {e}") from e
