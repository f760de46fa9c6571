"""The student side and the teacher sides from a ``TrainConfig``: what every engine loads before
its first step, and the run's data splits."""

from __future__ import annotations

import dataclasses
import os
import warnings
from typing import Any

import numpy as np
import torch

from crossopd.bridge import ChatFormat, TeacherContext, TemplateError
from crossopd.config import ConfigError, TeacherConfig, TrainConfig, resolve_api_key
from crossopd.hub import load_hf_model, load_hf_tokenizer
from crossopd.prompts import DataError, Example, load_examples
from crossopd.scoring import check_head
from crossopd.sides import StudentSide, TeacherSide, generation_eos
from crossopd.teachers.probe import check_teacher_server
from crossopd.tokens import ByteVocab


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun / accelerate), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    return torch.device(name)


def build_sides(cfg: TrainConfig, student_dtype: torch.dtype | None = None
                ) -> tuple[StudentSide, dict[str, TeacherSide]]:
    """The student and the run's teachers, complete. The student's weights load in float32
    (master weights; ``student.dtype`` is its compute dtype, applied by autocast) unless
    ``student_dtype`` says otherwise (a frozen LoRA base). Tokenizers, prompt formats and the
    teacher servers are checked before any model loads."""
    device = resolve_device(cfg.device)
    sections = cfg.teacher_sections()
    tokenizers = {name: check_teacher(t) for name, t in sections.items()}
    s_tok = load_hf_tokenizer(cfg.student.model)
    _format(s_tok, "student", cfg.student.model)  # fails now, not after loading the models
    student = build_student(cfg, s_tok, device, student_dtype)
    # in-process teachers share the device (docs/teacher.md: several teachers, memory)
    teachers = {name: build_teacher(t, tokenizers[name], name=name, device=device,
                                    max_batch_tokens=cfg.max_batch_tokens)
                for name, t in sections.items()}
    return student, teachers


def check_teacher(t_cfg: TeacherConfig) -> Any:
    """What can fail before any model loads: the teacher server (waited for up to
    ``patience_s`` while it starts), the tokenizer, the prompt format. Returns the tokenizer."""
    if t_cfg.urls:
        check_teacher_server(t_cfg.urls, t_cfg.served_name,
                             resolve_api_key(t_cfg.api_key) or "", patience_s=t_cfg.patience_s)
    src = t_cfg.model or t_cfg.served_name or ""
    tokenizer = load_hf_tokenizer(t_cfg.tokenizer or src)
    _format(tokenizer, "teacher", src, plain_template=t_cfg.plain_template, stop=t_cfg.stop)
    return tokenizer


def build_teacher(t_cfg: TeacherConfig, tokenizer: Any, *, name: str, device: torch.device,
                  max_batch_tokens: int = 8192) -> TeacherSide:
    """One teacher side from its config section: an in-process HF model (``model``) or an HTTP
    teacher (``urls``), its own prompt format with its context, its byte view."""
    if t_cfg.model:
        from crossopd.teachers.hf import HFTeacher

        teacher: Any = HFTeacher(load_hf_model(t_cfg.model, device=str(device)),
                                 max_batch_tokens=max_batch_tokens)
        limit = t_cfg.max_length or teacher.max_length  # the configured context or the model's
    else:
        from crossopd.teachers.http import HTTPTeacher

        teacher = HTTPTeacher(t_cfg.urls, model=t_cfg.served_name, timeout=t_cfg.timeout,
                              retries=t_cfg.retries, max_length=t_cfg.max_length,
                              first_url=int(os.environ.get("RANK", 0)),
                              api_key=resolve_api_key(t_cfg.api_key) or "",
                              patience_s=t_cfg.patience_s)
        # the server's limit: the configured context or its /v1/models, minus the one token a
        # scoring request asks for
        limit = teacher.max_length
    fmt = _format(tokenizer, "teacher", t_cfg.model or t_cfg.served_name or "",
                  plain_template=t_cfg.plain_template, stop=t_cfg.stop, max_length=limit)
    return TeacherSide(name=name, teacher=teacher, fmt=fmt,
                       vocab=ByteVocab.from_pretrained(tokenizer),
                       context=TeacherContext(system=t_cfg.system))


def build_student(cfg: TrainConfig, tokenizer: Any, device: torch.device,
                  dtype: torch.dtype | None = None) -> StudentSide:
    """The student model with its format: turns end on its template's end-of-turn, its
    generation-config EOS ids and, with ``rollout.special_tokens: stop``, any special token."""
    model = load_hf_model(cfg.student.model, dtype=dtype or torch.float32, device=str(device))
    check_head(model)
    vocab = ByteVocab.from_pretrained(tokenizer)
    extra = np.flatnonzero(vocab.special).tolist() if cfg.rollout.special_tokens == "stop" \
        else []
    fmt = _format(tokenizer, "student", cfg.student.model,
                  eos_ids=[*generation_eos(model), *extra])
    return StudentSide.from_model(model, tokenizer, fmt=fmt, vocab=vocab,
                                  compute_dtype=getattr(torch, cfg.student.dtype))


def _format(tokenizer: Any, role: str, name: str, **kwargs: Any) -> ChatFormat:
    """The side's prompt format; a template problem names the config keys that fix it."""
    try:
        return ChatFormat.from_tokenizer(tokenizer, name=name, **kwargs)
    except TemplateError as e:
        keys = ("teacher.plain_template and teacher.stop" if role == "teacher"
                else "a student with a chat template (an instruct model)")
        raise ConfigError(f"{role}: {e} (config: {keys})") from e


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
