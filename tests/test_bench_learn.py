"""The learning benchmark's task, checker, tokenizers and a tiny end-to-end run (pipeline only:
which arm wins is the benchmark's question, not the test's)."""

from __future__ import annotations

import random
import re
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from crossopd.bench.learn import ARMS, HEADLINE_ARMS, PRESETS, bench_learn, with_settings
from crossopd.bench.learn_stats import bootstrap, difference, gain_ratio, summarise
from crossopd.bench.learn_task import (
    ANSWER_KINDS,
    answer_kind,
    check_answer,
    make_problem,
    make_split,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.core.align import align
from crossopd.core.tokens import ByteVocab


def test_problems_are_correct_and_splits_disjoint():
    rng = random.Random(0)
    for _ in range(200):
        prompt, solution, answer = make_problem(rng)
        a, b, c = map(int, prompt.rstrip("=").split("+"))
        assert answer == a + b + c and all(10 <= x <= 99 for x in (a, b, c))
        assert check_answer(solution, answer)
    train = make_split(300, 1)
    test = make_split(50, 2, exclude={p for p, _, _ in train})
    assert not {p for p, _, _ in train} & {p for p, _, _ in test}
    assert len({p for p, _, _ in train}) == 300


def test_answer_kinds_sort_each_way_of_going_wrong():
    p = "12+34+5="
    assert answer_kind(p, "12+34=46,46+5=51", 51, ended=True) == "correct"
    assert answer_kind(p, "12+34=47,47+5=52", 51, ended=True) == "wrong_first_sum"
    assert answer_kind(p, "12+43=55,55+5=60", 51, ended=True) == "wrong_first_sum"
    assert answer_kind(p, "12+34=46,45+5=50", 51, ended=True) == "wrong_copy"
    assert answer_kind(p, "12+34=46,46+6=52", 51, ended=True) == "wrong_copy"
    assert answer_kind(p, "12+34=46,46+5=52", 51, ended=True) == "wrong_last_sum"
    assert answer_kind(p, "12+34=46,46+5=5", 51, ended=True) == "wrong_last_sum"
    assert answer_kind(p, "12+34=46,46+", 51, ended=False) == "malformed_no_end"
    assert answer_kind(p, "12+34=46", 51, ended=True) == "malformed_ended"


@given(st.text(alphabet="0123456789+=, ", max_size=30), st.integers(0, 400), st.booleans())
def test_answer_kind_is_correct_exactly_when_the_checker_says_so(response, answer, ended):
    kind = answer_kind("12+34+5=", response, answer, ended)
    assert kind in ANSWER_KINDS
    assert (kind == "correct") == check_answer(response, answer)


def test_checker_is_exact():
    assert check_answer("12+34=46,46+5=51", 51)
    assert check_answer("=51  ", 51)
    assert not check_answer("12+34=46,46+5=52", 51)
    assert not check_answer("46+5=51 and more", 51)  # trailing text: no final answer
    assert not check_answer("", 51) and not check_answer("=510", 51)


def test_tokenizers_disagree_on_digit_boundaries_but_align_exactly():
    corpus = [p + s for p, s, _ in make_split(500, 3)]
    tt, stok = train_teacher_tokenizer(corpus), train_student_tokenizer(corpus)
    tv, sv = ByteVocab.from_pretrained(tt), ByteVocab.from_pretrained(stok)
    assert sv.kind == "metaspace" and tv.kind == "byte_level"
    shares = []
    for text in corpus[:50]:
        s_ids = sv.encode_bytes(text.encode())
        assert all(len(b) == 1 for b in sv.token_bytes(s_ids) if b[:1].isdigit())  # digits split
        a = align(s_ids, tv.encode_bytes(text.encode()), sv, tv)
        assert a.coverage == 1.0
        shares.append(a.one_to_one_share)
    assert np.mean(shares) < 0.9  # boundaries differ often
    assert sv.concat_bytes(sv.encode_bytes(b"\xff\x00")) == b"\xff\x00"  # byte fallback


def test_tiny_benchmark_runs_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "cache"))
    # cross and oracle on 3 seeds per pair, the other arms on the preset's 2
    r = bench_learn("tiny", out_dir=tmp_path / "out", progress=lambda m: None,
                    settings=["headline_seeds=3"])
    assert set(r["arms"]) == set(ARMS)
    assert {"opd_cross_chunk", "uld", "opd_oracle", "opd_cross_1to1"} <= set(ARMS)
    assert set(r["ratio_cross_oracle"]) >= {"value", "ci_low", "ci_high"}
    for arm in r["arms"]:
        a = r["arms"][arm]
        assert 0.0 <= a["acc_mean"] <= 1.0 and a["acc_std"] >= 0.0
        assert len(a["acc_per_seed"]) == (6 if arm in (*HEADLINE_ARMS, "untrained") else 4)
        assert a["student_tokens"] >= (0 if arm == "untrained" else 600)
    assert 0.0 < r["one_to_one_share"] <= 1.0
    assert set(r["ratio_cross_same"]) >= {"value", "ci_low", "ci_high"}
    for key in ("cross_minus_sft", "cross_minus_oracle", "one_to_one_minus_cross",
                "ratio_1to1_oracle"):
        assert set(r[key]) >= {"value", "ci_low", "ci_high", "half_width"}, key
    # the 1:1-only arm trains on fewer tokens than it samples: the m:n ones, counted
    assert r["arms"]["opd_cross_1to1"]["m_n_masked_tokens"] > 0
    assert set(r["teachers"]) >= {"teacher_x", "teacher_s", "matched", "pairs", "source"}
    assert r["teachers"]["source"] == "trained"  # the tiny preset has no shipped pairs
    assert [t["pair"] for t in r["teachers"]["pairs"]] == [0, 1]
    assert len(r["by_pair"]) == 2
    assert set(r["power"]["statistics"]) == {"ratio_cross_oracle", "cross_minus_oracle",
                                             "cross_minus_sft"}
    # each statistic over the (pair, seed) runs its arms share
    assert r["cross_minus_oracle"]["runs"] == r["power"]["statistics"]["cross_minus_oracle"][
        "runs"] == 6
    assert r["cross_minus_sft"]["runs"] == 4 and r["one_to_one_minus_cross"]["runs"] == 4
    assert isinstance(r["power"]["readable"], bool)
    assert r["machine"]["cpu"] and r["machine"]["torch"]
    from crossopd.bench.learn_stats import render_learn_table

    table = render_learn_table(r)
    assert ("intervals narrow enough to read" in table) == r["power"]["readable"]
    assert r["machine"]["cpu"] in table and "pair 1 (validation / test)" in table
    assert r["identity"]["exact"] and r["identity"]["one_to_one_chunks"] == r["identity"]["chunks"]
    assert set(r["diagnosis"]["rules"]) == {"proportional", "uniform", "last", "chunk"}
    assert (tmp_path / "out" / "learn_curve.png").stat().st_size > 1000
    assert (tmp_path / "out" / "result.json").exists()


def test_a_rerun_reuses_finished_runs_and_trains_only_new_seeds(tmp_path, monkeypatch):
    """Each finished (arm, pair, seed) is kept: a killed run resumes, and more seeds train only
    the new ones, with the kept ones' answers unchanged."""
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "out"
    arms = "arms=sft,opd_cross_proportional"
    first = bench_learn("tiny", out_dir=out, progress=lambda m: None,
                        settings=[arms, "seeds=1"])
    assert first["reused_units"] == 0
    more = bench_learn("tiny", out_dir=out, progress=lambda m: None, settings=[arms, "seeds=2"])
    assert more["reused_units"] == 2 * 2  # 2 arms x 2 pairs, seed 0
    for arm in ("sft", "opd_cross_proportional"):
        assert more["arms"][arm]["acc_per_seed"][0::2] == first["arms"][arm]["acc_per_seed"]
    units = Path(more["units"])
    (units / "sft-pair1-seed1.json").unlink()  # as a run killed before it finished
    again = bench_learn("tiny", out_dir=out, progress=lambda m: None, settings=[arms, "seeds=2"])
    assert again["reused_units"] == 2 * 2 * 2 - 1
    assert again["arms"]["sft"]["acc_per_seed"] == more["arms"]["sft"]["acc_per_seed"]
    # another setting that changes what a run learns is another set of runs
    other = bench_learn("tiny", out_dir=out, progress=lambda m: None,
                        settings=[arms, "seeds=1", "opd_lr=1e-3"])
    assert other["reused_units"] == 0 and other["units"] != more["units"]


def _runs(acc_by_arm: dict[str, list[list[int]]]) -> dict:
    return {arm: [{"acc": float(np.mean(c)), "correct": np.array(c), "tokens": 100,
                   "curve": [(100, float(np.mean(c)))]} for c in seeds]
            for arm, seeds in acc_by_arm.items()}


def test_a_comparison_uses_the_seeds_its_arms_share(tmp_path):
    """Cross and oracle with 3 seeds per pair, SFT with 2: cross - oracle over all 3, cross -
    SFT over the first 2 (the runs paired by seed)."""
    acc = {"untrained": [[0, 0, 1, 0]] * 3, "opd_cross_proportional": [[1, 1, 1, 0], [1, 0, 1, 0],
                                                                       [1, 1, 1, 1]],
           "opd_oracle": [[1, 0, 1, 0]] * 3, "sft": [[0, 0, 1, 1]] * 2}
    runs = {arm: [{**r, "pair": k, "seed": s} for k in range(2) for s, r in enumerate(rs)]
            for arm, rs in _runs(acc).items()}
    r = summarise(runs, {"matched": True}, tmp_path)
    assert r["cross_minus_oracle"]["value"] == pytest.approx((3 + 2 + 4) / 12 - 0.5)
    assert r["cross_minus_oracle"]["runs"] == 6
    assert r["cross_minus_sft"]["value"] == pytest.approx((3 + 2) / 8 - 0.5)
    assert r["cross_minus_sft"]["runs"] == 4
    assert r["power"]["statistics"]["cross_minus_sft"]["runs"] == 4


def test_bootstrap_statistics_match_their_definitions():
    rng = np.random.default_rng(0)
    correct = {arm: (rng.random((5, 40)) < p).astype(float)
               for arm, p in (("untrained", 0.1), ("sft", 0.3), ("cross", 0.5), ("same", 0.6))}
    m = {k: v.mean() for k, v in correct.items()}
    r = bootstrap(correct, gain_ratio("cross", "same", "untrained"))
    assert r["value"] == pytest.approx((m["cross"] - m["untrained"]) / (m["same"] - m["untrained"]))
    assert r["ci_low"] < r["value"] < r["ci_high"]
    d = bootstrap(correct, difference("cross", "sft"))
    # a 0.2 gap on 200 answers: the interval excludes 0
    assert d["value"] == pytest.approx(m["cross"] - m["sft"]) and d["ci_low"] > 0
    # no spread at all: the interval is the point
    flat = {k: np.ones((3, 10)) * (i + 1) / 10 for i, k in enumerate(("untrained", "a", "b"))}
    f = bootstrap(flat, gain_ratio("a", "b", "untrained"))
    assert f["ci_low"] == pytest.approx(0.5) and f["ci_high"] == pytest.approx(0.5)
    # an undefined ratio (the reference did not gain) is None, not a number
    same = bootstrap({"untrained": np.ones((2, 4)), "a": np.ones((2, 4)), "b": np.ones((2, 4))},
                     gain_ratio("a", "b", "untrained"))
    assert same["value"] is None and same["undefined_resamples"] > 0


def test_two_level_bootstrap_puts_the_teacher_draw_inside_the_interval():
    """Pairs that teach differently (one not at all, two perfectly), no spread within a pair:
    the interval spans the pair draw, [0, 1]; pooling the twelve runs as seeds of one pair
    hides it."""
    untrained = np.zeros((3, 4, 50))
    taught = np.stack([np.zeros((4, 50)), np.ones((4, 50)), np.ones((4, 50))])
    gain = difference("taught", "untrained")
    r = bootstrap({"untrained": untrained, "taught": taught}, gain)
    assert r["value"] == pytest.approx(2 / 3)
    assert r["ci_low"] == pytest.approx(0.0) and r["ci_high"] == pytest.approx(1.0)
    assert r["half_width"] == pytest.approx(0.5)
    pooled = bootstrap({"untrained": untrained.reshape(1, 12, 50),
                        "taught": taught.reshape(1, 12, 50)}, gain)
    assert pooled["value"] == pytest.approx(2 / 3) and pooled["ci_low"] > 0.3


def test_power_compares_half_widths_with_their_targets():
    from crossopd.bench.learn_stats import POWER_TARGETS, power

    wide = {"ratio_cross_oracle": {"half_width": 0.30}, "cross_minus_oracle": {"half_width": 0.04},
            "cross_minus_sft": {"half_width": 0.02}}
    p = power(wide, runs=6)
    assert POWER_TARGETS == {"ratio_cross_oracle": 0.15, "cross_minus_oracle": 0.02,
                             "cross_minus_sft": 0.01}
    assert not p["readable"] and not p["statistics"]["ratio_cross_oracle"]["met"]
    # half-width / target = 2: four times the runs, were it to shrink as 1/sqrt(runs)
    assert [d["runs_for_target"] for d in p["statistics"].values()] == [24, 24, 24]
    narrow = {"ratio_cross_oracle": {"half_width": 0.1}, "cross_minus_oracle": {"half_width": 0.01},
              "cross_minus_sft": {"half_width": 0.01}}
    assert power(narrow, runs=6)["readable"]
    # the gap's cost read either way: a narrow difference is enough beside a wide ratio
    either = {**narrow, "ratio_cross_oracle": {"half_width": 0.3}}
    assert power(either, runs=6)["readable"]
    # a statistic that did not run (an arms= subset) neither meets nor fails its target
    partial = {"ratio_cross_oracle": {"value": None}, "cross_minus_oracle": {"value": None},
               "cross_minus_sft": {"half_width": 0.005}}
    q = power(partial, runs=2)
    assert q["statistics"]["ratio_cross_oracle"]["met"] is None and q["readable"]


def test_shipped_teacher_pairs_load_with_their_digests_checked(tmp_path):
    import shutil

    from crossopd.bench.learn import splits
    from crossopd.bench.learn_stats import MATCH_TOLERANCE
    from crossopd.bench.learn_teachers import (
        SHIPPED,
        ArtifactError,
        artifact_key,
        load_artifacts,
        locate,
        verify,
    )

    manifest = verify(SHIPPED)
    for name in ("quick", "standard"):
        preset = PRESETS[name]
        assert manifest["key"] == artifact_key(preset)
        assert locate(preset, preset.teacher_pairs, splits(preset))[1] == "shipped"
    assert manifest["pairs"] >= 3
    for k in range(manifest["pairs"]):
        t = manifest["trained"]
        assert abs(t[f"pair{k}/teacher_x"]["val_acc"]
                   - t[f"pair{k}/teacher_s"]["val_acc"]) <= MATCH_TOLERANCE
    pairs = load_artifacts(SHIPPED, manifest["pairs"])
    assert [m["pair"] for m in pairs] == list(range(manifest["pairs"]))
    assert pairs[0]["student"] is pairs[1]["student"]
    # one flipped byte in one weight file: refused, naming the file and the way out
    broken = tmp_path / "learn_teachers"
    shutil.copytree(SHIPPED, broken)
    weights = broken / "pair1" / "teacher_s" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=r"pair1/teacher_s/model.safetensors: SHA-256 "
                                            r"differs.*--retrain-teachers"):
        load_artifacts(broken, manifest["pairs"])


def test_retrain_teachers_trains_into_the_cache_and_replaces_it(tmp_path, monkeypatch):
    from crossopd.bench.learn import splits
    from crossopd.bench.learn_teachers import locate, verify

    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path))
    preset = with_settings(PRESETS["tiny"], ["teacher_steps=10", "student_steps=5"])
    parts = splits(preset)
    root, source = locate(preset, 2, parts, progress=lambda m: None)
    assert source == "trained" and root.is_relative_to(tmp_path)
    first = verify(root)["sha256"]
    built = (root / "manifest.json").stat().st_mtime_ns
    assert locate(preset, 2, parts, progress=lambda m: None) == (root, "cache")
    assert (root / "manifest.json").stat().st_mtime_ns == built  # read, not rebuilt
    # a retrain trains anew even where the cache has them: a new manifest for the same files
    assert locate(preset, 2, parts, retrain=True, progress=lambda m: None) == (root, "trained")
    assert (root / "manifest.json").stat().st_mtime_ns != built
    assert verify(root)["sha256"].keys() == first.keys()


def test_ratio_is_refused_when_teachers_are_not_matched(tmp_path):
    arms = {"untrained": [[0, 0, 1, 0]] * 2, "sft": [[1, 0, 1, 0]] * 2,
            **{f"opd_cross_{r}": [[1, 1, 0, 0]] * 2
               for r in ("proportional", "uniform", "last", "chunk")},
            "opd_same": [[1, 1, 1, 0]] * 2, "uld": [[0, 1, 0, 0]] * 2}
    for diff, matched in ((0.01, True), (0.05, False)):
        teachers = {"teacher_x": 0.6, "teacher_s": 0.6 + diff, "difference": diff,
                    "matched": matched}
        r = summarise(_runs(arms), teachers, tmp_path)
        assert (r["ratio_cross_same"]["value"] is None) == (not matched)
        assert ("refused" in r["ratio_cross_same"]) == (not matched)
        assert all(("refused" in d) == (not matched) for d in r["ratios"].values())
        if matched:
            assert r["ratios"]["proportional"]["value"] == pytest.approx((0.5 - 0.25) / 0.5)


def test_preset_settings_are_typed_and_checked():
    p = with_settings(PRESETS["quick"], ["budget_tokens=240000", "opd_lr=5e-4",
                                         "arms=opd_same, sft"])
    assert p.budget_tokens == 240_000 and isinstance(p.budget_tokens, int)
    assert p.opd_lr == 5e-4 and p.sft_lr == PRESETS["quick"].sft_lr
    assert p.arms == ("untrained", "sft", "opd_same")  # the baseline always runs, ARMS order
    for bad, says in (("budget=1", "KEY one of"), ("arms=sft,dpo", "unknown arm(s) dpo"),
                      ("seeds=2.5", "expected an integer"), ("opd_lr=fast", "expected a number"),
                      ("teacher_pairs=0", "teacher_pairs=0: must be at least 1")):
        with pytest.raises(ValueError, match=re.escape(says)):
            with_settings(PRESETS["quick"], [bad])


def test_a_subset_of_arms_reports_what_it_can(tmp_path):
    arms = {"untrained": [[0, 0, 1, 0]] * 2, "sft": [[1, 0, 1, 0]] * 2,
            "opd_cross_proportional": [[1, 1, 1, 0]] * 2}
    r = summarise(_runs(arms), {"matched": True}, tmp_path)
    assert r["cross_minus_sft"]["value"] == pytest.approx(0.25)
    for key in ("ratio_cross_same", "same_minus_sft", "recovery_from_sft"):
        assert r[key]["value"] is None and r[key]["refused"] == "not run: opd_same"
    assert r["ratios"]["proportional"]["refused"] == "not run: opd_same"
    assert r["arms"]["opd_cross_proportional"]["tokens_to_sft_final"] == 100


def test_overrides_are_refused_outside_bench_learn(capsys):
    from crossopd.cli.main import main

    assert main(["bench", "learn", "--preset", "tiny", "nonsense=1"]) == 2
    assert "KEY one of" in capsys.readouterr().err
    assert main(["bench", "serve", "clients=4"]) == 2
    assert "for `bench learn` only" in capsys.readouterr().err
