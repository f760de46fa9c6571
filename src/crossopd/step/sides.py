"""The two sides of an OPD step, each complete when built: the student (model, tokenizer, prompt
format, byte view) and a teacher (scorer, prompt format, byte view, teacher-only context).

Step functions take a ``StudentSide`` and a mapping of named ``TeacherSide``s (``Teachers``);
a run with one teacher has one entry. Nothing edits a side after it is built: a side with other
settings is a new side (``dataclasses.replace``).
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_model, load_hf_tokenizer
from crossopd.step.bridge import ChatFormat, TeacherContext, TemplateError
from crossopd.step.settings import ConfigError, TeacherConfig, resolve_api_key
from crossopd.step.tool_calls import ToolSyntax
from crossopd.teachers import Teacher
from crossopd.teachers.probe import check_teacher_server

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
    # how tool calls are written when the template has no syntax for them (``hermes``)
    tool_format: str | None = None

    def tool_syntax(self) -> ToolSyntax:
        return ToolSyntax.of(self.fmt, self.tool_format)

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
    scorer: Teacher  # what scores: in process (HFTeacher) or over HTTP (HTTPTeacher)
    fmt: ChatFormat
    vocab: ByteVocab
    context: TeacherContext = TeacherContext()
    # how tool calls are written when the template has no syntax for them (``hermes``)
    tool_format: str | None = None

    def tool_syntax(self) -> ToolSyntax:
        return ToolSyntax.of(self.fmt, self.tool_format)

    @classmethod
    def from_tokenizer(cls, scorer: Teacher, tokenizer: Any, *, name: str = DEFAULT_TEACHER,
                       fmt: ChatFormat | None = None,
                       context: TeacherContext | None = None) -> TeacherSide:
        """The format defaults to the tokenizer's chat template with the scorer's context
        (``teacher.max_length``, when it knows it)."""
        fmt = fmt or ChatFormat.from_tokenizer(
            tokenizer, max_length=getattr(scorer, "max_length", None))
        return cls(name=name, scorer=scorer, fmt=fmt,
                   vocab=ByteVocab.from_pretrained(tokenizer),
                   context=context or TeacherContext())


Teachers = Mapping[str, TeacherSide]


def one_teacher(side: TeacherSide) -> dict[str, TeacherSide]:
    """The mapping of a run with a single teacher."""
    return {side.name: side}


def side_format(tokenizer: Any, role: str, name: str, **kwargs: Any) -> ChatFormat:
    """A side's prompt format; a template problem names the settings that fix it."""
    try:
        return ChatFormat.from_tokenizer(tokenizer, name=name, **kwargs)
    except TemplateError as e:
        keys = ("teacher.plain_template and teacher.stop" if role == "teacher"
                else "a student with a chat template (an instruct model)")
        raise ConfigError(f"{role}: {e} (config: {keys})") from e


# ------------------------------------------------------------------------------- building teachers
# One builder for every engine: the recipe's ``teacher:`` / ``teachers:``, TRL's ``OPDTrainer``
# and the verl worker all describe their teachers as ``TeacherConfig`` sections.
def check_teacher(spec: TeacherConfig, tokenizer: Any = None) -> Any:
    """What can fail before any model loads: the teacher server (waited for up to
    ``patience_s`` while it starts), the tokenizer, the prompt format. Returns the tokenizer
    (``tokenizer`` when given)."""
    if spec.urls:
        check_teacher_server(spec.urls, spec.served_name, resolve_api_key(spec.api_key) or "",
                             patience_s=spec.patience_s)
    src = spec.model or spec.served_name or ""
    if tokenizer is None:
        if not (spec.tokenizer or src):
            raise ConfigError("teacher: no tokenizer: set teacher.tokenizer (or served_name as "
                              "a hub id)")
        tokenizer = load_hf_tokenizer(spec.tokenizer or src)
    side_format(tokenizer, "teacher", src, plain_template=spec.plain_template, stop=spec.stop)
    return tokenizer


def teacher_side(spec: TeacherConfig, tokenizer: Any, *, name: str = DEFAULT_TEACHER,
                 device: torch.device | str = "cpu", max_batch_tokens: int = 8192,
                 model: Any = None) -> TeacherSide:
    """One teacher side: an in-process HF model (``spec.model``, or the loaded ``model``) or an
    HTTP teacher (``spec.urls``, each process starting at its own URL), its own prompt format
    with its context, its byte view and its teacher-only context."""
    if model is not None or spec.model:
        from crossopd.teachers.hf import HFTeacher

        model = model if model is not None else load_hf_model(spec.model, device=str(device))
        scorer: Any = HFTeacher(model, max_batch_tokens=max_batch_tokens)
        limit = spec.max_length or scorer.max_length  # the configured context or the model's
    else:
        from crossopd.teachers.http import HTTPTeacher

        scorer = HTTPTeacher(spec.urls, model=spec.served_name, timeout=spec.timeout,
                             retries=spec.retries, max_length=spec.max_length,
                             first_url=int(os.environ.get("RANK", 0)),
                             api_key=resolve_api_key(spec.api_key) or "",
                             patience_s=spec.patience_s)
        # the server's limit: the configured context or its /v1/models, minus the one token a
        # scoring request asks for
        limit = scorer.max_length
    fmt = side_format(tokenizer, "teacher", spec.model or spec.served_name or "",
                      plain_template=spec.plain_template, stop=spec.stop, max_length=limit)
    return TeacherSide(name=name, scorer=scorer, fmt=fmt,
                       vocab=ByteVocab.from_pretrained(tokenizer),
                       context=TeacherContext(system=spec.system), tool_format=spec.tool_format)


def check_teachers(sections: Mapping[str, TeacherConfig]) -> dict[str, Any]:
    """``check_teacher`` for every teacher of a run: their tokenizers by name."""
    return {name: check_teacher(spec) for name, spec in sections.items()}


def build_teachers(sections: Mapping[str, TeacherConfig], tokenizers: Mapping[str, Any], *,
                   device: torch.device | str = "cpu",
                   max_batch_tokens: int = 8192) -> dict[str, TeacherSide]:
    """Every teacher of a run by name (``tokenizers`` from ``check_teachers``, which runs
    before any model loads); in-process teachers share ``device``."""
    return {name: teacher_side(spec, tokenizers[name], name=name, device=device,
                               max_batch_tokens=max_batch_tokens)
            for name, spec in sections.items()}


def hf_pair(student: Any, student_tokenizer: Any, teacher: Any, teacher_tokenizer: Any
            ) -> tuple[StudentSide, dict[str, TeacherSide]]:
    """A student and one in-process teacher from loaded HF models and tokenizers, each side in
    its tokenizer's own chat template (the benchmarks' and the tests' pairs)."""
    from crossopd.teachers.hf import HFTeacher

    side = TeacherSide.from_tokenizer(HFTeacher(teacher), teacher_tokenizer)
    return StudentSide.from_model(student, student_tokenizer), one_teacher(side)
