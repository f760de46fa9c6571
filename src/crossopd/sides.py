"""The two sides of an OPD step, each complete when built: the student (model, tokenizer, prompt
format, byte view) and a teacher (scorer, prompt format, byte view, teacher-only context).

Step functions take a ``StudentSide`` and a mapping of named ``TeacherSide``s (``Teachers``);
a run with one teacher has one entry. Nothing edits a side after it is built: a side with other
settings is a new side (``dataclasses.replace``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from crossopd.bridge import ChatFormat, TeacherContext
from crossopd.teachers import Teacher
from crossopd.tokens import ByteVocab

# the name of the teacher of a run configured with one ``teacher:`` section
DEFAULT_TEACHER = "teacher"


def generation_eos(model: Any) -> list[int]:
    """The EOS ids of a model's generation config (an int or a list: Llama 3 Instruct ends turns
    on several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@dataclass(frozen=True)
class StudentSide:
    """The student being trained. Its weights stay float32 (master weights) and its forward
    passes run under autocast in ``compute_dtype``, so small updates are not rounded away in
    bf16/fp16."""

    model: Any
    tokenizer: Any
    fmt: ChatFormat
    vocab: ByteVocab
    pad_id: int
    compute_dtype: torch.dtype = torch.float32

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    @classmethod
    def from_model(cls, model: Any, tokenizer: Any, *, fmt: ChatFormat | None = None,
                   vocab: ByteVocab | None = None, compute_dtype: torch.dtype = torch.float32,
                   stop_ids: Iterable[int] = ()) -> StudentSide:
        """From a loaded causal LM and its Hugging Face tokenizer. The format defaults to the
        tokenizer's chat template, ending turns on its end-of-turn marker, the model's
        generation-config EOS ids and ``stop_ids``."""
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
            tokenizer.eos_token_id
        fmt = fmt or ChatFormat.from_tokenizer(
            tokenizer, eos_ids=[*generation_eos(model), *stop_ids])
        return cls(model=model, tokenizer=tokenizer, fmt=fmt,
                   vocab=vocab or ByteVocab.from_pretrained(tokenizer), pad_id=int(pad or 0),
                   compute_dtype=compute_dtype)


@dataclass(frozen=True)
class TeacherSide:
    """One teacher: what scores (in process or over HTTP), its own prompt format (with its
    context length), its byte view, and what only it sees."""

    name: str
    teacher: Teacher
    fmt: ChatFormat
    vocab: ByteVocab
    context: TeacherContext = TeacherContext()

    @classmethod
    def from_tokenizer(cls, teacher: Teacher, tokenizer: Any, *, name: str = DEFAULT_TEACHER,
                       fmt: ChatFormat | None = None,
                       context: TeacherContext | None = None) -> TeacherSide:
        """The format defaults to the tokenizer's chat template with the scorer's context
        (``teacher.max_length``, when it knows it)."""
        fmt = fmt or ChatFormat.from_tokenizer(
            tokenizer, max_length=getattr(teacher, "max_length", None))
        return cls(name=name, teacher=teacher, fmt=fmt,
                   vocab=ByteVocab.from_pretrained(tokenizer),
                   context=context or TeacherContext())


Teachers = Mapping[str, TeacherSide]


def one_teacher(side: TeacherSide) -> dict[str, TeacherSide]:
    """The mapping of a run with a single teacher."""
    return {side.name: side}


def hf_pair(student: Any, student_tokenizer: Any, teacher: Any, teacher_tokenizer: Any
            ) -> tuple[StudentSide, dict[str, TeacherSide]]:
    """A student and one in-process teacher from loaded HF models and tokenizers, each side in
    its tokenizer's own chat template (the benchmarks' and the tests' pairs)."""
    from crossopd.teachers.hf import HFTeacher

    side = TeacherSide.from_tokenizer(HFTeacher(teacher), teacher_tokenizer)
    return StudentSide.from_model(student, student_tokenizer), one_teacher(side)
