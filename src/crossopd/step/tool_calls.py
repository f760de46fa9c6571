"""Assistant turns and tool calls, each side in its own syntax.

A family writes a tool call in its own syntax (Qwen's ``<tool_call>{json}</tool_call>``, a
Llama 3 JSON object, ...). A call the student wrote is shown to the teacher in the teacher's
syntax, never verbatim: ``ToolSyntax.parse`` reads the student's turn text into a structured
message, and accepts it only when the student's own template renders that message back to the
same text (a round trip, so nothing is guessed). The teacher's template then renders the same
message (``ToolSyntax.turn_text``). A turn that does not round-trip is the student's own bytes,
scored as written; when it looks like a call (``looks_like_call``) it is counted as unparsed.

A template that cannot render ``tool_calls`` (SmolLM2's drops them) gets the Hermes text format
in the message content instead (``tool_format: hermes``); without it such a turn is refused.
When such a template also drops the tool definitions, ``tool_format: hermes`` puts them in a
system message, in the words and layout of Qwen 2.5's template (``with_tool_prompt``): a model
cannot call a tool it was never shown.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from crossopd.step.bridge import ChatFormat, Message, TemplateError

# how each known syntax opens a call: a turn holding one of these that does not parse is counted
OPENERS = ("<tool_call>", "<|python_tag|>", "[TOOL_CALLS]", '{"name"')
TOOL_FORMATS = ("template", "hermes")
_HERMES = re.compile(r"<tool_call>\s*(\{.*?\})\s*</tool_call>", re.S)
_PROBE = "crossopd_probe_tool"


def looks_like_call(text: str) -> bool:
    """Whether a turn's text opens a tool call in some known syntax."""
    return any(o in text for o in OPENERS)


def hermes_text(message: Message) -> str:
    """A message's content followed by each call as ``<tool_call>\\n{json}\\n</tool_call>``,
    one per line (the format Qwen's template writes)."""
    calls = [_function(c) for c in message.get("tool_calls") or []]
    blocks = ["<tool_call>\n" + json.dumps({"name": f["name"], "arguments": f["arguments"]},
                                           ensure_ascii=False) + "\n</tool_call>"
              for f in calls]
    return "\n".join([message.get("content") or "", *blocks] if message.get("content")
                     else blocks)


def _function(call: dict) -> dict:
    f = call.get("function", call)
    if not isinstance(f, dict) or "name" not in f:
        raise TemplateError(f"a tool call needs a function name: {call!r}")
    args = f.get("arguments", {})
    if isinstance(args, str):  # OpenAI's wire format carries the arguments as a JSON string
        try:
            args = json.loads(args)
        except json.JSONDecodeError as e:
            raise TemplateError(f"tool call {f['name']!r}: arguments are not JSON: {e}") from e
    return {"name": f["name"], "arguments": args}


def structured(message: Message) -> Message:
    """An assistant message with its calls in one shape: ``{"type": "function", "function":
    {"name", "arguments": dict}}``."""
    out = {"role": "assistant", "content": message.get("content") or ""}
    if message.get("tool_calls"):
        out["tool_calls"] = [{"type": "function", "function": _function(c)}
                             for c in message["tool_calls"]]
    return out


def renders_tool_calls(fmt: ChatFormat) -> bool:
    """Whether the template writes a structured call (some drop ``tool_calls`` silently)."""
    probe = [{"role": "user", "content": "Hi"},
             {"role": "assistant", "content": "", "tool_calls": [
                 {"type": "function", "function": {"name": _PROBE, "arguments": {}}}]}]
    try:
        return _PROBE in fmt.render_fn(probe, False, None)
    except Exception:  # noqa: BLE001 - a template may raise anything on an unknown shape
        return False


TOOL_PROMPT = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
    "{tools}\n</tools>\n\nFor each function call, return a json object with function name "
    "and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{{"name": <function-name>, "arguments": <args-json-object>}}\n</tool_call>')


def renders_tools(fmt: ChatFormat) -> bool:
    """Whether the template puts tool definitions into the prompt (some drop ``tools``)."""
    probe = [{"role": "user", "content": "Hi"}]
    tool = {"type": "function", "function": {"name": _PROBE, "description": "",
                                              "parameters": {"type": "object",
                                                             "properties": {}}}}
    try:
        return _PROBE in fmt.render_fn(probe, True, [tool])
    except Exception:  # noqa: BLE001 - a template may raise anything on an unknown shape
        return False


def tool_prompt(messages: Sequence[Message], tools: list[dict]) -> list[Message]:
    """``messages`` with the tool definitions (``TOOL_PROMPT``) at the end of the system
    message, or in a system message of their own before the first message."""
    block = TOOL_PROMPT.format(tools="\n".join(json.dumps(t, ensure_ascii=False)
                                               for t in tools))
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        out[0]["content"] = f"{out[0].get('content') or ''}\n\n{block}"
        return out
    return [{"role": "system", "content": block}, *out]


def with_tool_prompt(fmt: ChatFormat) -> ChatFormat:
    """``fmt`` whose rendering puts the tool definitions in a system message (``tool_prompt``)
    for a template that drops them."""
    render = fmt.render_fn

    def render_fn(messages: list[Message], gen: bool, tools: list[dict] | None = None) -> str:
        return render(tool_prompt(messages, tools) if tools else messages, gen, None)

    return replace(fmt, render_fn=render_fn)


@dataclass(frozen=True)
class ToolSyntax:
    """How one side writes an assistant turn: its template renders ``tool_calls``
    (``template``), or the calls are Hermes text in the content (``hermes``)."""

    fmt: ChatFormat
    tool_format: str = "template"

    @classmethod
    def of(cls, fmt: ChatFormat, fallback: str | None = None) -> ToolSyntax:
        """The template's own syntax when it renders tool calls; otherwise ``fallback``
        (``hermes``: calls as text in the content, and the tool definitions in a system message
        when the template drops them too), or none: a structured call is then refused with
        what to set. Render through the syntax's ``fmt``."""
        if fallback is not None and fallback not in TOOL_FORMATS:
            raise TemplateError(f"tool_format {fallback!r}: use one of "
                                f"{', '.join(TOOL_FORMATS)}")
        if renders_tool_calls(fmt):
            return cls(fmt, "template")
        if fallback != "hermes":
            return cls(fmt, "none")
        return cls(fmt if renders_tools(fmt) else with_tool_prompt(fmt), "hermes")

    def template_message(self, message: Message) -> Message:
        """The message as this side's template is given it."""
        if message.get("role") != "assistant" or not message.get("tool_calls"):
            return message
        if self.tool_format == "hermes":
            return {"role": "assistant", "content": hermes_text(message)}
        if self.tool_format == "none":
            raise TemplateError(
                f"{self.fmt.name}'s chat template does not render structured tool_calls (it "
                "drops them): set tool_format: hermes to write calls as <tool_call>{json}"
                "</tool_call> text, or use a model whose template renders tools")
        return structured(message)

    def messages(self, messages: Sequence[Message]) -> list[Message]:
        return [self.template_message(m) for m in messages]

    def turn_text(self, history: Sequence[Message], message: Message,
                  tools: list[dict] | None = None) -> str:
        """The text an assistant turn writes after the generation prompt, without its
        end-of-turn marker."""
        gen = self.fmt.render(self.messages(history), True, tools)
        full = self.fmt.render_fn(self.messages([*history, message]), False, tools)
        if not full.startswith(gen):
            raise TemplateError(
                f"{self.fmt.name}'s template renders a finished assistant turn that does not "
                "start with its own generation prompt: its turns cannot be told apart")
        text = full[len(gen):]
        end = text.rfind(self.fmt.end_of_turn)
        if end < 0:
            raise TemplateError(f"{self.fmt.name}'s template ends an assistant turn without "
                                f"its end-of-turn marker {self.fmt.end_of_turn!r}")
        return text[:end]

    def parse(self, history: Sequence[Message], text: str,
              tools: list[dict] | None = None) -> Message | None:
        """The structured message whose rendering on this side is exactly ``text``; None when
        no known syntax round-trips (the text is then the turn's own content)."""
        if self.tool_format == "none" or not looks_like_call(text):
            return None
        for candidate in _candidates(text):
            try:
                if self.turn_text(history, candidate, tools) == text:
                    return candidate
            except TemplateError:
                continue
        return None


def _candidates(text: str) -> list[Message]:
    """Structured readings of a turn in the known syntaxes, to be checked by a round trip."""
    out: list[Message] = []
    blocks = list(_HERMES.finditer(text))
    if blocks:
        calls = _calls([m.group(1) for m in blocks])
        if calls is not None:
            head = text[: blocks[0].start()]
            for content in dict.fromkeys((head, head.rstrip("\n"), head.strip())):
                out.append({"role": "assistant", "content": content, "tool_calls": calls})
    stripped = text.strip()
    if stripped.startswith("{"):  # one JSON call object (Llama 3's custom tool format)
        calls = _calls([stripped])
        if calls is not None:
            out.append({"role": "assistant", "content": "", "tool_calls": calls})
    return out


def _calls(objects: list[str]) -> list[dict[str, Any]] | None:
    calls = []
    for raw in objects:
        try:
            obj = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            return None
        args = obj.get("arguments", obj.get("parameters", {}))
        if not isinstance(args, dict):
            return None
        calls.append({"type": "function", "function": {"name": obj["name"], "arguments": args}})
    return calls
