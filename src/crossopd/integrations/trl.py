"""crossopd inside TRL: ``OPDTrainer`` is ``GRPOTrainer`` with per-token advantages from a
teacher of any family.

TRL samples; crossopd then bridges each conversation to the teacher's own prompt format, scores
the response bytes with the teacher, aligns (DPCA), assigns credit on the rollout log-probs and
writes ``A = clamp(q - old logp)``. Tokens without a signal leave the loss mask (not the
attention mask), so the token mean runs over signal tokens exactly as in the native engine.
Built like a ``GOLDTrainer``::

    trainer = OPDTrainer(model="smollm2", teacher="gemma3-270m", args=OPDConfig(...),
                         train_dataset=dataset)

The YAML engine (``engine: trl``) builds this same class (``crossopd.engines.trl``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_model, load_hf_tokenizer
from crossopd.step.data import Example
from crossopd.step.loss import LossConfig
from crossopd.step.multiturn import tool_schema
from crossopd.step.score import score_rollouts
from crossopd.step.settings import HELP, StepSettings, TeacherConfig, option
from crossopd.step.sides import StudentSide, TeacherSide, check_teacher, one_teacher, teacher_side
from crossopd.step.stats import TEACHER_STATS, StepStats, add_timings, timed
from crossopd.step.trajectory import Trajectory, env_groups, trajectory_from_mask
from crossopd.step.update import advantage_stats
from crossopd.teachers import TeacherError

try:
    from trl import GRPOConfig

    from crossopd.integrations.trl_private import (
        GRPOHooks,
        check_private_api,
        log_metrics,
        rollout_logps,
        rollout_tools,
    )
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "crossopd's TRL integration needs the trl extra: pip install 'crossopd[trl]' (or "
        "`make install`)") from e

STAT_PREFIX = "opd/"


def no_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """GRPOTrainer requires a reward function; OPD's signal is the advantage written below."""
    return [0.0] * len(prompts)


@dataclass
class OPDConfig(GRPOConfig):
    """``GRPOConfig`` with OPD's defaults (no KL term, token-mean ``dapo`` loss, clip 0.2/0.28,
    dual clip 10, dropout off) and crossopd's knobs."""

    credit_rule: str = option("proportional", HELP["credit_rule"])
    adv_clamp: float = option(10.0, HELP["adv_clamp"])
    special_tokens: str = option("penalize", HELP["special_tokens"])
    special_penalty: float = option(5.0, HELP["special_penalty"])
    unparsed_calls: str = option("score", HELP["unparsed_calls"])
    teacher_patience_s: float = option(300.0, HELP["teacher.patience_s"])
    teacher_timeout: float = option(120.0, HELP["teacher.timeout"])
    teacher_retries: int = option(3, HELP["teacher.retries"])
    teacher_served_name: str | None = option(None, HELP["teacher.served_name"])
    teacher_api_key: str | None = option(None, HELP["teacher.api_key"])
    teacher_plain_template: str | None = option(None, HELP["teacher.plain_template"])
    teacher_stop: str | None = option(None, HELP["teacher.stop"])
    teacher_system: str | None = option(None, HELP["teacher.system"])
    teacher_max_length: int | None = option(None, HELP["teacher.max_length"])
    opd_max_batch_tokens: int = option(8192, HELP["max_batch_tokens"])
    # OPD's defaults for GRPO fields
    beta: float = 0.0
    loss_type: str = "dapo"
    epsilon_high: float | None = 0.28
    delta: float | None = 10.0
    disable_dropout: bool = True
    remove_unused_columns: bool | None = False
    top_k: int = 0

    def __post_init__(self) -> None:
        # TRL turns bf16 on when it is unset. Without a GPU that means bf16 autocast on the CPU,
        # which most x86 CPUs run in software: a step of docs/scale.md's example took 40 s
        # instead of 8 s. Set bf16=True to have it anyway.
        if self.bf16 is None and not self.fp16 and (self.use_cpu or not torch.cuda.is_available()):
            self.bf16 = False
        super().__post_init__()

    def step_settings(self, mix: Mapping[str, float] | None = None) -> StepSettings:
        """The step settings of this trainer: crossopd's fields, TRL's sampling and its clip
        (``epsilon``, ``epsilon_high``, dual clip ``delta``), which TRL's loss applies."""
        return StepSettings.build(
            self.credit_rule,
            loss=LossConfig(clip_low=self.epsilon, clip_high=self.epsilon_high or self.epsilon,
                            dual_clip=self.delta or math.inf, adv_clamp=self.adv_clamp),
            special_tokens=self.special_tokens, special_penalty=self.special_penalty,
            temperature=self.temperature, top_p=self.top_p,
            max_new_tokens=self.max_completion_length, samples_per_prompt=self.num_generations,
            max_batch_tokens=self.opd_max_batch_tokens, mix=dict(mix) if mix else None,
            unparsed_calls=self.unparsed_calls)

    def teacher_config(self, teacher: str | Sequence[str] | None,
                       tokenizer: str | None = None) -> TeacherConfig:
        """The teacher section of a teacher handed to ``OPDTrainer`` as a model path / bundled
        name or as URLs (None: a loaded model), with this config's ``teacher_*`` fields."""
        urls = [] if teacher is None or isinstance(teacher, str) else list(teacher)
        return TeacherConfig(
            model=teacher if isinstance(teacher, str) else None, urls=urls,
            served_name=self.teacher_served_name, tokenizer=tokenizer,
            plain_template=self.teacher_plain_template, stop=self.teacher_stop,
            system=self.teacher_system, max_length=self.teacher_max_length,
            timeout=self.teacher_timeout, retries=self.teacher_retries,
            patience_s=self.teacher_patience_s, api_key=self.teacher_api_key)


def build_teacher(teacher: Any, tokenizer: Any, args: OPDConfig, device: str) -> TeacherSide:
    """A teacher side from what a user hands ``OPDTrainer``: a loaded model, a model path or
    bundled name, or a list of teacher URLs (``vllm serve`` / ``crossopd serve-teacher``),
    through the one teacher builder (``crossopd.step.sides``)."""
    loaded = None if isinstance(teacher, (str, list, tuple)) else teacher
    spec = args.teacher_config(None if loaded is not None else teacher,
                               tokenizer if isinstance(tokenizer, str) else None)
    if loaded is not None and tokenizer is None:
        tokenizer = getattr(loaded, "name_or_path", None)
    if isinstance(tokenizer, str):
        tokenizer = load_hf_tokenizer(tokenizer)
    return teacher_side(spec, check_teacher(spec, tokenizer), device=device,
                        max_batch_tokens=args.opd_max_batch_tokens, model=loaded)


class OPDTrainer(GRPOHooks):
    """``GRPOTrainer`` whose per-token advantages come from teachers of any family.

    ``model``: a loaded causal LM or a path / hub id / bundled name. ``teacher``: a loaded
    model, a model path or bundled name, or a list of teacher URLs, with ``teacher_tokenizer``
    (an HF tokenizer or its path; default the teacher's own). ``teachers``: already built
    teacher sides by name, instead of ``teacher``. Dataset rows need ``prompt`` (chat messages)
    and may carry ``answer``, ``reference`` (teacher-only context) and ``teacher`` (the name of
    the teacher that scores the row); ``teacher_mix`` (name -> weight) has every listed teacher
    score every row instead. ``student``: the student side when already built (its model is
    ``model``), instead of building it from ``model`` and ``processing_class``."""

    def __init__(self, model: Any, teacher: Any = None, teacher_tokenizer: Any = None,
                 args: OPDConfig | None = None, train_dataset: Any = None,
                 processing_class: Any = None, *,
                 teachers: Mapping[str, TeacherSide] | None = None,
                 teacher_mix: Mapping[str, float] | None = None,
                 student: StudentSide | None = None, **kwargs: Any) -> None:
        check_private_api()
        if args is None:
            raise ValueError("OPDTrainer needs args=OPDConfig(output_dir=...)")
        if not isinstance(args, OPDConfig):
            raise TypeError(f"args must be an OPDConfig (a GRPOConfig with crossopd's fields), "
                            f"got {type(args).__name__}")
        if (teacher is None) == (teachers is None):
            raise ValueError("give exactly one of teacher= (a model, path or URLs) and "
                             "teachers= (built teacher sides)")
        if isinstance(kwargs.get("environment_factory"), Mapping):
            raise ValueError("OPDTrainer: a dict environment_factory (one environment per "
                             "dataset row) is not supported yet; pass one factory")
        device = "cpu" if args.use_cpu or not torch.cuda.is_available() else "cuda"
        if isinstance(model, str):
            processing_class = processing_class or load_hf_tokenizer(model)
            model = load_hf_model(model, device=device)
        if student is not None:  # already built (engine trl: the run's student side)
            processing_class = processing_class or student.tokenizer
            side = student
        else:
            if processing_class is None:
                processing_class = load_hf_tokenizer(model.name_or_path)
            vocab = ByteVocab.from_pretrained(processing_class)
            special = np.flatnonzero(vocab.special).tolist() if args.special_tokens == "stop" \
                else []
            side = StudentSide.from_model(model, processing_class, vocab=vocab, stop_ids=special)
        # TRL stops HF sampling at the generation config's EOS ids: the template's end-of-turn;
        # vLLM stops at the EOS of the model on disk, so the same ids go into its sampling
        # parameters (a student whose end-of-turn is not its EOS would run to the length limit)
        model.generation_config.eos_token_id = sorted(side.fmt.stop_ids)
        if args.use_vllm:
            wanted = dict(args.generation_kwargs or {})
            wanted["stop_token_ids"] = sorted(set(wanted.get("stop_token_ids") or [])
                                              | set(side.fmt.stop_ids))
            args.generation_kwargs = wanted
        kwargs.setdefault("reward_funcs", no_reward)
        super().__init__(model=model, args=args, train_dataset=train_dataset,
                         processing_class=processing_class, **kwargs)
        self.student = side
        self.teachers = dict(teachers) if teachers is not None else one_teacher(
            build_teacher(teacher, teacher_tokenizer, args, device))
        self.settings = args.step_settings(teacher_mix)
        self.last_step_stats: dict[str, float] = {}
        self.last_step_totals: dict[str, float] = {}

    def score_batch(self, out: dict, inputs: list[dict], rollout_s: float) -> dict:
        times: dict[str, float] = {"rollout": rollout_s}
        c_ids, c_mask = out["completion_ids"], out["completion_mask"]
        old = out.get("old_per_token_logps")
        with timed(times, "student_logps"):
            if old is None:  # TRL skips them when on-policy; credit needs the rollout log-probs
                old = rollout_logps(self, out)
        lengths = c_mask.sum(1).tolist()
        responses: list = [row[:n].cpu().numpy() for row, n in zip(c_ids, lengths)]
        prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
        old_list = [row[:n].detach().double().cpu() for row, n in zip(old, lengths)]
        examples = examples_of(inputs)
        if self.tools:
            with timed(times, "trajectories"):
                examples, responses = self.trajectories(out, examples, responses)
        failure: TeacherError | None = None
        try:
            scored = score_rollouts(self.student, self.teachers, examples, prompts,
                                    responses, self.settings, old_logps=old_list)
        except TeacherError as e:
            failure = e
        # every process learns whether any teacher gave up, before the next collective: they
        # stop together (and save the patience checkpoint together) instead of one of them
        # waiting in a collective the failed process never joins
        failed = self.accelerator.gather(torch.tensor([int(failure is not None)],
                                                      device=self.accelerator.device))
        if bool(failed.any()):
            raise failure or TeacherError(
                f"the teacher of process {int(failed.argmax())} failed (its error is in that "
                "process's log)")
        adv = torch.zeros(c_ids.shape, dtype=torch.float32, device=c_ids.device)
        signal = torch.zeros(c_ids.shape, dtype=c_mask.dtype, device=c_ids.device)
        for i, (a, v) in enumerate(zip(scored.advantages, scored.signal)):
            adv[i, : len(a)] = a.to(adv)
            signal[i, : len(v)] = v.to(signal)
        out["advantages"] = adv
        out["tool_mask"] = signal * out["tool_mask"] if "tool_mask" in out else signal
        out["num_items_in_batch"] = self.accelerator.gather(
            (c_mask * out["tool_mask"]).sum()).sum()
        self.last_step_totals = self.global_totals(scored.totals)
        stats = StepStats(self.last_step_totals).result()
        stats["world_size"] = self.accelerator.num_processes
        stats.update(advantage_stats(scored))  # this process's; the native engine's keys
        if self.tools:  # the native engine's counts, over every process
            calls = self.accelerator.gather(torch.tensor([self.last_tool_counts],
                                                         device=self.accelerator.device))
            stats["tool_calls"], stats["tool_failures"] = map(float, calls.sum(0).tolist())
        if len(self.teachers) > 1:  # every process gathers every teacher, scored or not
            for name in self.teachers:
                team = StepStats(self.global_totals(scored.teacher_totals.get(name, {})))
                stats.update({f"teachers/{name}/{k}": v for k, v in team.result().items()
                              if k in TEACHER_STATS})
            if self.settings.mix:
                stats["mix_partial_tokens"] = scored.stats["mix_partial_tokens"]
        times["student_logps"] += scored.times.pop("student_logps")
        add_timings(stats, {**times, **scored.times}, sum(lengths))
        self.last_step_stats = stats
        log_metrics(self, stats, STAT_PREFIX)
        return out

    def trajectories(self, out: dict, examples: list[Example], responses: list[np.ndarray]
                     ) -> tuple[list[Example], list[Trajectory]]:
        """A tool-calling batch as crossopd trajectories: each rollout's prompt as TRL sampled
        it (an environment's reset text included) with its tool schemas; runs of ``tool_mask``
        1 are the assistant turns, and the tool messages of TRL's conversational completion
        the environment turns between them."""
        syntax = self.student.tool_syntax()
        schemas: dict[tuple, list[dict]] = {}
        exs, trajs = [], []
        for i, (tools, ids) in enumerate(zip(rollout_tools(self, len(examples)), responses)):
            key = tuple(f.__name__ for f in tools)
            if key not in schemas:
                schemas[key] = [tool_schema(f) for f in tools]
            ex = replace(examples[i], messages=list(self.last_prompts[i]),
                         tools=schemas[key] or None)
            mask = np.asarray(self.last_tool_masks[i], dtype=bool)
            trajs.append(trajectory_from_mask(ids, mask, env_groups(self.last_completions[i]),
                                              ex.messages, syntax, self.student.vocab,
                                              ex.tools))
            exs.append(ex)
        return exs, trajs

    def global_totals(self, totals: dict[str, float]) -> dict[str, float]:
        """StepStats sums over every process's rollouts."""
        keys = StepStats.KEYS
        local = torch.tensor([[totals.get(k, 0.0) for k in keys]], dtype=torch.float64,
                             device=self.accelerator.device)
        return dict(zip(keys, self.accelerator.gather(local).sum(0).tolist()))


def examples_of(rows: Sequence[dict]) -> list[Example]:
    return [Example(messages=list(r["prompt"]), answer=r.get("answer"),
                    reference=r.get("reference"), teacher=r.get("teacher")) for r in rows]


def as_dataset(examples: Sequence[Example]) -> Any:
    """A ``datasets.Dataset`` of crossopd examples, in the row layout ``OPDTrainer`` reads."""
    from datasets import Dataset

    return Dataset.from_list([e.row() for e in examples])


__all__ = ["OPDConfig", "OPDTrainer", "as_dataset", "build_teacher", "no_reward"]
