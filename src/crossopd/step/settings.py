"""The settings of one OPD step, the same for every engine, and the teacher section that says how
to reach a teacher and format its input.

Each engine builds one ``StepSettings`` from its own configuration, by one function: the YAML
recipe (``crossopd.run.config.step_settings``), TRL's ``OPDConfig.step_settings`` and the verl
launch (``crossopd.integrations.verl.settings.VerlSettings.step_settings``). The step functions
take it whole, so a new step setting is one field here plus its line in each of those builders.
Help texts that a field shares with ``OPDConfig`` live in ``HELP``, written once.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from crossopd.core.credit import CreditRule, CreditSpec, get_rule
from crossopd.step.loss import LossConfig

SPECIAL_TOKEN_POLICIES = ("penalize", "stop", "mask")
UNPARSED_CALL_POLICIES = ("score", "mask")

HELP = {
    "credit_rule": "How a chunk's teacher log-prob is shared out over its student tokens: "
                   "proportional, uniform, last, chunk, or a `package.module:function` rule.",
    "adv_clamp": LossConfig.__dataclass_fields__["adv_clamp"].metadata["help"],
    "special_tokens": "A special token sampled mid-response (not the end-of-turn), which no "
                      "teacher can score: penalize (advantage -special_penalty), stop (it ends "
                      "the turn) or mask (no signal). Counted either way.",
    "special_penalty": "The penalty of special_tokens=penalize.",
    "unparsed_calls": "An assistant turn that opens a tool call in some syntax but does not "
                      "parse on the student's side: score (the teacher scores its bytes "
                      "verbatim) or mask (the turn gets no signal: a teacher of another family "
                      "judges the foreign call syntax, not the call). Counted either way.",
    "max_batch_tokens": "Token budget of one forward pass (student scoring and in-process "
                        "teachers).",
    "teacher.patience_s": "How long an HTTP teacher that is down, starting or overloaded is "
                          "waited for before the run stops (0: fail at once); mid-run the run "
                          "saves a checkpoint first and says --resume.",
    "teacher.served_name": "The teacher's model name on its server (HTTP teachers).",
    "teacher.api_key": "Bearer key of the teacher server: unset reads $CROSSOPD_API_KEY, "
                       "env:NAME reads $NAME; never written to disk.",
    "teacher.plain_template": "Prompt template for a teacher without a chat template, with a "
                              "{prompt} field, e.g. 'Question: {prompt}\\nAnswer:'.",
    "teacher.stop": "What ends the teacher's answer with a plain template.",
    "teacher.system": "A system prompt only the teacher sees.",
    "teacher.max_length": "The teacher's context in tokens (default: the model's or the "
                          "server's); longer requests get no signal and are counted.",
    "teacher.timeout": "Seconds one HTTP scoring request may take.",
    "tool_format": "How this model writes a tool call when its chat template has no syntax for "
                   "one: hermes (<tool_call>{json}</tool_call> in the content); unset: the "
                   "template's own syntax, or tool calls are refused.",
    "teacher.retries": "Retries of a failed HTTP scoring request before the teacher counts as "
                       "down (then patience_s applies).",
}


def option(default: Any = None, help: str = "", **kwargs: Any) -> Any:
    """A config field with its help text (TRL's ``metadata={"help": ...}``), which
    ``crossopd train --help-config`` lists. A callable default (``list``, a section class) is a
    factory: each config gets its own."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help}, **kwargs)
    return field(default=default, metadata={"help": help}, **kwargs)


class ConfigError(ValueError):
    """A setting is invalid; the message says which key and what to do."""


@dataclass
class TeacherConfig:
    """One teacher: where it runs (in process or behind HTTP) and how its input is formatted."""

    model: str | None = option(None, "In-process teacher: an HF dir, hub id, .gguf file or "
                                     "bundled name.")
    urls: list[str] = option(list, "Or HTTP teachers (vllm serve / crossopd serve-teacher): "
                                   "base URLs, with or without /v1; requests are spread over them.")
    served_name: str | None = option(None, HELP["teacher.served_name"])
    tokenizer: str | None = option(None, "The teacher's tokenizer (default: model, else "
                                         "served_name).")
    plain_template: str | None = option(None, HELP["teacher.plain_template"])
    stop: str | None = option(None, HELP["teacher.stop"])
    system: str | None = option(None, HELP["teacher.system"])
    reference_column: str | None = option(None, "A data column appended to the teacher's user "
                                                "turn (teacher-only context).")
    max_length: int | None = option(None, HELP["teacher.max_length"])
    tool_format: str | None = option(None, HELP["tool_format"])
    timeout: float = option(120.0, HELP["teacher.timeout"])
    retries: int = option(3, HELP["teacher.retries"])
    patience_s: float = option(300.0, HELP["teacher.patience_s"])
    api_key: str | None = option(None, HELP["teacher.api_key"])


REDACTED = "<redacted>"


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


@dataclass(frozen=True)
class StepSettings:
    """What one OPD step does with its rollouts, the same in every engine.

    ``credit`` is the resolved credit rule; ``loss`` the PPO-clip settings and the advantage
    clamp (engines with their own loss fill in theirs, so the record is true); sampling
    settings (``temperature`` ...) are what the rollouts were drawn with: the update's ratio and
    the rollout log-probs use the same tempered distribution. ``mix`` (teacher name -> weight)
    has every listed teacher score every rollout; ``max_turns`` bounds a rollout with tools
    (``crossopd.step.multiturn``)."""

    credit: CreditRule
    loss: LossConfig = LossConfig()
    special_tokens: str = "penalize"
    special_penalty: float = 5.0
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 64  # per assistant turn
    samples_per_prompt: int = 1
    max_batch_tokens: int = 8192
    mix: Mapping[str, float] | None = None
    max_turns: int = 1  # assistant turns of a rollout with tools
    unparsed_calls: str = "score"

    @classmethod
    def build(cls, credit_rule: CreditSpec = "proportional", *, where: str = "",
              **kwargs: Any) -> StepSettings:
        """Settings with the credit rule resolved once; ``where`` prefixes key names in errors
        (``crossopd.`` for a verl launch)."""
        try:
            credit = get_rule(credit_rule)
        except ValueError as e:
            raise ConfigError(f"{where}credit_rule: {e}") from e
        settings = cls(credit=credit, **kwargs)
        if settings.max_turns < 1:
            raise ConfigError(f"{where}max_turns {settings.max_turns}: at least 1")
        if settings.unparsed_calls not in UNPARSED_CALL_POLICIES:
            raise ConfigError(f"{where}unparsed_calls {settings.unparsed_calls!r}: one of "
                              f"{', '.join(UNPARSED_CALL_POLICIES)}")
        if settings.special_tokens not in SPECIAL_TOKEN_POLICIES:
            raise ConfigError(f"{where}special_tokens {settings.special_tokens!r}: one of "
                              f"{', '.join(SPECIAL_TOKEN_POLICIES)}")
        return settings

    @property
    def penalty(self) -> float | None:
        """The advantage penalty of special tokens sampled mid-response (None: no signal)."""
        return self.special_penalty if self.special_tokens == "penalize" else None
