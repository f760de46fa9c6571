"""The learning benchmark's task, checker, tokenizers and a tiny end-to-end run (pipeline only:
which arm wins is the benchmark's question, not the test's)."""

from __future__ import annotations

import random

import numpy as np

from crossopd.align import align
from crossopd.bench.learn import ARMS, bench_learn
from crossopd.bench.learn_task import (
    check_answer,
    make_problem,
    make_split,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.tokens import ByteVocab


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


def test_checker_is_exact():
    assert check_answer("12+34=46,46+5=51", 51)
    assert check_answer("=51  ", 51)
    assert not check_answer("12+34=46,46+5=52", 51)
    assert not check_answer("46+5=51 and more", 51)  # trailing text: no final answer
    assert not check_answer("", 51) and not check_answer("=510", 51)


def test_tokenizers_disagree_on_digit_boundaries_but_align_exactly():
    corpus = [p + s for p, s, _ in make_split(500, 3)]
    tt, st = train_teacher_tokenizer(corpus), train_student_tokenizer(corpus)
    tv, sv = ByteVocab.from_pretrained(tt), ByteVocab.from_pretrained(st)
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
    r = bench_learn("tiny", out_dir=tmp_path / "out", progress=lambda m: None)
    assert set(r["arms"]) == set(ARMS) | {"uld"}  # the tiny preset runs the ULD arm too
    for arm in r["arms"]:
        a = r["arms"][arm]
        assert 0.0 <= a["acc_mean"] <= 1.0 and a["acc_std"] >= 0.0
        assert len(a["acc_per_seed"]) == 2
        assert a["student_tokens"] >= (0 if arm == "untrained" else 600)
    assert 0.0 < r["one_to_one_share"] <= 1.0
    assert (tmp_path / "out" / "learn_curve.png").stat().st_size > 1000
    assert (tmp_path / "out" / "result.json").exists()
