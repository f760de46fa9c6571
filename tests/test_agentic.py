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
from user_tools import Calculator, Hinting, calc

from crossopd.models.hub import load_hf_tokenizer
from crossopd.run.config import ConfigError, load_config
from crossopd.step.multiturn import tool_schema
from crossopd.step.tool_calls import ToolSyntax

from tiny_models import CALL, taught_tool_student, tiny_tool_teacher


@pytest.fixture(scope="module")
def agent(tiny, tmp_path_factory):
    """(a tiny student that calls calc in Hermes text, then answers; a tiny teacher whose
    template writes calls as JSON objects)."""
    root = tmp_path_factory.mktemp("agent")
    student = taught_tool_student(tiny["student"], load_hf_tokenizer(tiny["student"]),
                              lambda fmt: ToolSyntax.of(fmt, "hermes"), root / "student")
    teacher = tiny_tool_teacher(root)
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 17*23?", "answer": "391"}) + "\n"
                            for _ in range(8)))
    return {"student": student, "teacher": str(teacher), "data": str(data)}


@pytest.fixture(scope="module")
def trl_agent(agent, tiny, tmp_path_factory):
    """The agent with a student whose own template writes tool calls (Qwen 2.5's, which TRL
    knows how to parse), as TRL's tool loop needs."""
    from trl.chat_template_utils import qwen2_5_chat_template

    tok = copy.copy(load_hf_tokenizer(tiny["student"]))
    tok.chat_template = qwen2_5_chat_template
    out = tmp_path_factory.mktemp("trl_agent") / "student"
    return {**agent, "student": taught_tool_student(tiny["student"], tok, ToolSyntax.of, out)}


def _overrides(agent: dict, out: Path, *extra: str, tool_format: str | None = "hermes"
               ) -> list[str]:
    return [f"student.model={agent['student']}",
            *([f"student.tool_format={tool_format}"] if tool_format else []),
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
    (["rollout.tools=[user_tools:calc]", "rollout.max_turns=2", "engine=trl",
      "rollout.samples_per_prompt=2"],
     "student.tool_format: engine trl parses the student's tool calls with TRL's parser"),
    (["student.tool_format=xml"], "student.tool_format 'xml': hermes"),
    (["rollout.unparsed_calls=drop"], "rollout.unparsed_calls 'drop': one of score, mask"),
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


def test_trl_tool_rollouts_are_scored_as_the_native_engine_scores_them(trl_agent, tmp_path,
                                                                      monkeypatch):
    """``engine: trl`` with ``rollout.tools``, as a user launches it: TRL's own tool loop
    samples the trajectories (calls parsed by TRL, results rendered by TRL) for 2 steps.
    Replayed turn by turn through the native engine's ``take_turn``, the last step's rollouts
    give the same ids (the same tool-result tokens), and the native ``score_rollouts`` on them
    gives TRL's per-token credit targets, advantages and loss mask."""
    import torch

    from crossopd.integrations.trl import OPDTrainer
    from crossopd.integrations.trl_private import rollout_logps
    from crossopd.run.train import train
    from crossopd.step.data import Example
    from crossopd.step.multiturn import Episode, Toolbox, take_turn
    from crossopd.step.score import score_rollouts
    from crossopd.step.trajectory import end_of_turn_id, student_runs

    cfg = load_config(None, _overrides(trl_agent, tmp_path / "run", "engine=trl",
                                       "rollout.samples_per_prompt=2", "eval_prompts=0",
                                       "checkpoint_every=0", "rollout.max_new_tokens=80",
                                       "rollout.tools=[user_tools:calc]", "rollout.max_turns=2",
                                       tool_format=None))
    seen: dict = {}
    score_batch, trajectories = OPDTrainer.score_batch, OPDTrainer.trajectories

    def capture(self, out, inputs, rollout_s):
        old = rollout_logps(self, out)  # the weights the batch is scored with
        out = score_batch(self, out, inputs, rollout_s)
        seen.update(trainer=self, inputs=inputs, old=old, masks=self.last_tool_masks,
                    prompts=self.last_prompts, stats=dict(self.last_step_stats),
                    out={k: v.detach().clone() for k, v in out.items()})
        return out

    def keep(self, *a):
        seen["built"] = trajectories(self, *a)
        return seen["built"]

    import crossopd.integrations.trl as trl_engine

    score_trl = trl_engine.score_rollouts

    def keep_scored(*a, **k):
        seen["scored"] = score_trl(*a, **k)
        return seen["scored"]

    monkeypatch.setattr(trl_engine, "score_rollouts", keep_scored)
    monkeypatch.setattr(OPDTrainer, "score_batch", capture)
    monkeypatch.setattr(OPDTrainer, "trajectories", keep)
    train(cfg, progress=False)
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["assistant_turns"] > r["sequences"] and r["tool_calls"] > 0 for r in rows)

    trainer = seen["trainer"]
    student, teachers = trainer.student, trainer.teachers
    out, stats = seen["out"], seen["stats"]
    syntax, eot = student.tool_syntax(), end_of_turn_id(student.fmt)
    box, schemas = Toolbox([calc]), [tool_schema(calc)]
    exs, prompts, trajs, old = [], [], [], []
    for i, mask in enumerate(seen["masks"]):
        ids = out["completion_ids"][i, :len(mask)].tolist()
        ex = Example(seen["prompts"][i], answer=seen["inputs"][i]["answer"], tools=schemas)
        prompt = student.fmt.prompt_ids(syntax.messages(ex.messages), ex.tools)
        assert prompt == out["prompt_ids"][i][out["prompt_mask"][i].bool()].tolist()
        ep = Episode(ex, {"calc": calc}, prompt)
        runs = student_runs(np.asarray(mask, dtype=bool))
        for k, (start, end) in enumerate(runs):
            take_turn(ep, ids[start:end], student, syntax, eot, box, last=k == len(runs) - 1)
            assert ep.ids == ids[:len(ep.ids)]  # TRL's tool-result tokens are the native ones
        assert ep.ids == ids
        exs.append(ex)
        prompts.append(prompt)
        trajs.append(ep.trajectory())
        old.append(seen["old"][i, :len(ids)].double())
    # the trajectories OPDTrainer built from TRL's batch are the native ones, with the same
    # conversation for the teacher to render
    built_exs, built = seen["built"]
    assert built_exs == exs
    for b, t in zip(built, trajs):
        assert b.ids.tolist() == t.ids.tolist() and b.turns == t.turns
        assert b.messages == t.messages and b.unparsed_tool_calls == t.unparsed_tool_calls
    assert sum(len(t.turns) for t in trajs) > len(trajs)  # the student's calls ran
    assert box.counts["tool_calls"] == stats["tool_calls"] > 0
    scored = score_rollouts(student, teachers, exs, prompts, trajs, trainer.settings,
                            old_logps=old)
    assert rows[-1]["assistant_turns"] == scored.stats["assistant_turns"]
    for k in ("assistant_turns", "env_tokens", "format_tokens", "signal_tokens"):
        assert stats[k] == scored.stats[k], k
    assert stats["env_tokens"] > 0 and stats["format_tokens"] > 0
    for i, (adv, valid) in enumerate(zip(scored.advantages, scored.signal)):
        n = len(adv)
        np.testing.assert_allclose(out["advantages"][i, :n].numpy(), adv.numpy(), atol=1e-5)
        assert out["tool_mask"][i, :n].bool().tolist() == valid.tolist()
    # the credit targets themselves (NaN where no signal), not only their advantages
    for got, want in zip(seen["scored"].targets, scored.targets, strict=True):
        assert torch.isfinite(want).any()
        np.testing.assert_allclose(got.numpy(), want.numpy(), atol=1e-6, equal_nan=True)
