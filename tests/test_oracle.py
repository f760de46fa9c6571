"""The byte-marginal oracle against brute-force enumeration of every teacher tokenization, and
the learning benchmark's diagnosis and identity control on small untrained models."""

from __future__ import annotations

import copy
import itertools
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.bench.learn_task import (
    make_split,
    new_model,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.bench.oracle import (
    ChunkQuery,
    PrefixLogprobs,
    answer_tokens,
    diagnose,
    identity_check,
    oracle_targets,
    oracle_targets_many,
    rollout_oracle,
)
from crossopd.core.credit import BUILTIN_RULES
from crossopd.core.tokens import ByteVocab
from crossopd.step.data import Example
from crossopd.step.rollout import rollout_and_score, sample_rollouts
from crossopd.step.score import score_rollouts
from crossopd.step.settings import StepSettings
from crossopd.step.sides import hf_pair

# id 0 is byteless (an end of turn: it ends the continuation); several spellings of most strings
PIECES = [None, b"a", b"b", b"c", b"ab", b"ba", b"abc", b"bb", b"cab"]
TOY = ByteVocab(PIECES, lambda text: [], lambda ids: "", kind="toy")


def toy_logprobs(prefix: tuple[int, ...]) -> np.ndarray:
    """A fixed random next-token distribution per prefix, peaked enough to matter."""
    rng = np.random.default_rng(zlib.crc32(np.asarray(prefix, np.int64).tobytes()))
    logits = 2.0 * rng.standard_normal(len(PIECES))
    return logits - np.logaddexp.reduce(logits)


def toy_model(seqs):
    return [np.stack([toy_logprobs(tuple(s[: j + 1])) for j in range(len(s))]) for s in seqs]


def brute_f(prefix: tuple[int, ...], beta: bytes) -> float:
    """P(the continuation's bytes start with ``beta``): every sequence of len(beta) tokens (each
    spells at least one byte, so they cover beta) or fewer when it ends at the byteless token."""
    total = 0.0

    def walk(ids: tuple[int, ...], spelled: bytes, mass: float, depth: int) -> None:
        nonlocal total
        if len(spelled) >= len(beta) or depth == len(beta):
            total += mass * spelled.startswith(beta)
            return
        lp = toy_logprobs(ids)
        for t, piece in enumerate(PIECES):
            if piece is None:
                continue  # the continuation ends short of beta
            if beta.startswith((spelled + piece)[: len(beta)]):
                walk(ids + (t,), spelled + piece, mass * np.exp(lp[t]), depth + 1)

    walk(prefix, b"", 1.0, 0)
    return total


def split_points(draw, n: int) -> list[int]:
    cuts = sorted(set(draw(st.lists(st.integers(1, max(n - 1, 1)), max_size=n))))
    return [c for c in cuts if 0 < c < n]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_oracle_matches_brute_force_enumeration(data):
    beta = bytes(data.draw(st.lists(st.sampled_from(b"abc"), min_size=1, max_size=5)))
    cuts = split_points(data.draw, len(beta))
    pieces = [beta[a:b] for a, b in zip([0, *cuts], [*cuts, len(beta)])]
    prefix = tuple(data.draw(st.lists(st.integers(1, len(PIECES) - 1), min_size=1, max_size=3)))
    got = oracle_targets(PrefixLogprobs(toy_model), TOY, prefix, pieces)
    ends = np.cumsum([len(p) for p in pieces])
    logf = [0.0] + [np.log(brute_f(prefix, beta[:e])) for e in ends]
    np.testing.assert_allclose(got, np.diff(logf), rtol=1e-10, atol=1e-12)
    # the targets of a chunk add up to log f(chunk bytes), whatever the split into pieces
    assert got.sum() == pytest.approx(np.log(brute_f(prefix, beta)), abs=1e-10)


def test_single_byte_vocabulary_gives_the_token_logprobs():
    """Only one spelling exists: the oracle is the teacher's own chain rule."""
    vocab = ByteVocab([None, b"x", b"y"], lambda text: [], lambda ids: "", kind="toy")
    lp = PrefixLogprobs(lambda seqs: [np.stack([np.log([0.1, 0.3, 0.6])] * len(s)) for s in seqs])
    got = oracle_targets(lp, vocab, [1], [b"x", b"yx"])
    np.testing.assert_allclose(got, [np.log(0.3), np.log(0.6) + np.log(0.3)])


def test_batched_chunks_equal_one_at_a_time_and_pruning_is_close():
    queries = [ChunkQuery((1,), (b"a", b"b", b"c")), ChunkQuery((2, 3), (b"cab",)),
               ChunkQuery((4,), (b"b", b"ab"))]
    together = oracle_targets_many(PrefixLogprobs(toy_model), TOY, queries)
    for q, got in zip(queries, together):
        alone = oracle_targets(PrefixLogprobs(toy_model), TOY, q.prefix, q.pieces)
        np.testing.assert_allclose(got, alone, rtol=0, atol=1e-12)
    pruned = oracle_targets_many(PrefixLogprobs(toy_model), TOY, queries, min_mass=1e-6)
    for a, b in zip(pruned, together):
        np.testing.assert_allclose(a, b, atol=1e-4)
    with pytest.raises(ValueError, match="teacher states"):
        oracle_targets_many(PrefixLogprobs(toy_model), TOY, queries, max_nodes=3)
    with pytest.raises(ValueError, match="at least one byte"):
        oracle_targets(PrefixLogprobs(toy_model), TOY, (1,), [b"a", b""])


def test_prefix_cache_reads_prefixes_off_longer_forwards():
    calls = []

    def fn(seqs):
        calls.append(list(seqs))
        return toy_model(seqs)

    lp = PrefixLogprobs(fn)
    asked = [(1, 2, 3), (1,), (1, 2), (4, 5), (1, 2, 3)]
    got = lp.get(asked)
    assert calls == [[(1, 2, 3), (4, 5)]] and lp.forwards == 2
    for p, row in zip(asked, got):
        np.testing.assert_array_equal(row, toy_logprobs(p))
    lp.get([(1, 2), (4,)])
    assert calls[-1] == [(4,)]  # only what is not cached yet


def test_hf_prefix_logprobs_equal_single_forwards():
    model = new_model(40, 0, 16, 1).eval()
    lp = PrefixLogprobs.from_model(model)
    prefixes = [(3, 4, 5, 6), (3, 4), (7,), (8, 9, 10)]  # right padding in one batch
    for p, row in zip(prefixes, lp.get(prefixes)):
        with torch.no_grad():
            ref = torch.log_softmax(model(input_ids=torch.tensor([p])).logits[0, -1].double(), -1)
        np.testing.assert_allclose(row, ref.numpy(), atol=1e-5)


# ------------------------------------------------------------------ the benchmark's pieces
class Sizes:
    n_train, digits, max_new_tokens = 120, 2, 12


@pytest.fixture(scope="module")
def models():
    """The benchmark's model dict with untrained models (the wiring is under test, not skill):
    T_x on the digit-merging teacher tokenizer, T_s and the student on the digit-splitting one,
    T_s with a tokenizer object of its own."""
    corpus = [p + s for p, s, _ in make_split(Sizes.n_train, 1)]
    t_tok, s_tok = train_teacher_tokenizer(corpus), train_student_tokenizer(corpus)
    out = {"teacher_x": (new_model(len(t_tok), 11, 32, 1).eval(), t_tok),
           "teacher_s": (new_model(len(s_tok), 12, 32, 1).eval(), copy.deepcopy(s_tok)),
           "student": (new_model(len(s_tok), 13, 32, 1).eval(), s_tok)}
    return out


def sides(models, teacher="teacher_x"):
    student, s_tok = models["student"]
    t_model, t_tok = models[teacher]
    return hf_pair(student, s_tok, t_model, t_tok)


def test_chunk_rule_runs_through_rollout_and_score_with_comparable_kl(models):
    student, teachers = sides(models)
    examples = [Example([{"role": "user", "content": p}], str(a))
                for p, _, a in make_split(6, 5)]
    torch.manual_seed(0)
    s = rollout_and_score(student, teachers, examples,
                          StepSettings.build("chunk", max_new_tokens=10))
    assert s.stats["signal_tokens"] > 0
    exs, prompts, responses = sample_rollouts(student, examples,
                                              StepSettings.build(max_new_tokens=10))
    by_rule = {rule: score_rollouts(student, teachers, exs, prompts, responses,
                                    StepSettings.build(rule, max_batch_tokens=4096))
               for rule in ("uniform", "chunk")}
    u, ch = by_rule["uniform"], by_rule["chunk"]
    # the KL statistics are L_S - L_T per chunk whatever the rule; the targets differ
    assert ch.stats["kl_per_token"] == pytest.approx(u.stats["kl_per_token"], abs=1e-9)
    for qu, qc in zip(u.targets, ch.targets):
        np.testing.assert_array_equal(torch.isnan(qu), torch.isnan(qc))


def test_oracle_on_worked_solutions(models):
    """Responses spelled as the student would write the worked solutions (many n:1 chunks):
    each chunk's targets add up to log f(chunk bytes) >= L_T (the teacher's mass on other
    spellings comes on top), the stop chunk gets the teacher's log-prob, and each chunk's
    targets are those of a direct single-chunk call."""
    student, teachers = sides(models)
    sv, tv = student.vocab, teachers["teacher"].vocab
    problems = make_split(8, 7)
    exs = [Example([{"role": "user", "content": p}], str(a)) for p, _, a in problems]
    eos = models["student"][1].eos_token_id
    responses = [np.asarray(sv.encode_bytes(sol.encode()) + [eos]) for _, sol, _ in problems]
    prompts = [student.fmt.prompt_ids(e.messages) for e in exs]
    scored = score_rollouts(student, teachers, exs, prompts, responses, StepSettings.build())
    reqs, aligns, t_lps = scored.requests, scored.alignments, scored.teacher_logps
    lp = PrefixLogprobs.from_model(models["teacher_x"][0])
    targets = rollout_oracle(lp, sv, tv, reqs, aligns, t_lps)
    multi = 0
    for req, a, o, t_lp in zip(reqs, aligns, targets, t_lps):
        assert not np.isnan(o).any() and a.num_chunks > 0
        for ch in range(a.num_chunks):
            s_in, t_in = a.student_chunk == ch, a.teacher_chunk == ch
            assert o[s_in].sum() >= t_lp[t_in].sum() - 1e-4
            multi += int(s_in.sum() > 1)
        assert o[-1] == t_lp[-1]  # the stop chunk: end of turn on both sides
        ch = int(np.flatnonzero(np.bincount(a.student_chunk[a.student_chunk >= 0]) > 1)[0])
        t0 = int(np.flatnonzero(a.teacher_chunk == ch)[0])
        pieces = sv.token_bytes(req.student_response[a.student_chunk == ch])
        direct = oracle_targets(lp, tv, req.teacher_ids[: req.response_start + t0], pieces)
        np.testing.assert_allclose(o[a.student_chunk == ch], direct, rtol=0, atol=1e-12)
    assert multi > 8


def test_answer_tokens_are_the_digits_after_the_last_equals(models):
    sv = ByteVocab.from_pretrained(models["student"][1])
    ids = np.asarray(sv.encode_bytes(b"12+34=46,46+5=51"))
    mask = answer_tokens(sv, ids)
    assert sv.concat_bytes(ids[mask]) == b"51" and mask[-2:].all()
    assert not answer_tokens(sv, np.asarray(sv.encode_bytes(b"12+34"))).any()


def test_diagnose_reports_every_rule_on_the_same_rollouts(models):
    r = diagnose(models, Sizes, n_rollouts=12, seed=3)
    assert set(r["rules"]) == set(BUILTIN_RULES)
    counts = r["counts"]
    assert counts["rollouts"] == 12 and 0 < counts["oracle_tokens"] <= counts["response_tokens"]
    assert counts["multi_tokens"] <= counts["oracle_tokens"]
    assert 0.0 < r["one_to_one_share"] <= 1.0 and r["noncanonical_logmass_mean"] >= -1e-4
    for rule, m in r["rules"].items():
        for key, v in m.items():
            assert v is None or isinstance(v, float), (rule, key)
            if key.startswith(("sign", "no_signal")) and v is not None:
                assert 0.0 <= v <= 1.0
            if key.startswith("pearson") and v is not None:
                assert -1.0 - 1e-9 <= v <= 1.0 + 1e-9
    assert r["rules"]["last"]["no_signal_share"] >= r["rules"]["uniform"]["no_signal_share"]
    again = diagnose(models, Sizes, n_rollouts=12, seed=3)
    assert {k: v for k, v in again.items() if k != "seconds"} == \
        {k: v for k, v in r.items() if k != "seconds"}  # same seed, same rollouts


def test_identity_control_is_one_to_one_and_exact(models):
    r = identity_check(models, Sizes, n_rollouts=8, seed=0)
    assert r["chunks"] == r["one_to_one_chunks"] > 0 and r["coverage"] == 1.0
    for rule in ("proportional", "uniform", "last", "chunk"):
        assert r["max_abs_diff"][rule] == 0.0, rule  # bit for bit, as same-tokenizer OPD
    assert r["exact"]


def test_one_byte_marginals_add_up_to_not_ending():
    """Every nonempty token starts with a, b or c: the one-byte marginals of the brute force and
    of the oracle both add up to 1 - P(the byteless token)."""
    p_end = np.exp(toy_logprobs((1, 2))[0])
    assert sum(brute_f((1, 2), bytes([x])) for x in b"abc") == pytest.approx(1 - p_end)
    lp = PrefixLogprobs(toy_model)
    got = [oracle_targets(lp, TOY, (1, 2), [bytes([x])])[0] for x in b"abc"]
    assert np.exp(got).sum() == pytest.approx(1 - p_end, abs=1e-12)
    two = sum(brute_f((1, 2), bytes(s)) for s in itertools.product(b"abc", repeat=2))
    assert two < 1 - p_end  # some continuations end after one byte


def test_oracle_arm_trains_on_the_oracles_targets(models):
    """The opd_oracle arm's step data: the oracle's targets for the same rollouts (read off the
    same requests, alignments and teacher log-probs), the same special-token penalty as the
    credit rules get, advantages clamp(q - old), and the rollouts' statistics unchanged."""
    from crossopd.bench.learn_arms import oracle_scored
    from crossopd.step.loss import LossConfig

    student, teachers = sides(models)
    sv, tv = student.vocab, teachers["teacher"].vocab
    examples = [Example([{"role": "user", "content": p}], str(a))
                for p, _, a in make_split(6, 9)]
    torch.manual_seed(1)
    settings = StepSettings.build(max_new_tokens=12)
    scored = rollout_and_score(student, teachers, examples, settings)
    lp = PrefixLogprobs.from_model(models["teacher_x"][0])
    arm = oracle_scored(scored, lp, sv, tv, settings.penalty, settings.loss.adv_clamp)
    direct = rollout_oracle(lp, sv, tv, scored.requests, scored.alignments,
                            scored.teacher_logps)
    clamp = LossConfig().adv_clamp
    compared = 0
    for q, d, old, req, a, v in zip(arm.targets, direct, arm.old_logps, scored.requests,
                                    arm.advantages, arm.signal):
        special = sv.special[req.student_response].copy()
        if req.student_stop_index is not None:
            special[req.student_stop_index] = False
        plain = ~special
        np.testing.assert_array_equal(q.numpy()[plain], d[plain])  # bit for bit
        np.testing.assert_allclose(q.numpy()[special], old.numpy()[special] - 5.0)
        ok = ~np.isnan(q.numpy())
        assert v.numpy().tolist() == ok.tolist()
        np.testing.assert_allclose(a.numpy()[ok], np.clip(q.numpy()[ok] - old.numpy()[ok],
                                                          -clamp, clamp))
        compared += int(ok.sum())
    assert compared > 0 and arm.stats == scored.stats
    # not the credit rule's targets: the chunks that are not 1:1 differ
    assert any(not np.allclose(np.nan_to_num(q.numpy()), np.nan_to_num(c.numpy()))
               for q, c in zip(arm.targets, scored.targets))


def test_one_to_one_arm_keeps_the_signal_of_1to1_chunks_only(models):
    """opd_cross_1to1's step data: the proportional targets on tokens of 1:1 chunks (there the
    teacher's log-prob of the one token), no signal on tokens of m:n chunks, each of them
    counted; advantages clamp(q - old) where a signal is left."""
    from crossopd.bench.learn_arms import one_to_one_scored

    student, teachers = sides(models)
    examples = [Example([{"role": "user", "content": p}], str(a))
                for p, _, a in make_split(6, 11)]
    torch.manual_seed(2)
    settings = StepSettings.build(max_new_tokens=12)
    scored = rollout_and_score(student, teachers, examples, settings)
    arm, dropped = one_to_one_scored(scored, settings.loss.adv_clamp)
    counted = 0
    for q, full, a, adv, v, old in zip(arm.targets, scored.targets, scored.alignments,
                                       arm.advantages, arm.signal, arm.old_logps):
        # the loop definition: chunk sizes on both sides, token by token
        one = np.zeros(len(q), dtype=bool)
        for i, c in enumerate(a.student_chunk):
            if c >= 0:
                one[i] = (a.student_chunk == c).sum() == 1 and (a.teacher_chunk == c).sum() == 1
        full_np, q_np = full.numpy(), q.numpy()
        m_n = (a.student_chunk >= 0) & ~one & ~np.isnan(full_np)
        counted += int(m_n.sum())
        assert np.isnan(q_np[m_n]).all()
        np.testing.assert_array_equal(q_np[~m_n], full_np[~m_n])
        ok = ~np.isnan(q_np)
        assert v.numpy().tolist() == ok.tolist()
        np.testing.assert_allclose(adv.numpy()[ok], np.clip(q_np[ok] - old.numpy()[ok],
                                                            -settings.loss.adv_clamp,
                                                            settings.loss.adv_clamp))
    assert dropped == counted > 0 and arm.stats == scored.stats
