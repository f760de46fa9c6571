"""Tool-calling runs of the native engine, as a user launches them: `rollout.tools` /
`rollout.environment` by import path, `rollout.max_turns`, a student that writes its calls in
Hermes text (SmolLM2's template has no tool syntax: `student.tool_format: hermes`) and a
teacher of another tokenizer and another call syntax. The tiny student is first taught to call
the tool (200 steps on one trajectory), so its rollouts really call it."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from test_trajectory import GEMMA_TOOLS
from user_tools import Calculator, Hinting, calc

from crossopd.core.tokens import ByteVocab
from crossopd.models.hub import load_hf_model, load_hf_tokenizer
from crossopd.run.config import ConfigError, load_config
from crossopd.step.bridge import ChatFormat
from crossopd.step.multiturn import tool_schema
from crossopd.step.tool_calls import ToolSyntax
from crossopd.step.trajectory import trajectory_from_messages

from tiny_models import tiny_model

CALL = {"type": "function", "function": {"name": "calc", "arguments": {"expr": "17*23"}}}
TRAJECTORY = [{"role": "user", "content": "What is 17*23?"},
              {"role": "assistant", "content": "", "tool_calls": [CALL]},
              {"role": "tool", "content": "391"},
              {"role": "assistant", "content": "391"}]


@pytest.fixture(scope="module")
def agent(tiny, tmp_path_factory):
    """(a tiny student that calls calc in Hermes text, then answers; a tiny teacher whose
    template writes calls as JSON objects)."""
    root = tmp_path_factory.mktemp("agent")
    tok = load_hf_tokenizer(tiny["student"])
    fmt = ChatFormat.from_tokenizer(tok)
    _, prompt, traj = trajectory_from_messages(
        TRAJECTORY, fmt, ByteVocab.from_pretrained(tok), ToolSyntax.of(fmt, "hermes"),
        [tool_schema(calc)])
    ids = torch.tensor([prompt + traj.ids.tolist()])
    labels = ids.clone()
    labels[0, :len(prompt)] = -100
    labels[0, len(prompt):][~torch.from_numpy(traj.student_mask)] = -100
    model = load_hf_model(tiny["student"])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    for _ in range(200):
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.01, loss.item()
    student = root / "student"
    model.save_pretrained(student)
    tok.save_pretrained(student)
    gemma = copy.copy(load_hf_tokenizer(tiny["teacher"]))  # the loaded one is shared
    gemma.chat_template = GEMMA_TOOLS
    teacher = tiny_model(gemma, root / "teacher", seed=1)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 17*23?", "answer": "391"}) + "\n"
                            for _ in range(8)))
    return {"student": str(student), "teacher": str(teacher), "data": str(data)}


def _overrides(agent: dict, out: Path, *extra: str) -> list[str]:
    return [f"student.model={agent['student']}", "student.tool_format=hermes",
            f"teacher.model={agent['teacher']}", f"data.path={agent['data']}",
            "data.heldout_size=2", "device=cpu", "steps=2", "batch_size=2",
            "rollout.max_new_tokens=40", "rollout.temperature=0.1", "eval_prompts=2",
            "optim.lr=1e-4", f"output_dir={out}", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_native_run_with_tools_trains_two_steps(agent, tmp_path):
    """Two steps of `crossopd train` with tools: the student's calls run, their results come
    back through its template, the teacher scores each assistant turn in its own format; the
    environment's tokens and the call syntax the teacher writes otherwise are counted."""
    from crossopd.run.train import train

    cfg = load_config(None, _overrides(agent, tmp_path / "run", "rollout.max_turns=2",
                                       "rollout.tools=[user_tools:calc]"))
    train(cfg, progress=False)
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["sequences"] == 2 and r["assistant_turns"] > r["sequences"]  # tools were used
        assert r["tool_calls"] > 0 and r["env_tokens"] > 0
        assert r["signal_tokens"] > 0 and np.isfinite(r["loss"])
        # the call's syntax differs (Hermes vs JSON): no signal there, counted
        assert r["format_tokens"] > 0
        assert r["signal_tokens"] <= r["response_tokens"] - r["format_tokens"]
    assert all(r["tool_failures"] == 0 for r in rows)
    evals = _rows(tmp_path / "run" / "eval.jsonl")
    assert evals[-1]["assistant_turns"] > evals[-1]["sequences"]


@pytest.mark.parametrize("extra,message", [
    (["rollout.tools=[user_tools:calc]"], "need rollout.max_turns >= 2"),
    (["rollout.max_turns=3"], "no rollout.tools or rollout.environment is set"),
    (["rollout.tools=[user_tools:calc]", "rollout.max_turns=2", "engine=trl"],
     "engine trl does not run crossopd's tool rollouts yet"),
    (["student.tool_format=xml"], "student.tool_format 'xml': hermes"),
])
def test_tool_settings_errors_name_the_fix(agent, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, _overrides(agent, tmp_path, *extra))


def test_tools_and_environments_load_by_import_path(agent, tmp_path):
    from crossopd.run.load import load_toolbox

    cfg = load_config(None, _overrides(agent, tmp_path, "rollout.max_turns=2",
                                       "rollout.environment=user_tools:Calculator"))
    assert load_toolbox(cfg).environment is Calculator
    cfg = load_config(None, _overrides(agent, tmp_path, "rollout.tools=[user_tools:nope]",
                                       "rollout.max_turns=2"))
    with pytest.raises(ConfigError, match="rollout.tools: 'user_tools' has no 'nope'"):
        load_toolbox(cfg)


def test_a_teacher_that_cannot_render_tool_turns_stops_the_run_before_its_first_step(
        agent, tiny, tmp_path):
    """A base-model teacher with a plain template has no tool-result format: one line, before
    any rollout."""
    from crossopd.run.train import train

    cfg = load_config(None, [*_overrides(agent, tmp_path / "run", "rollout.max_turns=2",
                                         "rollout.tools=[user_tools:calc]"),
                             f"teacher.model={tiny['teacher']}",
                             "teacher.plain_template=Question: {prompt}\nAnswer:",
                             "teacher.stop=\n\nQuestion:"])
    with pytest.raises(ConfigError, match="the teacher teacher cannot take part in tool "
                                          "trajectories: a plain template"):
        train(cfg, progress=False)
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_an_environment_per_rollout_adds_its_reset_text_and_its_tools():
    from crossopd.step.data import Example
    from crossopd.step.multiturn import Toolbox

    box = Toolbox([], Hinting)
    ex, fns = box.open(Example([{"role": "user", "content": "What is 17*23?"}]))
    assert ex.messages[-1]["content"] == "What is 17*23? Use the calculator."
    assert list(fns) == ["calc"] and ex.tools[0]["function"]["name"] == "calc"
    assert box.call(fns, CALL) == "391" and fns["calc"].__self__.history == ["17*23"]
    assert box.call(fns, {"function": {"name": "nope", "arguments": {}}}).startswith(
        "error: KeyError")
    assert box.counts == {"tool_calls": 2, "tool_failures": 1}
