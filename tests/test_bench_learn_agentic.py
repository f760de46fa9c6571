"""``bench learn --agentic``: the tool task's tokenizers, grader and oracle on trajectories, and a
tiny end-to-end run through the CLI (the pipeline only: which arm wins is the benchmark's
question, not the test's)."""

from __future__ import annotations

import dataclasses
import json
import random

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.bench import learn_agentic_task as task
from crossopd.bench.learn_agentic import AGENTIC_PRESETS, ARMS, COMPARISONS, load_models
from crossopd.bench.learn_arms import oracle_scored
from crossopd.bench.oracle import PrefixLogprobs, rollout_oracle
from crossopd.cli.main import main
from crossopd.step.multiturn import Toolbox
from crossopd.step.rollout import rollout_and_score
from crossopd.step.settings import StepSettings
from crossopd.step.sides import hf_pair
from crossopd.step.trajectory import Trajectory, trajectory_from_messages


@pytest.fixture(scope="module")
def toks():
    train, _, _ = task.splits(300, 10, 10)
    return task.tokenizers(train)


@settings(max_examples=40, deadline=None)
@given(a=st.integers(10, 99), b=st.integers(10, 99))
def test_a_conversation_tokenizes_the_same_whole_and_turn_by_turn(toks, a, b):
    """A teacher reads its whole conversation tokenized at once; a trajectory's ids are its
    prompt, turns and environment tokenized apart. On both sides they agree (no merge crosses a
    role marker, a line break or a number), so a teacher trained on trajectories is scored in
    distribution; and the two sides split numbers differently."""
    conv = task.solved(f"{a}*{b}")
    for side in ("teacher", "student"):
        tok = toks[side]
        (prompt, ids, mask), = task.training_rows(tok, [conv])
        whole = tok(tok.apply_chat_template(conv, tokenize=False),
                    add_special_tokens=False)["input_ids"]
        assert prompt + ids == whole[:len(prompt) + len(ids)]
        assert tok.convert_ids_to_tokens(whole[len(prompt) + len(ids):]) in ([], ["\n"], ["Ċ"])
        assert sum(mask) < len(ids)  # the tool's result is not the model's to learn
    digits = {side: [t for t in toks[side].convert_ids_to_tokens(
        task.training_rows(toks[side], [conv])[0][1]) if t.isdigit()] for side in toks}
    assert all(len(t) == 1 for t in digits["student"])
    assert "".join(digits["teacher"]) == "".join(digits["student"])


def test_the_grader_needs_a_valid_call_and_the_product(toks):
    tok = toks["student"]
    fmt, vocab, syntax = task.side_of(tok)
    problems = [("12*34", "", 408)] * 4
    solved = task.solved("12*34")
    wrong_answer = [*solved[:3], {"role": "assistant", "content": "409"}]
    wrong_args = task.solved("12*35")
    wrong_args[0] = solved[0]
    broken = [solved[0], {"role": "assistant", "content": '<tool_call>{"name": "mul"}'}]
    trajs = [trajectory_from_messages(c, fmt, vocab, syntax, task.SCHEMAS)[2]
             for c in (solved, wrong_answer, wrong_args)]
    trajs.append(Trajectory(np.zeros(0, dtype=np.int64), (), tuple(broken[1:]), 1))
    g = task.grade(problems, trajs)
    assert g["correct"].tolist() == [True, False, False, False]
    assert g["valid"].tolist() == [True, True, True, False]
    assert g["right_call"].tolist() == [True, True, False, False]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory):
    mp = pytest.MonkeyPatch()
    mp.setenv("CROSSOPD_CACHE", str(tmp_path_factory.mktemp("cache")))
    # trained long enough to call the tool, often in a malformed way
    preset = dataclasses.replace(AGENTIC_PRESETS["tiny"], teacher_pairs=1, width=64, layers=2,
                                 student_steps=80, teacher_steps=30)
    pairs, _ = load_models(preset, progress=lambda m: None)
    yield pairs[0]
    mp.undo()


def test_the_oracle_scores_each_assistant_turn_on_its_own_span(tiny_models):
    """``oracle_scored`` on trajectories: each turn's targets are the oracle's for that turn's
    request alone, the environment tokens have none, and with ``mask_unparsed`` a turn whose
    call did not parse has none either."""
    m = tiny_models
    side, teachers = hf_pair(m["student"][0], m["student"][1], *m["teacher_x"])
    settings_ = StepSettings.build(max_new_tokens=24, max_turns=2)
    train, _, _ = task.splits(300, 10, 10)
    torch.manual_seed(0)
    batch = [task.example(p, a) for p, _, a in random.Random(0).sample(train, 12)]
    scored = rollout_and_score(side, teachers, batch, settings_, toolbox=Toolbox(task.TOOLS))
    assert scored.stats["assistant_turns"] > scored.stats["sequences"]  # some called the tool
    assert any(u.unparsed for u in scored.units)
    prefix = PrefixLogprobs.from_model(m["teacher_x"][0])
    tv = teachers["teacher"].vocab
    for mask in (False, True):
        arm = oracle_scored(scored, prefix, side.vocab, tv, None, 10.0, min_mass=1e-12,
                            mask_unparsed=mask)
        covered = [np.zeros(len(o), dtype=bool) for o in scored.old_logps]
        for u, req, a, lp in zip(scored.units, scored.requests, scored.alignments,
                                 scored.teacher_logps):
            q = arm.targets[u.rollout].numpy()[u.start:u.end]
            covered[u.rollout][u.start:u.end] = True
            if mask and u.unparsed:
                assert np.isnan(q).all()
                continue
            (alone,) = rollout_oracle(prefix, side.vocab, tv, [req], [a], [lp], min_mass=1e-12)
            np.testing.assert_array_equal(q, alone)
        for q, c in zip(arm.targets, covered):
            assert np.isnan(q.numpy()[~c]).all()  # environment tokens


def test_tiny_agentic_run_reports_every_arm_with_intervals(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    assert main(["bench", "learn", "--agentic", "--preset", "tiny", "--json",
                 "--out", str(out)]) == 0
    r = json.loads(capsys.readouterr().out)
    preset = AGENTIC_PRESETS["tiny"]
    runs = preset.teacher_pairs * preset.seeds
    assert list(r["arms"]) == list(ARMS) and set(r["comparisons"]) == set(COMPARISONS)
    for name, c in r["comparisons"].items():
        assert {"value", "ci_low", "ci_high", "half_width"} <= set(c), name
    for arm, a in r["arms"].items():
        assert len(a["acc_per_run"]) == runs
        assert 0.0 <= a["acc"] <= a["tool_call_validity"] <= 1.0  # correct needs a valid call
        if arm.startswith("opd_"):
            assert a["student_tokens"] >= preset.budget_tokens
            # every student token is a signal token, or counted under one reason why not
            assert a["signal_tokens"] <= runs * a["student_tokens"]
    assert r["arms"]["opd_cross"]["masked_unparsed_tokens"] == 0
    saved = json.loads((out / "runs.json").read_text())
    assert [len(saved[a]) for a in ARMS] == [runs] * len(ARMS)
    assert r["machine"] and r["seconds"] > 0
    assert main(["bench", "learn", "--agentic", "--preset", "tiny", "seeds=1"]) == 2
    assert "no KEY=VALUE overrides" in capsys.readouterr().err
