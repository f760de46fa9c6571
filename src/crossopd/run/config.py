"""The training recipe's config: one YAML file plus ``key=value`` overrides, into dataclasses,
validated before any model is loaded."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from crossopd.run.checks import validate
from crossopd.step.loss import LossConfig
from crossopd.step.settings import (
    HELP,
    REDACTED,
    ConfigError,
    StepSettings,
    TeacherConfig,
    option,
)


@dataclass
class LoraSettings:
    """PEFT LoRA on the student (engine ``trl``)."""

    r: int = option(16, "LoRA rank.")
    alpha: int = option(32, "LoRA alpha.")
    dropout: float = option(0.0, "LoRA dropout (TRL's disable_dropout, on by default, zeroes "
                                 "it anyway).")
    target_modules: list[str] = option(lambda: ["q_proj", "k_proj", "v_proj", "o_proj"],
                                       "Modules that get adapters.")


@dataclass
class StudentConfig:
    model: str = option("smollm2", "The student: an HF dir, hub id, .gguf file or bundled name.")
    dtype: str = option("float32", "Compute dtype (autocast); master weights stay float32.")
    lora: LoraSettings | None = option(None, "Engine trl: {r, alpha, dropout, target_modules} "
                                             "(null: train every weight).")
    tool_format: str | None = option(None, HELP["tool_format"])


@dataclass
class DataConfig:
    path: str = option("bundled:arith", "Training prompts: .jsonl/.json/.parquet with "
                                        "`messages` or `prompt`, or bundled:NAME.")
    heldout_path: str | None = option(None, "Held-out prompts (default: the last heldout_size "
                                            "rows of path).")
    heldout_size: int = option(16, "Rows of path held out when heldout_path is not set.")
    answer_column: str = option("answer", "The column with each prompt's answer (held-out "
                                          "accuracy).")
    teacher_column: str = option("teacher", "The column that names a row's teacher (several "
                                            "teachers).")
    default_teacher: str | None = option(None, "The teacher of rows without one (default: the "
                                               "first).")


@dataclass
class RolloutConfig:
    backend: str = option("hf", "hf (HF generate) | vllm (engine trl: TRL's vLLM rollouts).")
    vllm_mode: str = option("colocate", "colocate | server (TRL's vllm_mode).")
    samples_per_prompt: int = option(1, "Responses sampled per prompt.")
    max_new_tokens: int = option(64, "Longest response (of each assistant turn), in student "
                                     "tokens.")
    temperature: float = option(1.0, "Sampling temperature (the update uses the same).")
    top_p: float = option(1.0, "Nucleus sampling.")
    special_tokens: str = option("penalize", HELP["special_tokens"])
    special_penalty: float = option(5.0, HELP["special_penalty"])
    unparsed_calls: str = option("score", HELP["unparsed_calls"])
    tools: list[str] = option(list, "Tools the student may call, as "
                                    "`package.module:function` (TRL's tools: name, type hints "
                                    "and docstring define each).")
    environment: str | None = option(None, "`package.module:Factory` of an "
                                           "environment per rollout (TRL's environment_factory: "
                                           "a reset method; its public methods are tools).")
    max_turns: int = option(1, "Assistant turns of a rollout with tools (a turn without a tool "
                               "call ends it; engine trl: TRL's max_tool_calling_iterations "
                               "+ 1).")


@dataclass
class OptimConfig:
    lr: float = option(1e-5, "Learning rate (AdamW).")
    warmup_steps: int = option(0, "Linear warm-up, in optimizer steps.")
    weight_decay: float = option(0.0, "AdamW weight decay.")
    grad_clip: float = option(1.0, "Gradient norm clip.")


@dataclass
class TrainConfig:
    engine: str = option("native", "native (crossopd's own loop, the reference) | trl (TRL's "
                                   "GRPOTrainer).")
    student: StudentConfig = option(StudentConfig, "The student section.")
    teacher: TeacherConfig = option(TeacherConfig, "The teacher section (one teacher).")
    teachers: dict[str, TeacherConfig] = option(dict, (
        "Several teachers by name, each a teacher section; rows go to the teacher their teacher "
        "column names (else data.default_teacher, else the first), or teacher_mix has every "
        "listed teacher score every rollout."))
    teacher_mix: dict[str, float] = option(dict, "Teacher name -> weight: every listed teacher "
                                                  "scores every rollout, targets combined.")
    data: DataConfig = option(DataConfig, "The data section.")
    rollout: RolloutConfig = option(RolloutConfig, "The rollout section.")
    loss: LossConfig = option(LossConfig, "The loss section.")
    optim: OptimConfig = option(OptimConfig, "The optimizer section.")
    credit_rule: str = option("proportional", HELP["credit_rule"])
    steps: int = option(10, "OPD steps: one rollout batch each.")
    batch_size: int = option(8, "Prompts per step.")
    update_epochs: int = option(1, "Optimizer steps per rollout batch.")
    eval_every: int = option(0, "Held-out evaluation every N steps (0: before and after "
                                "training only).")
    eval_prompts: int = option(16, "Held-out prompts per evaluation (0: no evaluation).")
    eval_samples: int = option(1, (
        "Responses per held-out prompt: more shrink the sampling noise of the held-out "
        "metrics (a prompt's metric is the mean over its samples)."))
    eval_benchmark: str | None = option(None, (
        "A benchmark's accuracy in every held-out evaluation: a name of crossopd eval "
        "--benchmark or a .jsonl/.parquet file."))
    eval_benchmark_limit: int = option(0, "The benchmark's first N items (0: all).")
    checkpoint_every: int = option(0, "Checkpoint every N steps (0: only at the end).")
    keep_checkpoints: int = option(2, "Newest checkpoints kept.")
    seed: int = option(0, "Seed of data order, sampling and initialisation.")
    device: str = option("auto", "auto (CUDA when available, else CPU), cpu, cuda, cuda:N.")
    output_dir: str = option("runs/opd", "The run directory (never overwritten silently).")
    max_batch_tokens: int = option(8192, HELP["max_batch_tokens"])
    report_to: list[str] = option(list, (
        "Trackers that receive every metrics row and evaluation, as in transformers: "
        "tensorboard, wandb, or any other transformers supports (engine trl); none or empty: "
        "metrics.jsonl only."))
    trl: dict[str, Any] = option(dict, (
        "Engine trl: extra GRPOConfig arguments, passed through as they are (bf16, "
        "gradient_checkpointing, deepspeed, fsdp, vllm_gpu_memory_utilization, ...)."))

    def teacher_sections(self) -> dict[str, TeacherConfig]:
        """The run's teachers by name: ``teachers:``, or ``teacher:`` as the one teacher."""
        return dict(self.teachers) if self.teachers else {"teacher": self.teacher}

    def to_dict(self) -> dict:
        """The config as plain data, secrets redacted (what run directories store)."""
        return redact_secrets(dataclasses.asdict(self))


def config_keys(cls: type = TrainConfig, prefix: str = "") -> list[tuple[str, str, Any, str]]:
    """Every key of a config, sections expanded: (dotted key, type, default, help), what
    ``crossopd train --help-config`` lists."""
    rows = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint, key = hints[f.name], prefix + f.name
        section = _section_type(hint)
        if section is not None and _mapped_section(hint) is None:
            rows.append((key, "section", None, f.metadata.get("help", "")))
            rows.extend(config_keys(section, key + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:
            default = f.default_factory()
        else:
            default = None
        kind = hint.__name__ if isinstance(hint, type) else str(hint).replace("typing.", "")
        rows.append((key, kind, default, f.metadata.get("help", "")))
    return rows


def render_config_keys() -> str:
    """The config keys as text: one paragraph per key."""
    out = []
    for key, kind, default, text in config_keys():
        if kind == "section":
            out.append(f"\n{key}:  {text}")
            continue
        out.append(f"  {key}  ({kind}, default {default!r})\n      {text}")
    return "\n".join(out).lstrip("\n")


def step_settings(cfg: TrainConfig) -> StepSettings:
    """The step settings of a recipe run (its rollouts sample with ``cfg.rollout``)."""
    r = cfg.rollout
    return StepSettings.build(
        cfg.credit_rule, loss=cfg.loss, special_tokens=r.special_tokens,
        special_penalty=r.special_penalty, temperature=r.temperature, top_p=r.top_p,
        max_new_tokens=r.max_new_tokens, samples_per_prompt=r.samples_per_prompt,
        max_batch_tokens=cfg.max_batch_tokens, mix=dict(cfg.teacher_mix) or None,
        max_turns=r.max_turns, unparsed_calls=r.unparsed_calls)


def redact_secrets(data: dict) -> dict:
    """``data`` (``TrainConfig.to_dict`` layout) with every literal teacher ``api_key``
    (``teacher:`` and each of ``teachers:``) replaced by a marker; ``env:NAME`` names a
    variable, not a secret, and stays so a resumed run finds it."""
    def redact(t: object) -> object:
        if isinstance(t, dict) and t.get("api_key") and not str(t["api_key"]).startswith("env:"):
            return {**t, "api_key": REDACTED}
        return t

    out = {**data, "teacher": redact(data.get("teacher"))}
    if isinstance(data.get("teachers"), dict):
        out["teachers"] = {n: redact(t) for n, t in data["teachers"].items()}
    return out


def build_section(cls: type, data: dict, where: str = "") -> Any:
    """A config dataclass (``TeacherConfig``, say) from plain data, with the same checks and
    typing as a whole run config; ``where`` prefixes key names in errors (``crossopd.``)."""
    return _build(cls, data, where)


def _build(cls: type, data: dict, where: str) -> Any:
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(sorted(where + k for k in unknown))}; "
                          f"valid keys here: {', '.join(sorted(names))}")
    kwargs = {}
    for key, value in data.items():
        hint = hints[key]
        section = _section_type(hint)
        mapped = _mapped_section(hint)
        if mapped is not None:  # teachers: {name: {teacher section}}
            if isinstance(value, _Raw):
                value = yaml.safe_load(str(value))
            if not isinstance(value or {}, dict):
                raise ConfigError(f"{where}{key} must be a mapping of names to sections")
            kwargs[key] = {str(n): _build(mapped, v or {}, f"{where}{key}.{n}.")
                           for n, v in (value or {}).items()}
        elif section is not None:
            if isinstance(value, _Raw):
                value = yaml.safe_load(str(value))
            optional = not dataclasses.is_dataclass(hint)
            kwargs[key] = None if value is None and optional else \
                _build(section, value or {}, f"{where}{key}.")
        else:
            kwargs[key] = _coerce(value, hint, where + key)
    return cls(**kwargs)


def _mapped_section(hint: Any) -> type | None:
    """The dataclass of a ``dict[str, Section]`` field, else None."""
    if typing.get_origin(hint) is dict:
        value = typing.get_args(hint)[1]
        return value if dataclasses.is_dataclass(value) else None
    return None


def _section_type(hint: Any) -> type | None:
    """The dataclass of a config section (``Section`` or ``Section | None``), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    members = [a for a in typing.get_args(hint) if a is not type(None)]
    if len(members) == 1 and dataclasses.is_dataclass(members[0]):
        return members[0]
    return None


class _Raw(str):
    """A command-line override value, typed by the field it lands in."""


def _unescape(s: str) -> str:
    # \n, \t, \r and \\ as on the command line; other text (any Unicode) untouched
    return s.replace("\\\\", "\0").replace("\\n", "\n").replace("\\t", "\t") \
        .replace("\\r", "\r").replace("\0", "\\")


def _coerce(value: Any, hint: Any, key: str) -> Any:
    union = typing.get_origin(hint) in (typing.Union, types.UnionType)
    members = [a for a in typing.get_args(hint) if a is not type(None)] if union else [hint]
    optional = union and type(None) in typing.get_args(hint)
    if isinstance(value, _Raw):
        if str in members and value.lower() not in ("null", "none", "~"):
            return _unescape(str(value))
        value = yaml.safe_load(str(value)) if value != "" else None
    if value is None and typing.get_origin(members[0]) is not list:
        if optional:
            return None
        raise ConfigError(f"{key} cannot be null")
    base = members[0]
    if typing.get_origin(base) is dict:
        if value is None:
            return {}
        if not isinstance(value, dict):
            raise ConfigError(f"{key} must be a mapping of keys to values, got {value!r}")
        return value
    if typing.get_origin(base) is list:
        if value is None:
            return []
        if isinstance(value, str):  # url1,url2 on the command line
            value = [v.strip() for v in value.split(",") if v.strip()]
        if not isinstance(value, list):
            raise ConfigError(f"{key} must be a list, got {value!r}")
        return [str(v) for v in value]
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"{key} must be true or false, got {value!r}")
    if base in (int, float):
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if base is int and float(value) != int(value):
            raise ConfigError(f"{key} must be a whole number, got {value!r}")
        return base(value)
    if base is str and not isinstance(value, str):
        return str(value)
    return value


def _set_dotted(data: dict, dotted: str, raw: str) -> None:
    keys = dotted.split(".")
    node = data
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {dotted}: {k} is not a section")
    node[keys[-1]] = _Raw(raw)


def load_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"config file {p} is not valid YAML: {e}") from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(f"override {item!r} must look like key=value (e.g. optim.lr=1e-5)")
        key, raw = item.split("=", 1)
        _set_dotted(data, key.strip(), raw)
    cfg = _build(TrainConfig, data, "")
    validate(cfg)
    return cfg


