"""The training recipe's config: one YAML file plus ``key=value`` overrides, into dataclasses,
validated before any model is loaded."""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from crossopd.config_checks import ConfigError, validate
from crossopd.loss import LossConfig


@dataclass
class LoraSettings:
    """PEFT LoRA on the student (engine ``trl``)."""

    r: int = 16
    alpha: int = 32
    dropout: float = 0.0  # TRL's disable_dropout (on by default) zeroes it anyway
    target_modules: list[str] = field(
        default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])


@dataclass
class StudentConfig:
    model: str = "smollm2"  # HF dir, hub id, .gguf file or bundled name
    dtype: str = "float32"
    lora: LoraSettings | None = None  # engine trl: {r, alpha, dropout, target_modules}


@dataclass
class TeacherConfig:
    model: str | None = None  # in-process teacher (HF dir, hub id, .gguf, bundled)
    urls: list[str] = field(default_factory=list)  # or HTTP teachers (vllm serve / serve-teacher)
    served_name: str | None = None  # model name on the server
    tokenizer: str | None = None  # teacher tokenizer (default: model, else served_name)
    plain_template: str | None = None  # for a teacher without a chat template
    stop: str | None = None  # what ends the teacher's answer with a plain template
    system: str | None = None  # teacher-only system prompt
    reference_column: str | None = None  # data column appended to the teacher's user turn
    max_length: int | None = None  # teacher context; default: the model's
    timeout: float = 120.0
    retries: int = 3
    # how long a run waits for an HTTP teacher that is still starting (before the first step),
    # down or overloaded (a redeploy, a vLLM restart) before it stops; mid-run it saves a
    # checkpoint first and says --resume. 0: fail at once
    patience_s: float = 300.0
    # Bearer key for the teacher server: None reads $CROSSOPD_API_KEY, "env:NAME" reads $NAME;
    # redacted in to_dict(), so it never reaches config.json or the report
    api_key: str | None = None


@dataclass
class DataConfig:
    path: str = "bundled:arith"  # .jsonl/.json/.parquet with `messages` or `prompt`
    heldout_path: str | None = None  # default: the last `heldout_size` rows of `path`
    heldout_size: int = 16
    answer_column: str = "answer"
    teacher_column: str = "teacher"  # names the teacher of a row (several teachers)
    default_teacher: str | None = None  # the teacher of rows without one (default: the first)


@dataclass
class RolloutConfig:
    backend: str = "hf"  # hf (HF generate) | vllm (engine trl: TRL's vLLM rollouts)
    vllm_mode: str = "colocate"  # colocate | server (TRL's vllm_mode)
    samples_per_prompt: int = 1
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    # a special (byteless) token sampled mid-response, not the end-of-turn, which no teacher can
    # score: penalize (advantage -special_penalty) | stop (it ends the turn, like the
    # end-of-turn) | mask (no signal); counted in the metrics either way
    special_tokens: str = "penalize"
    special_penalty: float = 5.0

    def special_token_penalty(self) -> float | None:
        return self.special_penalty if self.special_tokens == "penalize" else None


@dataclass
class OptimConfig:
    lr: float = 1e-5
    warmup_steps: int = 0
    weight_decay: float = 0.0
    grad_clip: float = 1.0


@dataclass
class TrainConfig:
    engine: str = "native"  # native (crossopd's own loop) | trl (TRL's GRPOTrainer)
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several teachers, by name (each a `teacher:` section); rows go to the teacher their
    # `teacher` column names (else data.default_teacher, else the first), or every teacher in
    # teacher_mix scores every rollout (docs/config.md: several teachers)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    teacher_mix: dict[str, float] = field(default_factory=dict)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    credit_rule: str = "proportional"  # a name of credit.rule_names() or package.module:fn
    steps: int = 10
    batch_size: int = 8  # prompts per step
    update_epochs: int = 1
    eval_every: int = 0  # 0: evaluate before and after training only
    eval_prompts: int = 16
    # sampled responses per held-out prompt: more of them shrink the sampling noise in the
    # held-out metrics (the per-prompt metric is the mean over its samples)
    eval_samples: int = 1
    # a benchmark's accuracy in every held-out evaluation (crossopd eval --benchmark's names
    # or a .jsonl/.parquet file), on its first eval_benchmark_limit items (0: all of them)
    eval_benchmark: str | None = None
    eval_benchmark_limit: int = 0
    checkpoint_every: int = 0  # 0: only at the end
    keep_checkpoints: int = 2
    seed: int = 0
    device: str = "auto"  # auto: CUDA when available, else CPU
    output_dir: str = "runs/opd"
    max_batch_tokens: int = 8192
    # engine trl: extra GRPOConfig arguments, passed through as they are (e.g. bf16,
    # gradient_checkpointing, deepspeed, fsdp, vllm_gpu_memory_utilization, report_to)
    trl: dict[str, Any] = field(default_factory=dict)

    def teacher_sections(self) -> dict[str, TeacherConfig]:
        """The run's teachers by name: ``teachers:``, or ``teacher:`` as the one teacher."""
        return dict(self.teachers) if self.teachers else {"teacher": self.teacher}

    def to_dict(self) -> dict:
        """The config as plain data, secrets redacted (what run directories store)."""
        return redact_secrets(dataclasses.asdict(self))


REDACTED = "<redacted>"


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


def resolve_api_key(value: str | None) -> str | None:
    """The key ``teacher.api_key`` stands for: None -> $CROSSOPD_API_KEY (or no key),
    ``env:NAME`` -> $NAME (an error if unset), anything else is the key itself."""
    if value is None:
        return os.environ.get("CROSSOPD_API_KEY") or None
    if value.startswith("env:"):
        name = value[4:]
        if name not in os.environ:
            raise ConfigError(f"teacher.api_key is env:{name} but ${name} is not set")
        return os.environ[name]
    if value == REDACTED:
        raise ConfigError("teacher.api_key is redacted in saved configs; give the key again "
                          "(teacher.api_key=env:NAME or $CROSSOPD_API_KEY)")
    return value or None


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


