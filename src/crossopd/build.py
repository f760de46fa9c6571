"""The student, the teacher and both prompt formats from a ``TrainConfig``: what every engine
(the native recipe, the TRL integration) loads before its first step."""

from __future__ import annotations

import os
import warnings
from typing import Any

import numpy as np
import torch

from crossopd.bridge import ChatFormat, TeacherContext, TemplateError
from crossopd.config import ConfigError, TrainConfig, resolve_api_key
from crossopd.hub import load_hf_model, load_hf_tokenizer
from crossopd.opd import Components, generation_eos
from crossopd.prompts import Example, load_examples
from crossopd.scoring import check_head
from crossopd.teachers.probe import check_teacher_server


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun / accelerate), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    return torch.device(name)


def build_components(cfg: TrainConfig, student_dtype: torch.dtype | None = None) -> Components:
    """The student's weights load in float32 (master weights; ``student.dtype`` is its compute
    dtype, applied by autocast) unless ``student_dtype`` says otherwise (a frozen LoRA base).
    Tokenizers, prompt formats and the teacher server are checked before any model loads."""
    device = resolve_device(cfg.device)
    dtype = student_dtype or torch.float32
    t_cfg = cfg.teacher
    api_key = resolve_api_key(t_cfg.api_key) or ""
    if t_cfg.urls:
        check_teacher_server(t_cfg.urls, t_cfg.served_name, api_key)
    t_src = t_cfg.model or t_cfg.served_name or ""
    s_tok = load_hf_tokenizer(cfg.student.model)
    t_tok = load_hf_tokenizer(t_cfg.tokenizer or t_src)
    teacher_fmt = _format(t_tok, "teacher", t_src, plain_template=t_cfg.plain_template,
                          stop=t_cfg.stop)
    _format(s_tok, "student", cfg.student.model)  # fails now, not after loading the models
    student = load_hf_model(cfg.student.model, dtype=dtype, device=str(device))
    check_head(student)
    student_fmt = _format(s_tok, "student", cfg.student.model, eos_ids=generation_eos(student))
    if t_cfg.model:
        from crossopd.teachers.hf import HFTeacher

        teacher = HFTeacher(load_hf_model(t_cfg.model, device=str(device)),
                            max_batch_tokens=cfg.max_batch_tokens)
    else:
        from crossopd.teachers.http import HTTPTeacher

        teacher = HTTPTeacher(t_cfg.urls, model=t_cfg.served_name, timeout=t_cfg.timeout,
                              retries=t_cfg.retries, max_length=t_cfg.max_length,
                              first_url=int(os.environ.get("RANK", 0)), api_key=api_key,
                              patience_s=t_cfg.patience_s)
    # HTTP: the server's limit (configured context or its /v1/models, minus the one token a
    # scoring request asks for); in process: the configured context or the model's
    limit = teacher.max_length if t_cfg.urls else t_cfg.max_length or teacher.max_length
    teacher_fmt.max_length = limit or teacher_fmt.max_length
    c = Components.from_tokenizers(student, s_tok, teacher, t_tok, student_fmt=student_fmt,
                                   teacher_fmt=teacher_fmt,
                                   context=TeacherContext(system=t_cfg.system))
    c.compute_dtype = getattr(torch, cfg.student.dtype)
    if cfg.rollout.special_tokens == "stop":
        c.student_fmt.stop_ids |= {int(i) for i in np.flatnonzero(c.sv.special)}
    return c


def _format(tokenizer: Any, role: str, name: str, **kwargs: Any) -> ChatFormat:
    """The side's prompt format; a template problem names the config keys that fix it."""
    try:
        return ChatFormat.from_tokenizer(tokenizer, name=name, **kwargs)
    except TemplateError as e:
        keys = ("teacher.plain_template and teacher.stop" if role == "teacher"
                else "a student with a chat template (an instruct model)")
        raise ConfigError(f"{role}: {e} (config: {keys})") from e


def load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training prompts, held-out prompts) as the data section says."""
    examples = load_examples(cfg.data.path, cfg.data.answer_column, cfg.teacher.reference_column)
    if cfg.data.heldout_path:
        heldout = load_examples(cfg.data.heldout_path, cfg.data.answer_column,
                                cfg.teacher.reference_column)
    else:
        n = heldout_rows(len(examples), cfg.data.heldout_size, cfg.data.path)
        examples, heldout = examples[:-n], examples[-n:]
    return examples, heldout[: cfg.eval_prompts]


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
