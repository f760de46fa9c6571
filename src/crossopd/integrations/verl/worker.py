"""The verl agent-loop manager and worker whose teacher step is crossopd's.

Per sample, before verl pads it: the messages (``raw_prompt``) are bridged into the teacher's own
prompt format, the response bytes are spelled in the teacher's vocabulary and scored (by
crossopd's teacher: an HTTP pool or an in-process model, or by verl's own teacher replicas
serving the cross-family teacher), aligned (DPCA), and credited on the rollout log-probs. The
targets go into ``teacher_logprobs`` and tokens without a signal leave ``response_mask`` (so
verl's token mean runs over signal tokens); each sample's counts ride along in
``crossopd_stats`` and the manager reports their sums as ``opd/...``.

Launch: ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=``
``crossopd.integrations.verl.worker.CrossOPDAgentLoopManager`` and a ``+crossopd`` section
(``VerlSettings``). Three of ``AgentLoopWorker``'s / ``AgentLoopManager``'s private methods are
extended; ``check_private_api`` fails loudly when their signatures change.
"""

from __future__ import annotations

import asyncio
import inspect
from dataclasses import dataclass, field
from typing import Any

from verl.experimental.agent_loop.agent_loop import AgentLoopManager, AgentLoopWorker

from crossopd.bridge import ChatFormat
from crossopd.config import ConfigError, TeacherConfig, build_section
from crossopd.credit import get_rule
from crossopd.integrations.verl.targets import (
    as_messages,
    bridge_request,
    check_single_turn,
    teacher_span,
    verl_targets,
)
from crossopd.sides import DEFAULT_TEACHER, StudentSide, TeacherSide
from crossopd.stats import TEACHER_STATS, StepStats
from crossopd.teaching import score_requests
from crossopd.tokens import ByteVocab

STATS_FIELD = "crossopd_stats"
SUPPORTED = "verl==0.9.1"
SIGNATURES: dict[tuple[type, str], tuple[str, ...]] = {
    (AgentLoopWorker, "_agent_loop_postprocess"): ("output", "validate", "kwargs"),
    (AgentLoopWorker, "_compute_teacher_logprobs"): ("output", "prompt_ids", "response_ids",
                                                     "validate", "sample_kwargs"),
    (AgentLoopManager, "_performance_metrics"): ("metrics", "output"),
}


def check_private_api() -> None:
    """Raise ``ImportError`` (one line) when a verl method the worker extends changed."""
    import verl

    for (cls, name), expected in SIGNATURES.items():
        method = getattr(cls, name, None)
        params = tuple(inspect.signature(method).parameters)[1:] if method else ()
        if params != expected:
            raise ImportError(f"verl {verl.__version__}: {cls.__name__}.{name} takes "
                              f"({', '.join(params)}), not ({', '.join(expected)}); crossopd's "
                              f"verl plugin needs {SUPPORTED}")


@dataclass
class VerlSettings:
    """The ``crossopd:`` section of a verl launch (``+crossopd.teacher.urls=[...]`` ...)."""

    # crossopd's teacher (urls: an HTTP pool, model: in process) or, with neither, the format
    # of the teacher verl's own pool serves (distillation.teacher_models)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several of crossopd's teachers by name; a sample goes to the one its `teacher_key` field
    # names (verl's own routing field, as distillation.teacher_key)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    teacher_key: str = "data_source"
    credit_rule: str = "proportional"
    special_tokens: str = "penalize"  # penalize | mask (verl's rollout decides where turns end)
    special_penalty: float = 5.0
    max_batch_tokens: int = 8192

    def special_token_penalty(self) -> float | None:
        return self.special_penalty if self.special_tokens == "penalize" else None


def settings_from(config: Any) -> VerlSettings:
    """``VerlSettings`` from a verl (OmegaConf) config; one-line errors name the key."""
    from omegaconf import OmegaConf

    raw = config.get("crossopd") if hasattr(config, "get") else None
    data = OmegaConf.to_container(raw, resolve=True) if raw is not None else {}
    settings = build_section(VerlSettings, data or {}, "crossopd.")
    try:
        get_rule(settings.credit_rule)
    except ValueError as e:
        raise ConfigError(f"crossopd.credit_rule: {e}") from e
    if settings.special_tokens not in ("penalize", "mask"):
        raise ConfigError(f"crossopd.special_tokens {settings.special_tokens!r}: penalize or mask")
    t = settings.teacher
    for name, each in settings.teachers.items():
        if bool(each.model) == bool(each.urls):
            raise ConfigError(f"crossopd.teachers.{name}: set model (in process) or urls (HTTP)")
    if settings.teachers:
        if t.model or t.urls:
            raise ConfigError("set crossopd.teacher or crossopd.teachers, not both")
        return settings
    if t.model and t.urls:
        raise ConfigError("crossopd.teacher: set model (in process) or urls (HTTP), not both")
    if not (t.model or t.urls):
        pool = _pool_teacher(config)
        if pool is None:
            raise ConfigError("crossopd: no teacher: set +crossopd.teacher.urls=[...] (crossopd's "
                              "HTTP teacher) or distillation.enabled=True with "
                              "distillation.teacher_models.teacher_model.model_path (verl's pool)")
    return settings


def _pool_teacher(config: Any) -> Any:
    """verl's single teacher pool config, when distillation is on (None otherwise)."""
    dist = config.get("distillation") if hasattr(config, "get") else None
    if not dist or not dist.get("enabled"):
        return None
    models = dist.get("teacher_models") or {}
    if len(models) != 1:
        raise ConfigError("crossopd on verl scores with one teacher pool; "
                          f"distillation.teacher_models has {', '.join(models) or 'none'}")
    return next(iter(models.values()))


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
    pool: Any = None  # verl's AsyncTeacherLLMServerManager when verl's replicas score

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

    async def run(self, output: Any, kwargs: dict) -> None:
        """Fill ``output``'s teacher fields and trim its response mask, in place."""
        check_single_turn(output.response_mask, output.num_turns)
        messages = as_messages(kwargs["raw_prompt"])
        teacher = self.teacher_for(kwargs)
        section = self.settings.teachers.get(teacher.name, self.settings.teacher)
        column = section.reference_column
        reference = (kwargs.get("extra_info") or {}).get(column) if column else None
        req = bridge_request(self.student, teacher, messages, output.response_ids, reference)
        if req.overflow or req.stop_end <= req.response_start:
            t_lp = None
        elif self.pool is not None:
            _, shifted = await self.pool.compute_teacher_logprobs_single(
                sequence_ids=req.teacher_ids)
            t_lp = teacher_span(req, shifted)
        else:  # crossopd's own teacher blocks on HTTP or a forward pass: off the event loop
            (t_lp,) = await asyncio.to_thread(score_requests, teacher, [req])
        t = verl_targets(self.student, teacher, req, output.prompt_ids,
                         output.response_ids, output.response_logprobs or [], t_lp,
                         rule=self.settings.credit_rule,
                         special_penalty=self.settings.special_token_penalty())
        output.response_mask = t.response_mask
        output.extra_fields["teacher_ids"] = t.teacher_ids
        output.extra_fields["teacher_logprobs"] = t.teacher_logprobs
        output.extra_fields[STATS_FIELD] = {"teacher": teacher.name, **t.stats.totals}


def student_side(tokenizer: Any) -> StudentSide:
    """The student as the teacher step sees it: its tokenizer's format and byte view (verl
    owns the model)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    return StudentSide(model=None, tokenizer=tokenizer, fmt=ChatFormat.from_tokenizer(tokenizer),
                       vocab=ByteVocab.from_pretrained(tokenizer), pad_id=int(pad or 0))


def teacher_step(config: Any, tokenizer: Any, pool: Any = None) -> TeacherStep:
    """The worker's teacher step from a verl config and the student's tokenizer."""
    from crossopd.build import build_teacher, check_teacher, resolve_device

    settings = settings_from(config)
    t_cfg = settings.teacher
    student = student_side(tokenizer)
    own = settings.teachers or ({DEFAULT_TEACHER: t_cfg} if t_cfg.model or t_cfg.urls else {})
    if own:
        tokenizers = {name: check_teacher(t) for name, t in own.items()}  # all before models
        teachers = {name: build_teacher(t, tokenizers[name], name=name,
                                        device=resolve_device("auto"),
                                        max_batch_tokens=settings.max_batch_tokens)
                    for name, t in own.items()}
        return TeacherStep(student, teachers, settings)
    from crossopd.hub import load_hf_tokenizer

    spec = _pool_teacher(config)
    inference = spec.get("inference") or {}
    limit = inference.get("max_model_len")
    t_tok = load_hf_tokenizer(t_cfg.tokenizer or spec.get("model_path"))
    fmt = ChatFormat.from_tokenizer(t_tok, plain_template=t_cfg.plain_template, stop=t_cfg.stop,
                                    max_length=limit - 1 if limit else None)
    teacher = TeacherSide.from_tokenizer(None, t_tok, fmt=fmt)  # type: ignore[arg-type]
    rollout = config.actor_rollout_ref.rollout
    pool_context_check(teacher, student, limit, rollout.prompt_length, rollout.response_length)
    return TeacherStep(student, {DEFAULT_TEACHER: teacher}, settings, pool=pool)


class CrossOPDAgentLoopWorker(AgentLoopWorker):
    """``AgentLoopWorker`` whose teacher step is crossopd's (validation samples get none, as
    in verl's own)."""

    def __init__(self, config: Any, llm_client: Any, teacher_client: Any = None,
                 reward_loop_worker_handles: Any = None) -> None:
        check_private_api()
        own = settings_from(config)
        if own.teachers or own.teacher.model or own.teacher.urls:
            # crossopd's own teacher scores: verl's teacher client is not built (its pool may
            # be empty), only its distillation loss path stays on in the actor
            from omegaconf import OmegaConf

            config = OmegaConf.merge(config, {"distillation": {"enabled": False}})
        super().__init__(config, llm_client, teacher_client, reward_loop_worker_handles)
        self.opd = teacher_step(config, self.tokenizer,
                                pool=getattr(self, "teacher_server_manager", None))

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> Any:
        # before verl pads the response mask: crossopd removes the tokens without a signal
        if not validate:
            await self.opd.run(output, kwargs)
        return await super()._agent_loop_postprocess(output, validate, **kwargs)

    async def _compute_teacher_logprobs(self, output: Any, prompt_ids: list[int],
                                        response_ids: list[int], validate: bool,
                                        sample_kwargs: dict | None = None) -> None:
        """Done: crossopd's step ran in ``_agent_loop_postprocess``, on the student's ids."""


def opd_metrics(stats: Any) -> dict[str, float]:
    """``opd/<name>`` for a batch: the per-sample counts summed, then the ratios; with several
    teachers also ``opd/teachers/<teacher>/<name>``."""
    rows = [s for s in (stats if stats is not None else []) if s]
    total, team = StepStats(), {}
    for row in rows:
        counts = {k: v for k, v in row.items() if k != "teacher"}
        total.merge(StepStats(counts))
        team.setdefault(row.get("teacher"), StepStats()).merge(StepStats(counts))
    out = {f"opd/{k}": float(v) for k, v in total.result().items()} if rows else {}
    if len(team) > 1:
        for name, st in team.items():
            out.update({f"opd/teachers/{name}/{k}": float(v) for k, v in st.result().items()
                        if k in TEACHER_STATS})
    return out


class CrossOPDAgentLoopManager(AgentLoopManager):
    """``AgentLoopManager`` running ``CrossOPDAgentLoopWorker``s; crossopd's step statistics
    join verl's agent-loop timing dict (logged as ``timing_s/opd/...``)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        import ray

        self.agent_loop_workers_class = ray.remote(CrossOPDAgentLoopWorker)
        super().__init__(*args, **kwargs)

    def _performance_metrics(self, metrics: list, output: Any) -> dict[str, float]:
        timing = super()._performance_metrics(metrics, output)
        timing.update(opd_metrics(output.non_tensor_batch.get(STATS_FIELD)))
        return timing


__all__ = ["CrossOPDAgentLoopManager", "CrossOPDAgentLoopWorker", "TeacherStep",
           "VerlSettings", "check_private_api", "opd_metrics"]
