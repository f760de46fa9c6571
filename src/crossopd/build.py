"""The student, the teacher and both prompt formats from a ``TrainConfig``: what every engine
(the native recipe, the TRL integration) loads before its first step."""

from __future__ import annotations

import os

import numpy as np
import torch

from crossopd.bridge import ChatFormat, TeacherContext
from crossopd.config import TrainConfig
from crossopd.hub import load_hf_model, load_hf_tokenizer
from crossopd.opd import Components, generation_eos
from crossopd.prompts import Example, load_examples
from crossopd.scoring import check_head


def resolve_device(name: str) -> torch.device:
    """``auto``: this process's GPU (``LOCAL_RANK`` under torchrun / accelerate), else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")
        return torch.device("cpu")
    return torch.device(name)


def build_components(cfg: TrainConfig, student_dtype: torch.dtype | None = None) -> Components:
    """The student's weights load in float32 (master weights; ``student.dtype`` is its compute
    dtype, applied by autocast) unless ``student_dtype`` says otherwise (a frozen LoRA base)."""
    device = resolve_device(cfg.device)
    dtype = student_dtype or torch.float32
    s_tok = load_hf_tokenizer(cfg.student.model)
    student = load_hf_model(cfg.student.model, dtype=dtype, device=str(device))
    check_head(student)
    student_fmt = ChatFormat.from_tokenizer(s_tok, name=cfg.student.model,
                                            eos_ids=generation_eos(student))
    t_cfg = cfg.teacher
    if t_cfg.model:
        from crossopd.teachers.hf import HFTeacher

        teacher = HFTeacher(load_hf_model(t_cfg.model, device=str(device)),
                            max_batch_tokens=cfg.max_batch_tokens)
        t_src = t_cfg.model
    else:
        from crossopd.teachers.http import HTTPTeacher

        teacher = HTTPTeacher(t_cfg.urls, model=t_cfg.served_name, timeout=t_cfg.timeout,
                              retries=t_cfg.retries, max_length=t_cfg.max_length,
                              first_url=int(os.environ.get("RANK", 0)))
        t_src = t_cfg.served_name or ""
    t_tok = load_hf_tokenizer(t_cfg.tokenizer or t_src)
    teacher_fmt = ChatFormat.from_tokenizer(t_tok, plain_template=t_cfg.plain_template,
                                            stop=t_cfg.stop, name=t_src)
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


def load_splits(cfg: TrainConfig) -> tuple[list[Example], list[Example]]:
    """(training prompts, held-out prompts) as the data section says."""
    examples = load_examples(cfg.data.path, cfg.data.answer_column, cfg.teacher.reference_column)
    if cfg.data.heldout_path:
        heldout = load_examples(cfg.data.heldout_path, cfg.data.answer_column,
                                cfg.teacher.reference_column)
    else:
        if len(examples) <= cfg.data.heldout_size:
            raise ValueError(f"{cfg.data.path} has {len(examples)} rows; need more than "
                             f"data.heldout_size={cfg.data.heldout_size} to hold some out")
        examples, heldout = examples[: -cfg.data.heldout_size], examples[-cfg.data.heldout_size:]
    return examples, heldout[: cfg.eval_prompts]
