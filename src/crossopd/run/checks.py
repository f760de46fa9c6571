"""Checks of a run config before any model loads: every one-line error names the key and what
to do. Kept apart from the parsing (``crossopd.run.config``), which calls ``validate`` last."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from crossopd import bundled
from crossopd.core.credit import get_rule
from crossopd.evaluation.benchmarks import check_benchmark_name
from crossopd.run.registry import ENGINES
from crossopd.run.trackers import OWN_TRACKERS, tracker_names, transformers_trackers
from crossopd.step.settings import UNPARSED_CALL_POLICIES, ConfigError


def check_model_name(key: str, value: str) -> None:
    """A name that is no file, no ``owner/name`` hub id and close to a bundled name is a typo:
    say so now rather than after a hub lookup (``gpt2``-style hub ids still pass)."""
    import difflib

    if "/" in value or Path(value).expanduser().exists() or key.startswith("data."):
        return
    close = difflib.get_close_matches(value, bundled.BUNDLED, n=1, cutoff=0.6)
    if close:
        raise ConfigError(f"{key}: {value!r} is not a bundled model (did you mean {close[0]!r}?); "
                          f"bundled: {', '.join(bundled.BUNDLED)}")


def looks_like_path(s: str) -> bool:
    return s.startswith((".", "/", "~")) or s.endswith((".gguf", ".jsonl", ".json", ".parquet"))


def validate(cfg: Any) -> None:
    """A ``TrainConfig``, whole: ``ConfigError`` on the first problem."""
    try:  # a typo or a broken import path fails here, before any model loads
        get_rule(cfg.credit_rule)
    except ValueError as e:
        raise ConfigError(f"credit_rule: {e}") from e
    for key, value, low in (("steps", cfg.steps, 1), ("batch_size", cfg.batch_size, 1),
                            ("update_epochs", cfg.update_epochs, 1),
                            ("rollout.samples_per_prompt", cfg.rollout.samples_per_prompt, 1),
                            ("rollout.max_new_tokens", cfg.rollout.max_new_tokens, 1),
                            ("eval_prompts", cfg.eval_prompts, 0),
                            ("eval_samples", cfg.eval_samples, 1),
                            ("eval_benchmark_limit", cfg.eval_benchmark_limit, 0),
                            ("keep_checkpoints", cfg.keep_checkpoints, 1)):
        if value < low:
            raise ConfigError(f"{key} must be at least {low}, got {value}")
    if cfg.eval_benchmark:
        try:
            check_benchmark_name(cfg.eval_benchmark)
        except (ValueError, FileNotFoundError) as e:
            raise ConfigError(f"eval_benchmark: {e}") from e
    if not 0 < cfg.rollout.top_p <= 1 or cfg.rollout.temperature <= 0:
        raise ConfigError("rollout.temperature must be > 0 and rollout.top_p in (0, 1]")
    if cfg.rollout.special_tokens not in ("penalize", "stop", "mask"):
        raise ConfigError(f"rollout.special_tokens {cfg.rollout.special_tokens!r}: penalize, "
                          "stop or mask")
    if not 0 <= cfg.rollout.special_penalty < float("inf"):
        raise ConfigError("rollout.special_penalty must be a finite number >= 0, got "
                          f"{cfg.rollout.special_penalty}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be positive, got {cfg.optim.lr}")
    validate_teachers(cfg)
    if cfg.device not in ("auto", "cpu") and not cfg.device.startswith(("cuda", "mps")):
        raise ConfigError(f"device {cfg.device!r}: use auto, cpu, cuda or cuda:N")
    paths = [("student.model", cfg.student.model), ("data.path", cfg.data.path),
             ("data.heldout_path", cfg.data.heldout_path)]
    for where, t in teacher_keys(cfg).items():
        paths += [(f"{where}.model", t.model), (f"{where}.tokenizer", t.tokenizer)]
    for key, value in paths:
        if not value or value in bundled.BUNDLED or value.startswith("bundled:"):
            continue
        if looks_like_path(value) and not Path(value).expanduser().exists():
            raise ConfigError(f"{key}: {value} does not exist")
        check_model_name(key, value)
    if cfg.engine not in ENGINES:
        raise ConfigError(f"engine {cfg.engine!r}: choose one of {', '.join(ENGINES)} (native: "
                          "crossopd's loop; trl: TRL's GRPOTrainer, needs the trl extra)")
    if cfg.rollout.backend not in ("hf", "vllm"):
        raise ConfigError(f"rollout.backend {cfg.rollout.backend!r}: hf or vllm")
    if cfg.rollout.vllm_mode not in ("colocate", "server"):
        raise ConfigError(f"rollout.vllm_mode {cfg.rollout.vllm_mode!r}: colocate or server")
    if cfg.engine == "native":
        for key, on in (("rollout.backend: vllm", cfg.rollout.backend == "vllm"),
                        ("student.lora", cfg.student.lora is not None),
                        ("trl", bool(cfg.trl))):
            if on:
                raise ConfigError(f"{key} needs engine: trl (the native engine samples with HF "
                                  "generate and trains all weights)")
    check_tools(cfg)
    if cfg.student.dtype not in ("float32", "bfloat16", "float16"):
        raise ConfigError(f"student.dtype {cfg.student.dtype!r}: float32, bfloat16 or float16")
    check_report_to(cfg.report_to, cfg.engine)


def check_tools(cfg: Any) -> None:
    """Tools run in the native engine's multi-turn rollouts and in TRL's tool loop; a tool
    needs a second turn."""
    r = cfg.rollout
    has_tools = bool(r.tools or r.environment)
    if r.max_turns < 1:
        raise ConfigError(f"rollout.max_turns must be at least 1, got {r.max_turns}")
    if r.unparsed_calls not in UNPARSED_CALL_POLICIES:
        raise ConfigError(f"rollout.unparsed_calls {r.unparsed_calls!r}: one of "
                          f"{', '.join(UNPARSED_CALL_POLICIES)}")
    if has_tools and cfg.engine == "trl" and cfg.student.tool_format:
        raise ConfigError("student.tool_format: engine trl parses the student's tool calls with "
                          "TRL's parser for the student's own chat template; unset it and use a "
                          "student whose template writes tool calls (Qwen 2.5 / Qwen 3 style), "
                          "or use engine: native")
    if has_tools and r.max_turns < 2:
        raise ConfigError("rollout.tools / rollout.environment need rollout.max_turns >= 2: "
                          "the turn after a tool call is where its result is used")
    if r.max_turns > 1 and not has_tools:
        raise ConfigError(f"rollout.max_turns is {r.max_turns} but no rollout.tools or "
                          "rollout.environment is set: a turn without a tool call ends the "
                          "rollout")
    for where, value in (("student.tool_format", cfg.student.tool_format),
                         *((f"{w}.tool_format", t.tool_format)
                           for w, t in teacher_keys(cfg).items())):
        if value not in (None, "hermes"):
            raise ConfigError(f"{where} {value!r}: hermes, or unset (the template's own)")


def check_report_to(report_to: list[str], engine: str) -> None:
    """Trackers: crossopd writes TensorBoard and W&B itself; engine trl hands any tracker
    transformers supports to TRL."""
    names = tracker_names(report_to)
    if "none" in report_to and len(report_to) > 1:
        raise ConfigError(f"report_to {report_to}: none with other trackers; choose one")
    other = [n for n in names if n not in OWN_TRACKERS]
    if not other:
        return
    if engine != "trl":
        raise ConfigError(f"report_to: {', '.join(other)} needs engine: trl (TRL reports to "
                          f"every tracker transformers supports); engine {engine} writes "
                          f"{', '.join(OWN_TRACKERS)}")
    known = transformers_trackers()
    unknown = [n for n in other if n not in known]
    if unknown:
        raise ConfigError(f"report_to: unknown tracker(s) {', '.join(unknown)}; transformers "
                          f"supports {', '.join(known)}")


def teacher_keys(cfg: Any) -> dict[str, Any]:
    """Each teacher section by the key it is configured under (``teacher`` or
    ``teachers.<name>``)."""
    if cfg.teachers:
        return {f"teachers.{name}": t for name, t in cfg.teachers.items()}
    return {"teacher": cfg.teacher}


def validate_teacher(t: Any, where: str) -> None:
    if bool(t.model) == bool(t.urls):
        raise ConfigError(f"set exactly one of {where}.model (in-process teacher) and "
                          f"{where}.urls (HTTP teacher)")
    if t.plain_template is not None and not t.stop:
        raise ConfigError(f"{where}.plain_template needs {where}.stop (what ends the answer)")
    if not 0 <= t.patience_s < float("inf"):
        raise ConfigError(f"{where}.patience_s must be >= 0 seconds, got {t.patience_s}")
    if t.urls and not (t.tokenizer or t.served_name):
        raise ConfigError(f"an HTTP teacher needs {where}.tokenizer (or {where}.served_name as "
                          "a hub id) to build its prompts and spell the student's bytes")


def validate_teachers(cfg: Any) -> None:
    """One ``teacher:`` or several ``teachers:``; a mix names only configured teachers, with
    weights that are numbers >= 0, and is not combined with routing; no two teachers are the
    same model on the same server."""
    if cfg.teachers and (cfg.teacher.model or cfg.teacher.urls):
        raise ConfigError("set teacher: (one teacher) or teachers: (several, by name), not both")
    for where, t in teacher_keys(cfg).items():
        validate_teacher(t, where)
    names = list(cfg.teachers) or ["teacher"]
    if cfg.data.default_teacher is not None and cfg.data.default_teacher not in names:
        raise ConfigError(f"data.default_teacher {cfg.data.default_teacher!r} is not a teacher; "
                          f"teachers: {', '.join(names)}")
    for name, w in cfg.teacher_mix.items():
        if name not in names:
            raise ConfigError(f"teacher_mix names {name!r}, which is not a teacher; teachers: "
                              f"{', '.join(names)}")
        if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) \
                or w < 0:
            raise ConfigError(f"teacher_mix.{name} must be a number >= 0, got {w!r}")
    if cfg.teacher_mix:
        if sum(cfg.teacher_mix.values()) <= 0:
            raise ConfigError("teacher_mix: the weights add up to 0; give a teacher weight > 0")
        if cfg.data.default_teacher is not None:
            raise ConfigError("teacher_mix (every listed teacher scores every rollout) and "
                              "data.default_teacher (routing) conflict: choose one")
    seen: dict[tuple[str, str], str] = {}
    for name, t in cfg.teachers.items():
        for url in t.urls:
            key = (url.rstrip("/").removesuffix("/v1"), t.served_name or "")
            if key in seen:
                raise ConfigError(f"teachers.{seen[key]} and teachers.{name} are the same model "
                                  f"({t.served_name!r}) on the same server {key[0]}: one "
                                  "teacher per served model")
            seen[key] = name
