"""``crossopd bench learn --teacher-properties``: each property against its definition (pairs
counted for the AUC, ranks counted for Spearman, the model's own loss and its logits' entropy),
and the command on the shipped teacher pairs with gains from a ``bench learn`` result."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.bench.learn import PRESETS, load_models, splits
from crossopd.bench.learn_task import encode_pair
from crossopd.bench.oracle import PrefixLogprobs, sample_problems
from crossopd.bench.teacher_props import (
    PROPERTIES,
    auc,
    correct_logp_per_byte,
    gains_from,
    response_entropy,
    spearman,
    teacher_properties,
)
from crossopd.cli.main import main
from crossopd.step.score import score_rollouts
from crossopd.step.sides import hf_pair


@pytest.fixture(scope="module")
def pair0():
    pairs, _, _ = load_models(PRESETS["quick"], progress=lambda m: None)
    return pairs[0]


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.booleans()), min_size=1, max_size=25))
def test_auc_is_the_share_of_positive_negative_pairs_ordered(rows):
    scores = np.array([float(s) for s, _ in rows])
    positive = np.array([p for _, p in rows])
    wins = [1.0 if a > b else 0.5 if a == b else 0.0
            for a, pa in zip(scores, positive) for b, pb in zip(scores, positive) if pa and not pb]
    got = auc(scores, positive)
    assert (got is None) == (not wins)
    if wins:
        assert got == pytest.approx(sum(wins) / len(wins))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 4), st.integers(0, 4)), min_size=2, max_size=12))
def test_spearman_is_pearson_on_average_ranks(rows):
    x = np.array([float(a) for a, _ in rows])
    y = np.array([float(b) for _, b in rows])

    def ranks(v):  # rank = values below + half the other equal values (0-based average rank)
        return np.array([(v < a).sum() + ((v == a).sum() - 1) / 2 for a in v])

    rx, ry = ranks(x), ranks(y)
    got = spearman(x, y)
    if rx.std() == 0 or ry.std() == 0:
        assert got is None
    else:
        assert got == pytest.approx(float(np.corrcoef(rx, ry)[0, 1]))


def test_correct_logp_per_byte_is_the_models_own_loss(pair0):
    teacher, tok = pair0["teacher_x"]
    _, _, test = splits(PRESETS["quick"])
    problems = test[:5]
    got = correct_logp_per_byte(teacher, tok, problems, PrefixLogprobs.from_model(teacher))
    total, n_bytes = 0.0, 0
    with torch.no_grad():
        for prompt, solution, _ in problems:
            p, r = encode_pair(tok, prompt, solution)
            labels = torch.tensor([[-100] * len(p) + r])
            loss = teacher(input_ids=torch.tensor([p + r]), labels=labels).loss
            total -= float(loss) * len(r)
            n_bytes += len(solution.encode())
    assert got == pytest.approx(total / n_bytes, rel=1e-5)


def test_response_entropy_is_the_entropy_of_the_teachers_logits(pair0):
    student, s_tok = pair0["student"]
    teacher, t_tok = pair0["teacher_x"]
    s_side, teachers = hf_pair(student, s_tok, teacher, t_tok)
    t_side = next(iter(teachers.values()))
    exs, prompts, responses, st_settings = sample_problems(s_side, PRESETS["quick"], 6, 0)
    scored = score_rollouts(s_side, teachers, exs, prompts, responses, st_settings)
    got, n_tokens, n_bytes = response_entropy(scored.requests, PrefixLogprobs.from_model(teacher),
                                              t_side.vocab)
    want, count, spelled = 0.0, 0, 0
    with torch.no_grad():
        for q in scored.requests:
            logits = teacher(input_ids=torch.tensor([q.teacher_ids])).logits[0].double()
            span = logits[q.response_start - 1: q.response_end - 1]
            want += float(torch.distributions.Categorical(logits=span).entropy().sum())
            count += q.response_end - q.response_start
            spelled += len(t_tok.decode(q.teacher_ids[q.response_start:q.response_end]).encode())
    assert (n_tokens, n_bytes) == (count, spelled) and n_tokens > 0
    assert got == pytest.approx(want, rel=1e-6)


def _gains_file(tmp_path, arms):
    base = {"untrained": {"acc_per_pair": [0.1, 0.1, 0.1]}}
    result = {"arms": {**base, **{a: {"acc_per_pair": v} for a, v in arms.items()}}}
    path = tmp_path / "result.json"
    path.write_text(json.dumps(result))
    return path


def test_teacher_properties_on_the_shipped_pairs(tmp_path):
    gains = _gains_file(tmp_path, {"opd_oracle": [0.2, 0.4, 0.15],
                                   "opd_cross_proportional": [0.2, 0.3, 0.1],
                                   "opd_same": [0.35, 0.45, 0.3]})
    r = teacher_properties("quick", gains=gains, n_rollouts=16, progress=lambda m: None)
    rows = r["teachers"]
    assert [(t["pair"], t["teacher"]) for t in rows] == [
        (k, name) for k in range(3) for name in ("teacher_x", "teacher_s")]
    for t in rows:
        assert 0.5 < t["accuracy"] < 0.7  # the shipped teachers are matched near 0.64
        assert t["entropy_per_token"] > 0 and t["correct_logp_per_byte"] < 0
        assert 0 <= t["positive_advantage_share"] <= 1 and 0 < t["answer_advantage_share"] < 1
        assert t["answer_auc"] is None or 0 <= t["answer_auc"] <= 1
        assert t["counts"]["signal_tokens"] == t["counts"]["student_tokens"] > 0
    # both teachers of a pair read the same student samples
    assert rows[0]["counts"]["student_tokens"] == rows[1]["counts"]["student_tokens"]
    assert [round(t["gain"], 6) for t in rows] == [0.1, 0.25, 0.3, 0.35, 0.05, 0.2]
    assert rows[0]["also"] == pytest.approx(0.1) and rows[1]["also"] is None
    assert set(r["spearman_with_gain"]) <= set(PROPERTIES)
    assert "reverse_kl_per_token" in r["spearman_with_gain"]


def test_a_gains_file_without_the_arms_is_refused_and_gains_needs_the_flag(tmp_path, capsys):
    path = _gains_file(tmp_path, {"opd_same": [0.3, 0.3, 0.3]})
    with pytest.raises(ValueError, match="no arm opd_oracle, opd_cross_proportional"):
        gains_from(json.loads(path.read_text()))
    assert main(["bench", "learn", "--gains", str(path)]) == 2
    assert "--gains is for `bench learn --teacher-properties`" in capsys.readouterr().err
    assert main(["bench", "learn", "--teacher-properties", "--preset", "tiny"]) == 2
    assert "use one of those" in capsys.readouterr().err
