"""Trajectories: multi-turn responses with tool calls, on both sides.

After the prompt a trajectory alternates assistant turns, sampled by the student (ids kept as
sampled), and environment turns (tool results, user or system messages) that the environment
inserts and the student's own template renders. Only assistant tokens are trained; environment
tokens are counted (``env_tokens``). A single-turn response is the trajectory of one turn.

The teacher scores each assistant turn on its own span (``turn_requests``): its prompt is its
own template's rendering of everything before the turn (environment turns in its own
tool-result format; earlier turns from the student's bytes, a parsed tool call in its own call
syntax), then the turn's bytes, then its own end-of-turn when the student ended the turn. A
turn whose tool call parsed is scored in the teacher's syntax: the alignment pairs the equal
stretches (function name, argument values), and the syntax between them has no signal
(``format_tokens``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from crossopd.core.tokens import ByteVocab
from crossopd.step.bridge import (
    ChatFormat,
    Message,
    TeacherContext,
    TeacherRequest,
    TemplateError,
    build_teacher_request,
)
from crossopd.step.tool_calls import ToolSyntax, looks_like_call

ENV_ROLES = ("tool", "user", "system")


@dataclass(frozen=True)
class Trajectory:
    """The student's side of a multi-turn response: every id after the prompt, where each
    assistant turn lies, and the conversation those ids render."""

    ids: np.ndarray  # assistant and environment tokens, in order
    turns: tuple[tuple[int, int], ...]  # each assistant turn's [start, end) in ids
    # the conversation after the prompt: assistant turns as the student's side reads them (a
    # call that round-trips is structured; other text is content) and environment messages
    messages: tuple[Message, ...]
    unparsed_tool_calls: int = 0  # assistant turns that look like a call but do not parse

    @property
    def student_mask(self) -> np.ndarray:
        """True on the tokens the student sampled."""
        mask = np.zeros(len(self.ids), dtype=bool)
        for start, end in self.turns:
            mask[start:end] = True
        return mask

    @property
    def env_tokens(self) -> int:
        return len(self.ids) - sum(end - start for start, end in self.turns)


@dataclass(frozen=True)
class TurnRequest:
    """One assistant turn's teacher request and its span in the trajectory."""

    request: TeacherRequest
    start: int
    end: int
    reformatted: bool  # the teacher scores its own rendering of the turn's tool call
    unparsed: bool = False  # the turn opens a tool call that does not parse: its bytes verbatim


def end_of_turn_id(fmt: ChatFormat) -> int:
    """The one id that ends the student's assistant turn."""
    ids = fmt.end_of_turn_ids
    if len(ids) != 1 or ids[0] not in fmt.stop_ids:
        raise TemplateError(f"{fmt.name} ends a turn with {fmt.end_of_turn!r}, not one "
                            "end-of-turn token: trajectories need a chat model's template")
    return int(ids[0])


def read_turn(syntax: ToolSyntax, history: Sequence[Message], text: str,
              tools: list[dict] | None = None) -> tuple[Message, bool]:
    """A turn's text as a message: structured when its tool call round-trips on this side;
    otherwise its content, with whether it looks like a call that did not parse."""
    parsed = syntax.parse(history, text, tools)
    if parsed is not None:
        return parsed, False
    return {"role": "assistant", "content": text}, looks_like_call(text)


def env_text(syntax: ToolSyntax, history: Sequence[Message], message: Message,
             env: Sequence[Message], turn_text: str, tools: list[dict] | None = None) -> str:
    """What the student's template writes between an assistant turn's end-of-turn marker and
    the next turn: the environment's messages and the next generation prompt."""
    fmt = syntax.fmt
    head = fmt.render(syntax.messages(history), True, tools) + turn_text + fmt.end_of_turn
    after = fmt.render(syntax.messages([*history, message, *env]), True, tools)
    if not after.startswith(head):
        raise TemplateError(
            f"{fmt.name}'s template does not continue the conversation where the assistant "
            f"turn ended (after {turn_text[-40:]!r} + {fmt.end_of_turn!r}): the assistant "
            "turn does not end where the environment's begins")
    return after[len(head):]


def check_env(messages: Sequence[Message], where: str) -> None:
    for m in messages:
        if m.get("role") not in ENV_ROLES:
            raise TemplateError(f"{where}: an environment message has role {m.get('role')!r} "
                                f"(use one of {', '.join(ENV_ROLES)})")


def trajectory_from_messages(messages: Sequence[Message], fmt: ChatFormat, vocab: ByteVocab,
                             syntax: ToolSyntax, tools: list[dict] | None = None
                             ) -> tuple[list[Message], list[int], Trajectory]:
    """A complete conversation (a data row) as (prompt messages, the student's prompt ids, the
    trajectory): the prompt runs to the first assistant turn; each assistant turn's ids are its
    text in the student's tokenization and its end-of-turn token."""
    first = next((i for i, m in enumerate(messages) if m.get("role") == "assistant"), None)
    if first is None:
        raise TemplateError("a trajectory needs an assistant turn")
    if messages[-1].get("role") != "assistant":
        raise TemplateError("a trajectory ends with its last assistant turn: drop the "
                            "environment messages after it (nothing after them is scored)")
    prompt, conv = list(messages[:first]), list(messages[first:])
    eot = end_of_turn_id(fmt)
    ids: list[int] = []
    turns, read, unparsed = [], [], 0
    history = list(prompt)
    i = 0
    while i < len(conv):
        message = conv[i]
        text = syntax.turn_text(history, message, tools)
        if not message.get("tool_calls"):
            message, bad = read_turn(syntax, history, text, tools)
            unparsed += bad
        start = len(ids)
        ids += vocab.encode_bytes(text.encode("utf-8")) + [eot]
        turns.append((start, len(ids)))
        j = next((k for k in range(i + 1, len(conv)) if conv[k]["role"] == "assistant"),
                 len(conv))
        env = conv[i + 1:j]
        check_env(env, f"message {first + i + 1}")
        if env:
            ids += fmt.tokenize_fn(env_text(syntax, history, message, env, text, tools))
        read += [message, *env]
        history += [message, *env]
        i = j
    traj = Trajectory(np.asarray(ids, dtype=np.int64), tuple(turns), tuple(read), unparsed)
    return prompt, syntax.fmt.prompt_ids(syntax.messages(prompt), tools), traj


def student_runs(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [start, end) runs of True in a student-token mask: one per assistant turn."""
    edges = np.flatnonzero(np.diff(np.concatenate([[0], np.asarray(mask, np.int8), [0]])))
    return [(int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]


def env_groups(conversation: Sequence[Message]) -> list[list[Message]]:
    """The messages after a prompt as another engine keeps them (each assistant turn followed
    by the tool messages its calls returned) as the environment's messages after each
    assistant turn."""
    groups: list[list[Message]] = []
    for m in conversation:
        if m.get("role") == "assistant":
            groups.append([])
        elif groups:
            groups[-1].append(dict(m))
        else:
            raise TemplateError(f"the conversation after the prompt starts with a "
                                f"{m.get('role')!r} message, not the student's assistant turn")
    return groups


def trajectory_from_mask(ids: np.ndarray, mask: np.ndarray,
                         env: Sequence[Sequence[Message]], prompt: Sequence[Message],
                         syntax: ToolSyntax, vocab: ByteVocab,
                         tools: list[dict] | None = None) -> Trajectory:
    """A trajectory another engine sampled (TRL's ``tool_mask``, verl's ``response_mask``):
    ``ids`` after the prompt, ``mask`` True on the tokens the student sampled, and ``env[k]``
    the environment's messages after the k-th assistant turn. Each run of True is one assistant
    turn, read on the student's side as the native engine reads it (``read_turn``); the ids are
    kept as the engine sampled and rendered them."""
    ids = np.asarray(ids, dtype=np.int64)
    turns = student_runs(mask)
    if mask[:1].size and not mask[0]:
        raise TemplateError("a trajectory starts with an assistant turn: its first token is "
                            "an environment token (mask 0)")
    # one group more than turns: the engine cut the trajectory at its length limit before
    # the last turn it kept a message for; that turn's environment has no tokens here
    if len(env) not in (len(turns), len(turns) + 1) or \
            any(not group for group in env[:len(turns) - 1]):
        raise TemplateError(f"{len(turns)} assistant turns with environment messages after "
                            f"{sum(bool(g) for g in env)} of them: every turn but the last "
                            "must be followed by the environment's messages")
    eot = end_of_turn_id(syntax.fmt)
    history, read, unparsed = list(prompt), [], 0
    for k, (start, end) in enumerate(turns):
        body = ids[start:end - 1] if ids[end - 1] == eot else ids[start:end]
        text = vocab.concat_bytes(body).decode("utf-8", errors="replace")
        message, bad = read_turn(syntax, history, text, tools)
        unparsed += bad
        group = list(env[k]) if k < len(env) else []
        check_env(group, f"after assistant turn {k + 1}")
        read += [message, *group]
        history += [message, *group]
    return Trajectory(ids, tuple(turns), tuple(read), unparsed)


def turn_requests(prompt: Sequence[Message], traj: Trajectory, student: ToolSyntax,
                  student_vocab: ByteVocab, teacher: ToolSyntax, teacher_vocab: ByteVocab, *,
                  context: TeacherContext | None = None, reference: str | None = None,
                  tools: list[dict] | None = None) -> list[TurnRequest]:
    """Each assistant turn bridged into the teacher's format, conditioned on everything before
    it in the teacher's own rendering."""
    history = list(prompt)
    out: list[TurnRequest] = []
    turns = iter(traj.turns)
    for message in traj.messages:
        if message["role"] != "assistant":
            history.append(message)
            continue
        start, end = next(turns)
        t_text = None
        if message.get("tool_calls"):
            t_text = teacher.turn_text(history, message, tools).encode("utf-8")
        req = build_teacher_request(
            student.messages(history), traj.ids[start:end], student.fmt, teacher.fmt,
            student_vocab, teacher_vocab, context, reference, tools=tools,
            teacher_messages=teacher.messages(history), teacher_text=t_text)
        unparsed = t_text is None and looks_like_call(message.get("content") or "")
        out.append(TurnRequest(req, start, end, t_text is not None, unparsed))
        history.append(message)
    return out
