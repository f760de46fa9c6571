"""Trajectories across tokenizers: multi-turn conversations with tool calls, on the real bundled
tokenizers. The student's side is exactly its template's rendering; each assistant turn is
aligned on its own span (checked against the brute-force references); the teacher's input is
its own format throughout; a tool call in another syntax aligns its equal stretches and counts
the syntax between them; bad input gets one line."""

from __future__ import annotations

import copy
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.core.align import align
from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_tokenizer
from crossopd.step.bridge import ChatFormat, TemplateError, align_bridged
from crossopd.step.tool_calls import ToolSyntax
from crossopd.step.trajectory import read_turn, trajectory_from_messages, turn_requests

from reference import brute_force_sync_offsets, check_alignment, chunk_spans
from strategies import texts
from tiny_models import GEMMA_TOOLS

CALC = {"type": "function", "function": {
    "name": "calc", "description": "Evaluate arithmetic",
    "parameters": {"type": "object", "properties": {"expr": {"type": "string"}},
                   "required": ["expr"]}}}


def call(name: str, **arguments) -> dict:
    return {"type": "function", "function": {"name": name, "arguments": arguments}}


CONVERSATION = [
    {"role": "user", "content": "What is 17*23?"},
    {"role": "assistant", "content": "", "tool_calls": [call("calc", expr="17*23")]},
    {"role": "tool", "content": "391"},
    {"role": "assistant", "content": "17*23 = 391."},
]


class Side:
    def __init__(self, name: str, template: str | None = None) -> None:
        tok = load_hf_tokenizer(name)
        if template is not None:
            tok = copy.copy(tok)
            tok.chat_template = template
        self.tok = tok
        self.vocab = ByteVocab.from_pretrained(name)
        self.fmt = ChatFormat.from_tokenizer(tok, name=name)
        self.syntax = ToolSyntax.of(self.fmt, "hermes")

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)


@pytest.fixture(scope="module")
def smol():
    return Side("smollm2")


@pytest.fixture(scope="module")
def qwen():
    return Side("qwen2.5-coder-1.5b")


@pytest.fixture(scope="module")
def gemma():
    return Side("gemma3-270m", GEMMA_TOOLS)


def bridged(student: Side, teacher: Side, messages, tools=(CALC,)):
    tools = list(tools) if tools else None
    prompt, prompt_ids, traj = trajectory_from_messages(messages, student.fmt, student.vocab,
                                                        student.syntax, tools)
    reqs = turn_requests(prompt, traj, student.syntax, student.vocab, teacher.syntax,
                         teacher.vocab, tools=tools)
    return prompt_ids, traj, reqs


def check_turn(req, sv: ByteVocab, tv: ByteVocab):
    """The turn's alignment; its body part is the alignment of the body alone, whose chunks
    pass the brute-force checks (every chunk exact and minimal; with equal bytes, every offset
    where both decoded prefixes agree is a chunk boundary)."""
    a = align_bridged(req, sv, tv)
    body = req.student_response[: req.student_stop_index]
    t_body = np.asarray(req.teacher_ids[req.response_start:req.response_end])
    alone = align(body, t_body, sv, tv)
    np.testing.assert_array_equal(a.student_chunk[:len(body)], alone.student_chunk)
    check_alignment(alone, body, t_body, sv, tv)
    if alone.bytes_equal:
        spans = chunk_spans(alone, sv, body, "student")
        bounds = {0} | {hi for _, hi in spans.values()}
        assert brute_force_sync_offsets(body, t_body, sv, tv) <= bounds
    return a


def test_the_student_side_is_its_templates_rendering_and_env_tokens_are_counted(smol):
    """prompt ids + trajectory ids decode to the student's template rendering of the whole
    conversation (calls as Hermes text, SmolLM2's template has no tool syntax, so the tool
    definitions go into a system message); the tokens outside the assistant turns are the
    environment's, counted exactly."""
    prompt_ids, traj, _ = bridged(smol, smol, CONVERSATION)
    full = smol.syntax.fmt.render_fn(smol.syntax.messages(CONVERSATION), False, [CALC])
    assert smol.decode(prompt_ids + traj.ids.tolist()) == full.rstrip("\n")
    prompt = smol.decode(prompt_ids)
    assert prompt.startswith("<|im_start|>system\n") and '"name": "calc"' in prompt
    assert "<tool_call>" in prompt  # the definitions say how to call
    assert len(traj.turns) == 2 and traj.unparsed_tool_calls == 0
    env = [traj.ids[e:s] for (_, e), (s, _) in zip(traj.turns, traj.turns[1:])]
    assert smol.decode(env[0]) == "\n<|im_start|>tool\n391<|im_end|>\n<|im_start|>assistant\n"
    assert traj.env_tokens == sum(len(x) for x in env) == int((~traj.student_mask).sum())
    assert traj.env_tokens == len(smol.tok(smol.decode(env[0]),
                                           add_special_tokens=False)["input_ids"])


def test_equal_assistant_bytes_align_fully_per_turn(smol, qwen):
    """SmolLM2 (Hermes text) -> Qwen2.5-Coder (its template's own tool syntax, the same
    bytes): every assistant turn has coverage 1.0, and its chunks are the brute-force ones."""
    _, traj, reqs = bridged(smol, qwen, CONVERSATION)
    assert [r.reformatted for r in reqs] == [True, False]
    for tr in reqs:
        a = check_turn(tr.request, smol.vocab, qwen.vocab)
        assert a.coverage == 1.0 and a.counts["unaligned_student_tokens"] == 0
        assert tr.request.stop_end > tr.request.response_end  # the student ended its turn
    # the teacher's input for the last turn: its own rendering of the whole conversation
    text = qwen.decode(reqs[-1].request.teacher_ids)
    assert "<tool_response>\n391\n</tool_response>" in text
    assert text.endswith("17*23 = 391.<|im_end|>")


def test_the_teacher_sees_its_own_format_only(smol, gemma):
    """No student marker or student call syntax in the teacher's input: environment turns in
    the teacher's tool-result format, the call in the teacher's syntax, its own end-of-turn."""
    _, _, reqs = bridged(smol, gemma, CONVERSATION)
    for tr in reqs:
        text = gemma.decode(tr.request.teacher_ids)
        for marker in ("<|im_start|>", "<|im_end|>", "<tool_call>", '"arguments"'):
            assert marker not in text, (marker, text)
        assert text.endswith("<end_of_turn>")
    last = gemma.decode(reqs[-1].request.teacher_ids)
    assert ('<start_of_turn>model\n{"name": "calc", "parameters": {"expr": "17*23"}}'
            '<end_of_turn>\n<start_of_turn>user\nTool result: 391<end_of_turn>\n'
            '<start_of_turn>model\n17*23 = 391.<end_of_turn>') in last


def test_a_call_in_another_syntax_aligns_its_equal_stretches(smol, gemma):
    """<tool_call>{"name": "calc", "arguments": ...}</tool_call> against {"name": "calc",
    "parameters": ...}: the name and the argument values are aligned chunks; the syntax around
    them has no chunk (format tokens); every student token is one or the other."""
    _, _, reqs = bridged(smol, gemma, CONVERSATION)
    tr = reqs[0]
    assert tr.reformatted
    a = align_bridged(tr.request, smol.vocab, gemma.vocab)
    body = tr.request.student_response[:-1]
    chunk = a.student_chunk[:-1]
    pieces = smol.vocab.token_bytes(body)
    aligned = b"".join(p for p, c in zip(pieces, chunk) if c >= 0)
    assert b"calc" in aligned and b"17*23" in aligned
    assert b"<tool_call>" not in aligned and b"arguments" not in aligned
    fmt_tokens = int(((chunk < 0) & (smol.vocab.lengths[body] > 0)).sum())
    assert fmt_tokens > 0
    assert fmt_tokens == a.counts["unaligned_student_tokens"]
    assert a.student_chunk[-1] == a.num_chunks - 1  # the stop chunk pairs both end-of-turns


def test_a_sampled_call_parses_only_when_it_round_trips(smol):
    history = CONVERSATION[:1]
    exact = smol.syntax.turn_text(history, CONVERSATION[1], [CALC])
    message, unparsed = read_turn(smol.syntax, history, exact, [CALC])
    assert message["tool_calls"] == [call("calc", expr="17*23")] and not unparsed
    squeezed = '<tool_call>\n{"name":"calc","arguments":{"expr":"17*23"}}\n</tool_call>'
    message, unparsed = read_turn(smol.syntax, history, squeezed, [CALC])
    assert message == {"role": "assistant", "content": squeezed} and unparsed
    message, unparsed = read_turn(smol.syntax, history, "It is 391.", [CALC])
    assert message == {"role": "assistant", "content": "It is 391."} and not unparsed


def test_a_call_written_as_text_is_scored_as_the_students_bytes(smol, gemma):
    """A call as content text that does not round-trip is the student's own bytes: scored
    verbatim (full coverage against the teacher's spelling of the same bytes), counted."""
    text = '<tool_call>{"name":"calc"}</tool_call> then 391'
    rows = [CONVERSATION[0], {"role": "assistant", "content": text}]
    _, traj, (tr,) = bridged(smol, gemma, rows)
    assert traj.unparsed_tool_calls == 1 and not tr.reformatted
    assert align_bridged(tr.request, smol.vocab, gemma.vocab).coverage == 1.0


@settings(max_examples=25)
@given(first=texts(), second=texts(), result=st.text(max_size=20))
def test_content_turns_align_on_their_own_spans(smol, gemma, first, second, result):
    """Any assistant texts around a tool result: each content turn is aligned on its own span,
    every chunk exact (the brute-force checks), full coverage where the teacher spells every
    byte."""
    first = first.replace("<tool_call>", "") or "ok"
    second = second or "done"
    rows = [{"role": "user", "content": "Go."}, {"role": "assistant", "content": first},
            {"role": "tool", "content": result}, {"role": "assistant", "content": second}]
    _, traj, reqs = bridged(smol, gemma, rows, tools=None)
    for tr in reqs:
        a = check_turn(tr.request, smol.vocab, gemma.vocab)
        if a.bytes_equal:
            assert a.coverage == 1.0
    assert traj.env_tokens == len(traj.ids) - sum(e - s for s, e in traj.turns)


def test_bad_trajectories_get_one_line(smol, gemma):
    bare = ToolSyntax.of(ChatFormat.from_tokenizer(load_hf_tokenizer("smollm2"),
                                                   name="smollm2"))
    with pytest.raises(TemplateError, match="set tool_format: hermes"):
        trajectory_from_messages(CONVERSATION, smol.fmt, smol.vocab, bare, [CALC])
    with pytest.raises(TemplateError, match="ends with its last assistant turn"):
        trajectory_from_messages(CONVERSATION[:3], smol.fmt, smol.vocab, smol.syntax, [CALC])
    # a base-model teacher's plain template has no tool turns; as a student, no end-of-turn
    plain = ChatFormat.from_tokenizer(load_hf_tokenizer("gemma3-270m"), name="gemma",
                                      plain_template="Q: {prompt}\nA:", stop="\n\nQ:")
    prompt, _, traj = trajectory_from_messages(CONVERSATION, smol.fmt, smol.vocab, smol.syntax,
                                               [CALC])
    with pytest.raises(TemplateError, match="plain template renders system, user and assistant"):
        turn_requests(prompt, traj, smol.syntax, smol.vocab, ToolSyntax.of(plain, "hermes"),
                      gemma.vocab, tools=[CALC])
    with pytest.raises(TemplateError, match="not one end-of-turn token"):
        trajectory_from_messages(CONVERSATION, plain, gemma.vocab,
                                 ToolSyntax.of(plain, "hermes"), [CALC])
    # a template that shows an earlier assistant turn otherwise than the turn it just ended
    # (Qwen3 drops earlier turns' reasoning): where the turn ends is not where the next begins
    forgetful = copy.copy(load_hf_tokenizer("smollm2"))
    forgetful.chat_template = (
        "{% for m in messages %}<|im_start|>{{ m.role }}\n"
        "{{ m.content if m.role != 'assistant' or loop.last else '(earlier turn)' }}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
        "{% endif %}")
    fmt = ChatFormat.from_tokenizer(forgetful, name="forgetful")
    rows = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "ok"},
            {"role": "tool", "content": "1"}, {"role": "assistant", "content": "done"}]
    with pytest.raises(TemplateError, match="the assistant turn does not end where the "
                                            "environment's begins"):
        trajectory_from_messages(rows, fmt, smol.vocab, ToolSyntax.of(fmt, "hermes"), None)
    with pytest.raises(TemplateError, match="an environment message has role 'robot'"):
        trajectory_from_messages([*rows[:2], {"role": "robot", "content": "1"}, rows[3]],
                                 smol.fmt, smol.vocab, smol.syntax, None)


def test_doctor_reports_trajectories(tmp_path, capsys):
    from crossopd.cli.main import main

    path = tmp_path / "traj.jsonl"
    rows = [{"messages": CONVERSATION, "tools": [CALC]},
            {"messages": [{"role": "user", "content": "Capital of France?"},
                          {"role": "assistant", "content": "Looking.", "tool_calls": [
                              {"type": "function", "function": {
                                  "name": "lookup",
                                  "arguments": json.dumps({"q": "capital of France"})}}]},
                          {"role": "tool", "content": "Paris"},
                          {"role": "user", "content": "And?"},
                          {"role": "assistant", "content": "It is Paris 🇫🇷."}]}]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    assert main(["doctor", "--student", "smollm2", "--teacher", "qwen2.5-coder-1.5b",
                 "--data", str(path), "--tool-format", "hermes", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert len(r["trajectories"]) == 2
    for t in r["trajectories"]:
        assert {"assistant_turns", "env_tokens", "format_tokens", "coverage",
                "unaligned_tokens", "teacher_text"} <= set(t)
        assert t["assistant_turns"] == 2 and t["coverage"] == 1.0 and t["format_tokens"] == 0
        assert t["env_tokens"] > 0 and "<|im_start|>assistant\n" in t["teacher_text"]
    assert "<tool_response>\nParis\n</tool_response>" in r["trajectories"][1]["teacher_text"]
    # without --tool-format, SmolLM2's template (no tool syntax) cannot write the calls
    assert main(["doctor", "--student", "smollm2", "--teacher", "qwen2.5-coder-1.5b",
                 "--data", str(path), "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert all("tool_format: hermes" in t["error"] for t in r["trajectories"])
    assert any("set tool_format: hermes" in w for w in r["warnings"])


def test_a_step_trains_assistant_turns_only(tiny, gemma):
    """``score_rollouts`` on a trajectory: each assistant turn's targets are exactly the
    single-request credit of that turn (its own teacher request, its slice of the rollout
    log-probs), the environment tokens have no target and no signal and are counted, and the
    counts add up over the turns."""
    from dataclasses import replace

    from crossopd.models.hub import load_hf_model
    from crossopd.step.data import Example
    from crossopd.step.score import credit_targets, score_rollouts
    from crossopd.step.settings import StepSettings
    from crossopd.step.sides import StudentSide, TeacherSide, one_teacher
    from crossopd.teachers.hf import HFTeacher

    s_tok = load_hf_tokenizer(tiny["student"])
    student = replace(StudentSide.from_model(load_hf_model(tiny["student"]), s_tok),
                      tool_format="hermes")
    teacher = TeacherSide.from_tokenizer(HFTeacher(load_hf_model(tiny["teacher"])),
                                         gemma.tok, fmt=gemma.fmt)
    ex = Example(CONVERSATION[:1], tools=[CALC])
    _, prompt_ids, traj = trajectory_from_messages(CONVERSATION, student.fmt, student.vocab,
                                                   student.tool_syntax(), [CALC])
    settings = StepSettings.build()
    s = score_rollouts(student, one_teacher(teacher), [ex], [prompt_ids], [traj], settings)
    q, valid = s.targets[0].numpy(), s.signal[0].numpy()
    env = ~traj.student_mask
    assert np.isnan(q[env]).all() and not valid[env].any()
    assert len(s.units) == 2 and [u.reformatted for u in s.units] == [True, False]
    old = s.old_logps[0].numpy()
    for u, lp in zip(s.units, s.teacher_logps):
        c = credit_targets(u.request, lp, old[u.start:u.end], student.vocab, teacher.vocab)
        np.testing.assert_array_equal(q[u.start:u.end], c.targets)
        # the credit rule's definition on each aligned chunk: targets sum to the teacher's
        a = c.alignment
        for k in range(a.num_chunks):
            t_sum = lp[a.teacher_chunk == k].sum()
            assert np.isclose(q[u.start:u.end][a.student_chunk == k].sum(), t_sum)
    st = s.stats
    assert st["sequences"] == 1 and st["assistant_turns"] == 2
    assert st["env_tokens"] == traj.env_tokens == int(env.sum())
    assert st["response_tokens"] == int(traj.student_mask.sum())
    assert st["format_tokens"] > 0 and st["unaligned_tokens"] == 0
    assert st["stop_chunks"] == 2 and st["stop_rate"] == 1.0
    assert st["signal_tokens"] == int(valid.sum())


def test_a_verl_sample_is_read_from_its_student_tokens_where_verl_stopped(smol):
    """verl's tool agent loop keeps no assistant message for a last turn it stopped at its
    length or turn limit, and keeps the tool messages whose tokens no longer fitted: the
    worker reads the sample from its student tokens, and the environment after its last turn
    is never scored."""
    from crossopd.integrations.verl.targets import sample_response
    from crossopd.step.sides import StudentSide

    student = StudentSide(model=None, tokenizer=smol.tok, fmt=smol.fmt, vocab=smol.vocab,
                          pad_id=0, tool_format="hermes")
    prompt, _, traj = trajectory_from_messages(CONVERSATION, smol.fmt, smol.vocab, smol.syntax,
                                               [CALC])
    mask, kept = traj.student_mask, list(traj.messages)

    def read(n: int, messages: list) -> object:
        return sample_response(student, prompt, traj.ids[:n], mask[:n],
                               {"messages": messages, "tools": [CALC]})

    whole = read(len(traj.ids), kept)
    assert whole.turns == traj.turns and whole.messages == traj.messages
    assert whole.env_tokens == traj.env_tokens > 0
    cut = len(traj.ids) - 2  # the last turn cut by the length limit: no message kept for it
    short = read(cut, kept[:2])
    assert short.turns == (traj.turns[0], (traj.turns[1][0], cut))
    assert short.messages[:2] == traj.messages[:2]
    first = traj.turns[0][1]  # the tool result did not fit: its message kept, no tokens
    dropped = read(first, kept[:2])
    assert dropped.turns == (traj.turns[0],) and dropped.env_tokens == 0
    assert sample_response(student, prompt, traj.ids, mask, None) is traj.ids


def test_a_trajectory_file_is_told_from_a_file_of_multi_turn_prompts():
    """A multi-turn prompt holds assistant turns too, but ends with the user's: only rows
    ending with an assistant turn are checked as trajectories."""
    from pathlib import Path

    from crossopd.step.data import is_trajectory_file

    examples = Path(__file__).parents[1] / "examples"
    assert is_trajectory_file(str(examples / "trajectories.jsonl"))
    assert not is_trajectory_file(str(examples / "verl" / "multiturn_chat.jsonl"))


def test_align_shows_a_trajectory_with_its_environment_and_format_stretches(smol, gemma,
                                                                            tmp_path, capsys):
    """``crossopd align --trajectories``: every token of the trajectory is in exactly one row;
    the environment's tokens and the call syntax the teacher writes otherwise have rows of
    their own kinds (and colours), as many tokens as the step library counts."""
    from pathlib import Path

    from crossopd.cli.main import main
    from crossopd.step.data import load_trajectories

    teacher = tmp_path / "teacher"
    gemma.tok.save_pretrained(teacher)  # Gemma's tokenizer with a template that writes calls
    data = Path(__file__).parents[1] / "examples" / "trajectories.jsonl"
    page = tmp_path / "view.html"
    assert main(["align", "--student", "smollm2", "--teacher", str(teacher), "--trajectories",
                 str(data), "--tool-format", "hermes", "--json", "--html", str(page)]) == 0
    r = json.loads(capsys.readouterr().out)
    row = load_trajectories(str(data))[0]
    _, _, traj = trajectory_from_messages(row.messages, smol.fmt, smol.vocab, smol.syntax,
                                          row.tools)
    tokens = {k: sum(len(c["student_ids"]) for c in r["chunks"] if c["kind"] == k)
              for k in ("environment", "format")}
    assert r["assistant_turns"] == 2 and tokens["environment"] == r["env_tokens"] \
        == traj.env_tokens > 0
    assert tokens["format"] == r["format_tokens"] > 0
    assert sum(len(c["student_ids"]) for c in r["chunks"]) == len(traj.ids)
    # the format stretches are the two call syntaxes: Hermes tags against a JSON object's keys
    fmt = [(c["student_pieces"], c["teacher_pieces"]) for c in r["chunks"]
           if c["kind"] == "format"]
    assert (["arguments"], ["parameters"]) in fmt
    html = page.read_text()
    assert 'class="env"' in html and 'class="fmt"' in html and "environment (never" in html


def test_unparsed_calls_mask_takes_the_signal_from_a_turn_whose_call_does_not_parse(tiny,
                                                                                      gemma):
    """``unparsed_calls: mask``: a turn that opens a call in some syntax but does not parse gets
    no signal (every token but a penalised special one NaN) and its tokens are counted; the
    other turns' targets are those of ``score``, the default, which scores the turn verbatim.
    An engine that scores a rollout at a time (``rollout_credit``, the verl worker) agrees."""
    from dataclasses import replace

    from crossopd.models.hub import load_hf_model
    from crossopd.step.data import Example
    from crossopd.step.score import rollout_credit, score_rollouts
    from crossopd.step.settings import StepSettings
    from crossopd.step.sides import StudentSide, TeacherSide, one_teacher
    from crossopd.teachers.hf import HFTeacher

    s_tok = load_hf_tokenizer(tiny["student"])
    student = replace(StudentSide.from_model(load_hf_model(tiny["student"]), s_tok),
                      tool_format="hermes")
    teacher = TeacherSide.from_tokenizer(HFTeacher(load_hf_model(tiny["teacher"])),
                                         gemma.tok, fmt=gemma.fmt)
    broken = '<tool_call>{"name": "calc", "arguments": {"expr": 17*23}}</tool_call>'
    rows = [CONVERSATION[0], {"role": "assistant", "content": broken},
            {"role": "tool", "content": "error: not JSON"}, CONVERSATION[3]]
    ex = Example(rows[:1], tools=[CALC])
    _, prompt_ids, traj = trajectory_from_messages(rows, student.fmt, student.vocab,
                                                   student.tool_syntax(), [CALC])
    assert traj.unparsed_tool_calls == 1
    out = {}
    for policy in ("score", "mask"):
        settings = StepSettings.build(unparsed_calls=policy)
        out[policy] = score_rollouts(student, one_teacher(teacher), [ex], [prompt_ids], [traj],
                                     settings)
        s = out[policy]
        assert [u.unparsed for u in s.units] == [True, False]
        q, _ = rollout_credit(student, teacher, s.units, s.teacher_logps,
                              s.old_logps[0].numpy(), settings, traj)
        np.testing.assert_array_equal(q, s.targets[0].numpy())
    a, (start, end) = traj.turns
    scored, masked = out["score"], out["mask"]
    assert not np.isnan(scored.targets[0].numpy()[a[0]:a[1]]).all()
    assert np.isnan(masked.targets[0].numpy()[a[0]:a[1]]).all()
    assert not masked.signal[0].numpy()[a[0]:a[1]].any()
    np.testing.assert_array_equal(masked.targets[0].numpy()[start:end],
                                  scored.targets[0].numpy()[start:end])
    assert masked.stats["masked_unparsed_tokens"] == a[1] - a[0]
    assert scored.stats["masked_unparsed_tokens"] == 0
    assert masked.stats["unparsed_tool_calls"] == scored.stats["unparsed_tool_calls"] == 1
    assert masked.stats["signal_tokens"] == scored.stats["signal_tokens"] - (a[1] - a[0])


def test_hermes_puts_the_tool_definitions_where_the_template_drops_them(smol, qwen):
    """SmolLM2's template drops ``tools``: with ``tool_format: hermes`` the definitions go into a
    system message (Qwen 2.5's words and layout), in the student's prompt and in every later
    rendering of the conversation alike; Qwen's own template renders them itself, unchanged."""
    from crossopd.step.tool_calls import renders_tools

    user = CONVERSATION[:1]
    assert not renders_tools(smol.fmt) and renders_tools(qwen.fmt)
    text = smol.syntax.fmt.render(user, True, [CALC])
    assert "<tools>\n" + json.dumps(CALC) + "\n</tools>" in text
    assert text.index("<tools>") < text.index("What is 17*23?")
    assert smol.fmt.render(user, True, [CALC]) == smol.fmt.render(user, True, None)
    system = [{"role": "system", "content": "Be brief."}, *user]
    assert "Be brief.\n\n# Tools" in smol.syntax.fmt.render(system, True, [CALC])
    assert qwen.syntax.fmt.render(user, True, [CALC]) == qwen.fmt.render(user, True, [CALC])
    # the trajectory's prompt ids are the prompt with the definitions
    _, prompt_ids, _ = trajectory_from_messages(CONVERSATION, smol.fmt, smol.vocab, smol.syntax,
                                                [CALC])
    assert "<tools>" in smol.decode(prompt_ids)
