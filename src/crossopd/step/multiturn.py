"""Multi-turn rollouts with tools, for engines that sample with HF ``generate`` (the native
engine): the student writes an assistant turn; a tool call in it (parsed on the student's side,
``tool_calls``) runs, and its result, rendered by the student's own template, follows; then the
next turn, up to ``max_turns`` turns. The result is a ``Trajectory`` per rollout.

Tools are TRL's: plain Python functions whose name, type hints and docstring define them
(``Toolbox.tools``), or the public methods of an environment built per rollout by a factory
with a ``reset`` method (TRL's ``environment_factory``: ``reset(**row)`` may return text that is
appended to the last user message).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from crossopd.models.sampling import sample
from crossopd.step.data import Example
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide
from crossopd.step.trajectory import Trajectory, end_of_turn_id, env_text, read_turn


def tool_schema(fn: Callable) -> dict:
    """A function's JSON schema from its name, type hints and docstring (as TRL builds it)."""
    from transformers.utils import get_json_schema

    return get_json_schema(fn)


@dataclass
class Toolbox:
    """What a rollout may call: ``tools`` (functions), and ``environment`` (a factory of
    environments whose public methods are tools, built once per rollout)."""

    tools: Sequence[Callable] = ()
    environment: Callable[[], Any] | None = None
    counts: dict[str, int] = field(default_factory=lambda: {"tool_calls": 0,
                                                            "tool_failures": 0})

    def open(self, example: Example) -> tuple[Example, dict[str, Callable]]:
        """The example as this rollout sees it (with its tool schemas, and the environment's
        reset text), and the callables by name."""
        fns = {f.__name__: f for f in self.tools}
        messages = example.messages
        if self.environment is not None:
            env = self.environment()
            if not callable(getattr(env, "reset", None)):
                raise TypeError("an environment needs a reset method (TRL's environment_factory "
                                "shape)")
            extra = env.reset(**example.row())
            for name, _ in inspect.getmembers(type(env), predicate=inspect.isfunction):
                if name not in ("reset", "get_reward") and not name.startswith("_"):
                    fns[name] = getattr(env, name)
            if extra:
                messages = [dict(m) for m in messages]
                last = max(i for i, m in enumerate(messages) if m["role"] == "user")
                messages[last]["content"] += extra
        schemas = [tool_schema(f) for f in fns.values()] or None
        return replace(example, messages=messages, tools=schemas), fns

    def call(self, fns: dict[str, Callable], call: dict) -> str:
        """One call's result as text; an unknown tool or a failure is the result's text (the
        model reads what went wrong), counted."""
        f = call["function"]
        self.counts["tool_calls"] += 1
        try:
            if f["name"] not in fns:
                raise KeyError(f"no tool named {f['name']!r}")
            return str(fns[f["name"]](**f["arguments"]))
        except Exception as e:  # noqa: BLE001 - a tool's failure is its result, as in TRL
            self.counts["tool_failures"] += 1
            return f"error: {type(e).__name__}: {e}"


@dataclass
class Episode:
    example: Example
    fns: dict[str, Callable]
    prompt: list[int]
    ids: list[int] = field(default_factory=list)
    turns: list[tuple[int, int]] = field(default_factory=list)
    messages: list[dict] = field(default_factory=list)
    unparsed: int = 0
    done: bool = False

    def trajectory(self) -> Trajectory:
        return Trajectory(np.asarray(self.ids, dtype=np.int64), tuple(self.turns),
                          tuple(self.messages), self.unparsed)


def sample_trajectories(student: StudentSide, examples: Sequence[Example],
                        settings: StepSettings, toolbox: Toolbox, *, greedy: bool = False
                        ) -> tuple[list[Example], list[list[int]], list[Trajectory]]:
    """(examples as each rollout saw them, student prompt ids, trajectories),
    ``samples_per_prompt`` each; every turn of every live rollout is sampled in one batch
    (``greedy``: decoded greedily, for evaluation)."""
    syntax = student.tool_syntax()
    eot = end_of_turn_id(student.fmt)
    episodes = []
    for e in examples:
        for _ in range(settings.samples_per_prompt):
            ex, fns = toolbox.open(e)
            prompt = syntax.fmt.prompt_ids(syntax.messages(ex.messages), ex.tools)
            episodes.append(Episode(ex, fns, prompt))
    for k in range(settings.max_turns):
        live = [ep for ep in episodes if not ep.done]
        if not live:
            break
        with student.autocast():
            turns = sample(student.model, [ep.prompt + ep.ids for ep in live],
                           max_new_tokens=settings.max_new_tokens,
                           temperature=settings.temperature, top_p=settings.top_p,
                           stop_ids=student.fmt.stop_ids, pad_id=student.pad_id,
                           greedy=greedy)
        for ep, turn in zip(live, turns):
            take_turn(ep, turn.tolist(), student, syntax, eot, toolbox,
                      last=k == settings.max_turns - 1)
    return ([ep.example for ep in episodes], [ep.prompt for ep in episodes],
            [ep.trajectory() for ep in episodes])


def take_turn(ep: Episode, turn: list[int], student: StudentSide, syntax: Any, eot: int,
              toolbox: Toolbox, *, last: bool = False) -> None:
    """Append a sampled turn; when it ended with a tool call and is not the ``last`` turn
    allowed, run the call and append the environment's turn (rendered by the student's
    template)."""
    start = len(ep.ids)
    ep.ids += turn
    ep.turns.append((start, len(ep.ids)))
    history = [*ep.example.messages, *ep.messages]
    ended = bool(turn) and turn[-1] == eot
    body = turn[:-1] if ended else turn
    text = student.vocab.concat_bytes(np.asarray(body, dtype=np.int64)).decode(
        "utf-8", errors="replace")
    message, unparsed = read_turn(syntax, history, text, ep.example.tools)
    ep.unparsed += unparsed
    ep.messages.append(message)
    calls = message.get("tool_calls")
    if not ended or not calls or last:  # an answer, a turn cut at the length limit, the last
        ep.done = True
        return
    env = [{"role": "tool", "name": c["function"]["name"],
            "content": toolbox.call(ep.fns, c)} for c in calls]
    between = env_text(syntax, history, message, env, text, ep.example.tools)
    ep.ids += student.fmt.tokenize_fn(between)
    ep.messages += env
