"""Chat-template bridging: the same messages, each side in its own prompt format.

The student renders the prompt with its template and samples ``response_ids``. The teacher sees
*its own* rendering of the same messages (never the student's markers as text), then the
student's response bytes spelled by ``encode_bytes``, then its own end-of-turn marker when the
student ended its turn. ``align_bridged`` aligns the response and adds the stop chunk (student
end-of-turn token <-> teacher end-of-turn tokens).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from crossopd.core.align import Alignment, align, align_lengths
from crossopd.core.tokens import ByteVocab

Message = dict[str, Any]  # role, content; an assistant turn may have tool_calls instead
ROLES = ("system", "user", "assistant", "tool")
SENTINEL = "\u2063crossopd-sentinel-7f3a\u2063"
# For base-model teachers without a chat template (Gemma 3 270M base, say).
DEFAULT_PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"
DEFAULT_PLAIN_STOP = "\n\nQuestion:"


class TemplateError(ValueError):
    """A chat template cannot be used as configured."""


@dataclass(frozen=True)
class TeacherContext:
    """Context only the teacher sees: an extra system prompt and/or a reference (for example a
    worked solution) appended to the last user turn with ``reference_template``."""

    system: str | None = None
    reference_template: str = "\n\nReference solution (for the grader only):\n{reference}"

    def apply(self, messages: Sequence[Message], reference: str | None = None) -> list[Message]:
        out = [dict(m) for m in messages]
        if reference:
            last_user = max((i for i, m in enumerate(out) if m["role"] == "user"), default=None)
            if last_user is None:
                raise TemplateError("a reference needs a user turn to attach to")
            out[last_user]["content"] += self.reference_template.format(reference=reference)
        if self.system:
            if out and out[0]["role"] == "system":
                out[0]["content"] = self.system + "\n\n" + out[0]["content"]
            else:
                out.insert(0, {"role": "system", "content": self.system})
        return out


@dataclass(frozen=True)
class ChatFormat:
    """One side's prompt format: render messages to text, tokenize the prompt, and the marker
    that ends an assistant turn (found generically from the template). Complete when built:
    the context and every id that ends a sampled turn are given to ``from_tokenizer``."""

    name: str
    # (messages, add_generation_prompt, tool definitions or None) -> text
    render_fn: Callable[[list[Message], bool, list[dict] | None], str]
    tokenize_fn: Callable[[str], list[int]]
    end_of_turn: str
    end_of_turn_ids: list[int]
    bos_ids: list[int] = field(default_factory=list)
    stop_ids: frozenset[int] = frozenset()  # student ids that end a sampled turn
    max_length: int | None = None
    # whitespace the format puts between the generation prompt and an assistant turn's content
    # (the plain format's " " after "Answer:"); the teacher's prefix includes it
    seam: str = ""

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = True,
               tools: list[dict] | None = None) -> str:
        _check_messages(messages)
        return self.render_fn(list(messages), add_generation_prompt, tools)

    def encode_prompt(self, text: str) -> list[int]:
        ids = self.tokenize_fn(text)
        if self.bos_ids and ids[: len(self.bos_ids)] != self.bos_ids:
            ids = self.bos_ids + ids
        return ids

    def prompt_ids(self, messages: Sequence[Message], tools: list[dict] | None = None
                   ) -> list[int]:
        return self.encode_prompt(self.render(messages, add_generation_prompt=True, tools=tools))

    @classmethod
    def from_tokenizer(
        cls,
        tokenizer: Any,
        plain_template: str | None = None,
        stop: str | None = None,
        name: str = "",
        eos_ids: Iterable[int] = (),
        max_length: int | None = None,
    ) -> ChatFormat:
        """From a Hugging Face tokenizer. Without a chat template (a base model) a plain template
        such as ``"Question: {prompt}\\nAnswer:"`` and a ``stop`` string are required.

        ``stop_ids`` (what ends a sampled turn): the end-of-turn marker when it is one token,
        special or not (Gemma's ``<end_of_turn>`` is not), the special tokens of a longer marker,
        the tokenizer's EOS, and ``eos_ids`` (a model's generation-config EOS list, or every
        special id when special tokens end the turn). ``max_length``: the model's context
        (default: the tokenizer's ``model_max_length``)."""
        name = name or getattr(tokenizer, "name_or_path", "") or type(tokenizer).__name__

        def tokenize(text: str) -> list[int]:
            # marker text in a rendered prompt is parsed into the special ids
            return list(tokenizer(text, add_special_tokens=False)["input_ids"])

        has_template = bool(getattr(tokenizer, "chat_template", None)) and plain_template is None
        if has_template:

            def render(messages: list[Message], gen: bool, tools: list[dict] | None = None
                       ) -> str:
                return tokenizer.apply_chat_template(
                    messages, tools=tools, tokenize=False, add_generation_prompt=gen
                )

            end = _discover_end_of_turn(render) or (tokenizer.eos_token or "")
            if stop is not None:
                end = stop
        elif plain_template is not None:
            if "{prompt}" not in plain_template:
                raise TemplateError(f"plain template {plain_template!r} has no {{prompt}} field")
            if not stop:
                raise TemplateError(
                    "a plain template needs a stop string (what ends the answer, e.g. "
                    f"'\\n\\nQuestion:' or the EOS token {tokenizer.eos_token!r})"
                )
            plain = _plain_renderer(plain_template, stop)

            def render(messages: list[Message], gen: bool, tools: list[dict] | None = None
                       ) -> str:
                return plain(messages)  # a plain prompt always ends where the answer starts

            end = stop
        else:
            raise TemplateError(
                f"{name} has no chat template (a base model?): set a plain template such as "
                "'Question: {prompt}\\nAnswer:' and a stop string in the config"
            )
        if not end:
            raise TemplateError(f"{name}: cannot find the end-of-turn marker; set it explicitly")
        end_ids = tokenize(end)
        if len(end_ids) == 1:
            stop_ids = set(end_ids)
        else:  # a text marker ("\n\nQuestion:") cannot stop sampling; its special tokens can
            stop_ids = {i for i in end_ids if i in set(tokenizer.all_special_ids)}
        if tokenizer.eos_token_id is not None:
            stop_ids.add(int(tokenizer.eos_token_id))
        stop_ids.update(int(i) for i in eos_ids)
        max_len = max_length or getattr(tokenizer, "model_max_length", None)
        return cls(
            name=name,
            render_fn=render,
            tokenize_fn=tokenize,
            end_of_turn=end,
            end_of_turn_ids=end_ids,
            bos_ids=_bos_ids(tokenizer),
            stop_ids=frozenset(stop_ids),
            max_length=max_len if max_len and max_len < 10**9 else None,
            seam=_discover_seam(render),
        )


def _check_messages(messages: Sequence[Message]) -> None:
    if not messages:
        raise TemplateError("empty conversation: give at least one user message")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or "role" not in m or (
                "content" not in m and not m.get("tool_calls")):
            raise TemplateError(f"message {i} needs 'role' and 'content': {m!r}")
        if m["role"] not in ROLES:
            raise TemplateError(f"message {i} has unknown role {m['role']!r} (known: "
                                f"{', '.join(ROLES)})")
    if messages[-1]["role"] == "assistant":
        raise TemplateError("the conversation ends with an assistant turn: drop it; it is the "
                            "turn the student samples")


def _discover_end_of_turn(render: Callable[..., str]) -> str:
    """Render a conversation whose assistant turn is a sentinel; what follows it ends a turn."""
    text = render([{"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": SENTINEL}], False)
    pos = text.rfind(SENTINEL)
    if pos < 0:
        return ""
    return text[pos + len(SENTINEL):].rstrip(" \n")


def _discover_seam(render: Callable[..., str]) -> str:
    """What an assistant turn's rendering adds between the generation prompt and the content,
    when it is whitespace. Other additions (Qwen3 puts an empty ``<think></think>`` block on past
    turns) describe history, not what the model generates next: no seam."""
    user = [{"role": "user", "content": "Hi"}]
    gen = render(user, True)
    full = render(user + [{"role": "assistant", "content": SENTINEL}], False)
    pos = full.find(SENTINEL)
    if pos < 0 or not full.startswith(gen):
        return ""
    seam = full[len(gen):pos]
    return seam if not seam.strip() else ""


def response_overlap(prefix: bytes, response: bytes, student_prompt: bytes,
                     limit: int = 64) -> int:
    """How many bytes at the start of ``response`` the teacher's ``prefix`` already ends with,
    so they are scored once, as response (a student that writes the seam space itself, or opens
    with the ``<think>\\n`` the teacher's generation prompt ends with). Bytes the student's own
    prompt ends with too are a real repetition the student chose: no overlap then."""
    for k in range(min(len(prefix), len(response), limit), 0, -1):
        head = response[:k]
        if (prefix.endswith(head) and not student_prompt.endswith(head)
                and prefix[-k] & 0xC0 != 0x80):  # cut the prefix at a character boundary
            return k
    return 0


def _plain_renderer(template: str, stop: str) -> Callable[[list[Message]], str]:
    def render(messages: list[Message]) -> str:
        parts: list[str] = []
        system = [m["content"] for m in messages if m["role"] == "system"]
        if system:
            parts.append("\n\n".join(system) + "\n\n")
        turns = [m for m in messages if m["role"] != "system"]
        if any(m["role"] == "tool" or m.get("tool_calls") for m in turns):
            raise TemplateError(
                "a plain template renders system, user and assistant text only: a trajectory "
                "with tool turns needs a model whose chat template renders tool messages")
        for m in turns:
            if m["role"] == "user":
                parts.append(template.format(prompt=m["content"]))
            else:
                parts.append(" " + m["content"] + stop)
        return "".join(parts)

    return render


def _bos_ids(tokenizer: Any) -> list[int]:
    """The BOS the tokenizer's own post-processor would add (Gemma, Llama), if any."""
    probe = "x"
    with_special = list(tokenizer(probe, add_special_tokens=True)["input_ids"])
    without = list(tokenizer(probe, add_special_tokens=False)["input_ids"])
    if len(with_special) > len(without) and with_special[-len(without):] == without:
        return with_special[: len(with_special) - len(without)]
    return []


# ---------------------------------------------------------------------------- the teacher request
@dataclass(frozen=True)
class TeacherRequest:
    """What the teacher scores for one rollout, and where the response sits on both sides."""

    teacher_ids: list[int]
    response_start: int  # first response token in teacher_ids
    response_end: int  # end of the response tokens (the stop tokens follow)
    stop_end: int  # end of the stop tokens (== response_end when the student did not stop)
    student_response: np.ndarray  # the sampled ids, exactly as sampled
    student_stop_index: int | None  # index in student_response of its end-of-turn token
    overflow: bool  # teacher prompt + response exceeds the teacher's context: no signal
    # seam bytes the first scored teacher token spells before the response's own bytes
    lead: int = 0

    @property
    def scored_span(self) -> tuple[int, int]:
        return self.response_start, self.stop_end


def build_teacher_request(
    messages: Sequence[Message],
    student_response: Sequence[int],
    student: ChatFormat,
    teacher: ChatFormat,
    sv: ByteVocab,
    tv: ByteVocab,
    context: TeacherContext | None = None,
    reference: str | None = None,
    *,
    tools: list[dict] | None = None,
    teacher_messages: Sequence[Message] | None = None,
    teacher_text: bytes | None = None,
) -> TeacherRequest:
    """Teacher ids = teacher's own prompt (and seam) + the response bytes + its end-of-turn marker
    (only when the student ended its turn). Never re-tokenizes the student's ids. Response bytes
    that the teacher's prefix already ends with are scored once (``response_overlap``). A request
    longer than the teacher format's ``max_length`` (its context) is marked overflowed.

    ``tools``: the tool definitions both templates render into the prompt.
    ``teacher_messages``: the conversation as the teacher's template is given it (a tool call
    in the shape its template renders; default ``messages``). ``teacher_text``: the
    bytes the teacher scores in place of the student's (a tool call the student wrote in its
    own syntax, rendered in the teacher's); the alignment then pairs their equal stretches."""
    resp = sv.check_ids(student_response, "student")
    stop_index = None
    if resp.size and int(resp[-1]) in student.stop_ids:
        stop_index = resp.size - 1
    body = resp if stop_index is None else resp[:stop_index]
    t_messages = (context or TeacherContext()).apply(
        messages if teacher_messages is None else teacher_messages, reference)
    data = sv.concat_bytes(body) if teacher_text is None else teacher_text
    # A seam both formats share is left to the model, as each format does: a student that
    # skips it is scored as written. A seam only the teacher's format has is rendered.
    seam = (teacher.seam if teacher.seam != student.seam else "").encode("utf-8")
    prefix = teacher.render(t_messages, tools=tools).encode("utf-8")
    keep = len(prefix) + len(seam) - response_overlap(
        prefix + seam, data, student.render(messages, tools=tools).encode("utf-8"))
    prompt = teacher.encode_prompt(prefix[: min(keep, len(prefix))].decode("utf-8"))
    lead = seam[: max(keep - len(prefix), 0)]  # seam bytes the response does not supply
    if sv.fingerprint == tv.fingerprint and teacher_text is None:
        # same vocabulary: score the sampled ids themselves, so OPD reduces exactly to standard
        # same-tokenizer OPD (1:1 chunks) even for non-canonical samples
        prompt += tv.encode_bytes(lead)
        t_resp, lead = body.tolist(), b""
    else:
        # the seam is tokenized with the response: Gemma scores "Answer:" + "▁The" 16 nats
        # above "Answer:▁" + "The". Tokens inside the seam join the prompt; a token that
        # straddles seam and response is scored, and its seam bytes are its ``lead``.
        t_resp = tv.encode_bytes(lead + data)
        ends = np.cumsum(tv.lengths[np.asarray(t_resp, dtype=np.int64)])
        n_seam = int(np.searchsorted(ends, len(lead), side="right"))
        if n_seam:
            prompt += t_resp[:n_seam]
            t_resp, lead = t_resp[n_seam:], lead[int(ends[n_seam - 1]):]
    stop = list(teacher.end_of_turn_ids) if stop_index is not None else []
    ids = prompt + t_resp + stop
    overflow = teacher.max_length is not None and len(ids) > teacher.max_length
    return TeacherRequest(
        teacher_ids=ids,
        response_start=len(prompt),
        response_end=len(prompt) + len(t_resp),
        stop_end=len(ids),
        student_response=resp,
        student_stop_index=stop_index,
        overflow=overflow,
        lead=len(lead),
    )


def align_bridged(req: TeacherRequest, sv: ByteVocab, tv: ByteVocab) -> Alignment:
    """Alignment of the student's response tokens with the teacher's scored tokens
    (``teacher_ids[response_start:stop_end]``), the stop chunk last. An overflowed request has
    no chunks at all."""
    t_scored = np.asarray(req.teacher_ids[req.response_start : req.stop_end], dtype=np.int64)
    s = req.student_response
    s_len, t_len = sv.lengths[s], tv.lengths[t_scored]
    if req.overflow:
        return Alignment.unaligned(s_len, t_len)
    n_body_t = req.response_end - req.response_start
    body = s if req.student_stop_index is None else s[: req.student_stop_index]
    if req.lead:  # the seam belongs to the first teacher token's chunk, not to any byte of body
        t_len = t_len.copy()
        t_len[0] -= req.lead
        t_body = t_scored[:n_body_t]
        a = align_lengths(sv.lengths[body], t_len[:n_body_t], sv.concat_bytes(body),
                          tv.concat_bytes(t_body)[req.lead:])
    else:
        a = align(body, t_scored[:n_body_t], sv, tv)
    if body.size == s.size:
        return a
    stop = None
    if req.student_stop_index is not None and t_scored.size > n_body_t:
        stop = (req.student_stop_index, n_body_t)
    return a.extended(s_len, t_len, last_chunk=stop)
