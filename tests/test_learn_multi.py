"""``crossopd bench learn --multi-teacher``: the sub-tasks against their checkers, the
specialists' data, the three tokenizers, routing and mixing through the stacked OPD loop (a
routed student against the same student with one teacher, together against alone), the shipped
sets against their manifest, and the tiny preset end to end through the CLI."""

from __future__ import annotations

import dataclasses
import json
import random
import shutil

import numpy as np
import pytest
import torch

from crossopd.bench.learn_arms import run_opd_seeds
from crossopd.bench.learn_multi import ARMS, MULTI_PRESETS, route
from crossopd.bench.learn_multi_models import (
    KINDS,
    SHIPPED,
    SPECIALISTS,
    artifact_key,
    kind_of,
    load_artifacts,
    locate,
    make_problem,
    specialist_rows,
    splits,
    student_rows,
)
from crossopd.bench.learn_task import check_answer
from crossopd.bench.learn_teachers import ArtifactError, verify


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """The tiny preset's two sets and student, trained into a cache of this module's own."""
    preset = dataclasses.replace(MULTI_PRESETS["tiny"], teacher_steps=30, student_steps=30)
    mp = pytest.MonkeyPatch()
    mp.setenv("CROSSOPD_CACHE", str(tmp_path_factory.mktemp("cache")))
    root, source = locate(preset, preset.teacher_sets, progress=lambda m: None)
    mp.undo()
    assert source == "trained"
    return preset, root, load_artifacts(root, preset.teacher_sets)


def test_problems_meet_their_checker_and_route_to_their_specialist():
    for kind in KINDS:
        rng = random.Random(0)
        for _ in range(100):
            prompt, solution, answer = make_problem(rng, kind)
            assert check_answer(solution, answer) and answer == eval(prompt[:-1])
            assert kind_of(prompt) == kind and route(prompt) == f"teacher_{kind}"
    data = splits(MULTI_PRESETS["quick"])
    for kind in KINDS:
        train, val, test = ({p for p, _, _ in rows} for rows in data[kind])
        assert not (train & val or train & test or val & test)


def test_a_specialist_sees_weak_share_of_the_other_sub_task_and_the_student_more_sub():
    train = splits(MULTI_PRESETS["quick"])
    train = {k: train[k][0] for k in KINDS}
    rows = specialist_rows(train, "sub", 0.05, seed=0)
    kinds = [kind_of(p) for p, _, _ in rows]
    assert kinds.count("sub") == len(train["sub"])
    assert kinds.count("add") / len(rows) == pytest.approx(0.05, abs=1e-3)
    student = [kind_of(p) for p, _, _ in student_rows(train, 0.67)]
    assert student.count("sub") == len(train["sub"])
    assert student.count("sub") / len(student) == pytest.approx(0.67, abs=1e-3)


def test_the_three_tokenizers_split_numbers_three_ways(tiny):
    _, _, sets = tiny
    toks = {name: sets[0][name][1] for name in (*SPECIALISTS, "student")}
    texts = [p + s for k in KINDS for p, s, _ in splits(MULTI_PRESETS["tiny"])[k][0][:50]]

    def pieces(tok, text):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        return tuple(tok.decode(ids[: i + 1]) for i in range(len(ids)))  # boundaries

    for a, b in [("teacher_add", "teacher_sub"), ("teacher_add", "student"),
                 ("teacher_sub", "student")]:
        differ = sum(pieces(toks[a], t) != pieces(toks[b], t) for t in texts)
        assert differ > len(texts) // 2, (a, b, differ)


def test_routing_every_row_to_one_specialist_is_that_specialist_alone(tiny):
    preset, _, sets = tiny
    preset = dataclasses.replace(preset, budget_tokens=300)
    data = splits(preset)
    train = data["add"][0] + data["sub"][0]
    test = data["add"][2] + data["sub"][2]

    def opd(seeds, **kw):
        return run_opd_seeds(sets[0], rule="proportional", preset=preset, seeds=seeds,
                             train_set=train, test_set=test, keep_weights=True, **kw)

    alone = opd([0], teacher_key="teacher_add")[0]
    routed_to_add = opd([0], teacher_key=SPECIALISTS, route=lambda p: "teacher_add")[0]
    assert routed_to_add["tokens"] == alone["tokens"] >= 300
    for name, w in alone["weights"].items():
        torch.testing.assert_close(routed_to_add["weights"][name], w, atol=0, rtol=0)
    # routing by sub-task gives the sub rows another teacher: another student
    routed = opd([0, 1], teacher_key=SPECIALISTS, route=route)
    assert any((routed[0]["weights"][k] - alone["weights"][k]).abs().max() > 1e-6
               for k in alone["weights"])
    # and a routed student trained beside another is the one trained alone
    for seed, together in zip([0, 1], routed):
        by_itself = opd([seed], teacher_key=SPECIALISTS, route=route)[0]
        assert together["tokens"] == by_itself["tokens"]
        for name, w in together["weights"].items():
            torch.testing.assert_close(w, by_itself["weights"][name], atol=1e-5, rtol=0)
    mixed = opd([0], teacher_key=SPECIALISTS, mix=dict.fromkeys(SPECIALISTS, 1.0))[0]
    assert any((mixed["weights"][k] - routed[0]["weights"][k]).abs().max() > 1e-6
               for k in alone["weights"])
    with pytest.raises(ValueError, match="oracle arm scores with one teacher"):
        opd([0], teacher_key=SPECIALISTS, oracle=True)


def test_the_shipped_sets_match_their_manifest_and_a_changed_byte_is_refused(tmp_path):
    manifest = verify(SHIPPED)
    for name in ("quick", "standard"):
        preset = MULTI_PRESETS[name]
        assert manifest["key"] == artifact_key(preset)
        assert locate(preset, preset.teacher_sets)[1] == "shipped"
    assert manifest["sets"] >= 3
    # each specialist stopped at its target on its own sub-task's validation split
    target = MULTI_PRESETS["standard"].teacher_target
    for name, trained in manifest["trained"].items():
        if name != "student":
            assert abs(trained["val_acc"] - target) < 0.05, (name, trained)
    broken = tmp_path / "sets"
    shutil.copytree(SHIPPED, broken)
    weights = broken / "set1" / "teacher_sub" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"set1/teacher_sub/model.safetensors: SHA-256"):
        load_artifacts(broken, manifest["sets"])


def test_tiny_multi_teacher_benchmark_end_to_end_resumes_from_its_units(tmp_path, monkeypatch,
                                                                         capsys):
    from crossopd.cli.main import main

    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "cache"))
    argv = ["bench", "learn", "--multi-teacher", "--preset", "tiny", "--json",
            "--out", str(tmp_path / "out"), "teacher_steps=20"]
    assert main(argv) == 0
    r = json.loads(capsys.readouterr().out)
    preset = MULTI_PRESETS["tiny"]
    runs = json.loads((tmp_path / "out" / "runs.json").read_text())
    assert set(r["arms"]) == set(runs) == set(ARMS) >= {"untrained", "opd_add_own", "opd_sub",
                                                        "routed", "mixed", "sft_routed"}
    for arm, rs in runs.items():
        assert len(rs) == preset.teacher_sets * preset.seeds
        assert sorted((x["pair"], x["seed"]) for x in rs) == [
            (k, s) for k in range(preset.teacher_sets) for s in range(preset.seeds)]
        acc = np.mean([np.mean(x["correct"][: preset.n_test]) for x in rs])
        assert r["arms"][arm]["acc_add"] == pytest.approx(acc)
        assert r["arms"][arm]["student_tokens"] >= (0 if arm == "untrained" else
                                                   preset.budget_tokens)
    for name, d in r["comparisons"].items():
        assert d["ci_low"] <= d["value"] <= d["ci_high"], name
    assert set(r["verdict"]) == {"specialists_teach", "routed_teaches_both"}
    assert r["artifacts"]["source"] == "trained" and r["reused_units"] == 0
    # a rerun reads every run back and trains nothing
    assert main(argv) == 0
    again = json.loads(capsys.readouterr().out)
    assert again["reused_units"] == (len(ARMS) - 1) * preset.teacher_sets * preset.seeds
    assert again["artifacts"]["source"] == "cache"
    assert again["comparisons"] == r["comparisons"]
