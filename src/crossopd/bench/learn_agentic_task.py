"""The task of ``crossopd bench learn --agentic``: a product of two 2-digit numbers, which the
small models cannot compute but a tool can. A solved trajectory is a tool call ``mul(a, b)``,
the tool's result, and an answer turn that repeats it.

The two tokenizer families write the call in their own syntax:
- the student's template in Qwen's Hermes style: ``<tool_call>{"name": .., "arguments": ..}
  </tool_call>``;
- the cross-family teacher's template as a Llama 3 JSON object with ``"parameters"``.
Their role markers and tool-result formats differ too. Each tokenizer is trained on its own
template's renderings (``bench.learn_task``'s two kinds: digit runs merged, or split).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from crossopd.bench.learn_task import (
    make_split,
    supervised_train,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.core.tokens import ByteVocab
from crossopd.step.bridge import ChatFormat, Message
from crossopd.step.data import Example
from crossopd.step.multiturn import Toolbox, sample_trajectories, tool_schema
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide
from crossopd.step.tool_calls import ToolSyntax
from crossopd.step.trajectory import Trajectory, trajectory_from_messages


def mul(a: int, b: int) -> int:
    """Multiplies two integers.

    Args:
        a: The first factor.
        b: The second factor.
    """
    return a * b


TOOLS = (mul,)
SCHEMAS = [tool_schema(mul)]

# the student's family: Hermes tool calls, tool results in their own turn
STUDENT_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}<a>{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}<tool_call>"
    "{{ {'name': c.function.name, 'arguments': c.function.arguments} | tojson }}"
    "</tool_call>{% endfor %}</s>\n"
    "{% elif m.role == 'tool' %}<r>{{ m.content }}\n"
    "{% else %}<u>{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<a>{% endif %}")
# the other family: Llama 3's JSON object with "parameters", results as a labelled line
TEACHER_TEMPLATE = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}A:{{ m.content or '' }}"
    "{% for c in m.tool_calls or [] %}"
    "{{ {'name': c.function.name, 'parameters': c.function.arguments} | tojson }}"
    "{% endfor %}</s>\n"
    "{% elif m.role == 'tool' %}Result:{{ m.content }}\n"
    "{% else %}Q:{{ m.content }}\n{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}A:{% endif %}")


def make_problem(rng: random.Random) -> tuple[str, str, int]:
    """(prompt, unused solution slot, answer) in ``make_split``'s shape."""
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    return f"{a}*{b}", "", a * b


def splits(n_train: int, n_val: int, n_test: int) -> tuple[list, list, list]:
    """(train, validation, test) problems, disjoint."""
    train = make_split(n_train, 51, problem=make_problem)
    seen = {p for p, _, _ in train}
    test = make_split(n_test, 52, exclude=seen, problem=make_problem)
    val = make_split(n_val, 53, exclude=seen | {p for p, _, _ in test}, problem=make_problem)
    return train, val, test


def solved(prompt: str) -> list[Message]:
    """The complete trajectory that calls the tool and answers with its result."""
    a, b = (int(x) for x in prompt.split("*"))
    call = {"type": "function", "function": {"name": "mul", "arguments": {"a": a, "b": b}}}
    return [{"role": "user", "content": prompt},
            {"role": "assistant", "content": "", "tool_calls": [call]},
            {"role": "tool", "name": "mul", "content": str(a * b)},
            {"role": "assistant", "content": str(a * b)}]


def example(prompt: str, answer: int) -> Example:
    return Example([{"role": "user", "content": prompt}], str(answer))


# what no merge may cross: line breaks, both templates' role and call markers, and numbers (so
# digits merge with digits only, as in real tokenizers' pre-tokenizers). A teacher
# reads its whole conversation tokenized at once, while a trajectory is tokenized a turn at a
# time; with merges across these boundaries the two differ and a teacher trained on one would
# score the other out of distribution
MARKERS = r"\n|<u>|<a>|<r>|</?tool_call>|Q:|A:|Result:|[0-9]+"


def tokenizers(train: list) -> dict[str, Any]:
    """Each family's tokenizer, trained on its own template's renderings of solved training
    trajectories, with that template."""
    out = {}
    # the teacher's vocabulary is large enough to merge digit pairs: numbers are split
    # differently on the two sides, as between real families
    for side, template, fit, size in (
            ("teacher", TEACHER_TEMPLATE, train_teacher_tokenizer, 600),
            ("student", STUDENT_TEMPLATE, train_student_tokenizer, 120)):
        probe = fit(["0"])  # a tokenizer to render with; the corpus trains the real one
        probe.chat_template = template
        corpus = [probe.apply_chat_template(solved(p), tokenize=False).replace("</s>", "")
                  for p, _, _ in train]
        tok = fit(corpus, size, isolate=MARKERS)
        tok.chat_template = template
        out[side] = tok
    return out


def side_of(tok: Any) -> tuple[ChatFormat, ByteVocab, ToolSyntax]:
    fmt = ChatFormat.from_tokenizer(tok)
    return fmt, ByteVocab.from_pretrained(tok), ToolSyntax.of(fmt)


def training_rows(tok: Any, conversations: Sequence[Sequence[Message]]
                  ) -> list[tuple[list[int], list[int], list[bool]]]:
    """(prompt ids, trajectory ids, which of them are assistant tokens) per conversation, in
    ``tok``'s own template: what supervised training reads (environment tokens unlabelled)."""
    fmt, vocab, syntax = side_of(tok)
    rows = []
    for conv in conversations:
        _, prompt, traj = trajectory_from_messages(conv, fmt, vocab, syntax, SCHEMAS)
        rows.append((prompt, traj.ids.tolist(), traj.student_mask.tolist()))
    return rows


def pretrain(model: Any, tok: Any, problems: list, steps: int, lr: float, seed: int,
             **kwargs: Any) -> int:
    """Supervised training on solved trajectories in ``tok``'s template; ``kwargs`` as
    ``supervised_train``'s (``stop``, ``check_every``)."""
    rows = training_rows(tok, [solved(p) for p, _, _ in problems])
    return supervised_train(model, rows, steps, lr, 64, seed, **kwargs)


def rollouts(model: Any, tok: Any, problems: list, *, max_new_tokens: int, greedy: bool,
             seed: int = 0) -> tuple[list[Example], list[list[int]], list[Trajectory]]:
    """Two-turn tool rollouts of ``model`` in its own template (greedy, or sampled at
    temperature 1 from torch's RNG seeded with ``seed``)."""
    side = StudentSide.from_model(model, tok)
    settings = StepSettings.build(max_new_tokens=max_new_tokens, max_turns=2)
    was_training = model.training
    model.eval()
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        out = sample_trajectories(side, [example(p, a) for p, _, a in problems], settings,
                                  Toolbox(TOOLS), greedy=greedy)
    model.train(was_training)
    return out


def grade(problems: list, trajectories: Sequence[Trajectory]) -> dict[str, np.ndarray]:
    """Per problem: ``correct`` (the last assistant turn is the product, after a valid call),
    ``valid`` (the first turn is one call of ``mul`` that parsed and ran) and ``right_call``
    (a valid call with the problem's two factors)."""
    out: dict[str, list[bool]] = {"correct": [], "valid": [], "right_call": []}
    for (prompt, _, answer), traj in zip(problems, trajectories):
        msgs = traj.messages
        calls = msgs[0].get("tool_calls") or []
        ok = (len(calls) == 1 and calls[0]["function"]["name"] == "mul"
              and len(msgs) > 1 and msgs[1].get("role") == "tool"
              and not msgs[1]["content"].startswith("error"))
        a, b = (int(x) for x in prompt.split("*"))
        out["valid"].append(ok)
        out["right_call"].append(ok and calls[0]["function"]["arguments"] == {"a": a, "b": b})
        last = msgs[-1]
        out["correct"].append(ok and last.get("role") == "assistant"
                              and not last.get("tool_calls")
                              and (last.get("content") or "").strip() == str(answer))
    return {k: np.array(v, dtype=bool) for k, v in out.items()}


def evaluate(model: Any, tok: Any, problems: list, max_new_tokens: int) -> dict[str, np.ndarray]:
    """Greedy two-turn rollouts, graded (``grade``)."""
    _, _, trajs = rollouts(model, tok, problems, max_new_tokens=max_new_tokens, greedy=True)
    return grade(problems, trajs)
