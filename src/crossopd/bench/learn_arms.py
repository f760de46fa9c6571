"""The arms of ``crossopd bench learn``: OPD (through the step library, with any credit rule or
the exact byte-marginal oracle targets), SFT on teacher samples, and ULD, each on an equal
budget of student tokens with accuracy checkpoints along the way."""

from __future__ import annotations

import copy
import dataclasses
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from crossopd.bench.learn_task import (
    check_answer,
    correct_answers,
    encode_pair,
    generate_texts,
    supervised_train,
)
from crossopd.bench.oracle import PrefixLogprobs, rollout_oracle
from crossopd.bench.stacked import Stack, StackedAdamW, sample, sequence_logprobs
from crossopd.step.data import Example
from crossopd.step.loss import advantages, policy_loss
from crossopd.step.score import Scored, penalize_specials, score_rollouts
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, TeacherSide
from crossopd.teachers.hf import HFTeacher


def curve_points(preset: Any) -> list[int]:
    return [round(preset.budget_tokens * (k + 1) / preset.evals) for k in range(preset.evals)]


def checkpoint(curve: list, tokens: int, student: Any, tok: Any, test_set,
                preset: Any) -> np.ndarray:
    """Scores the student on the test split, adds the point to ``curve``, returns the per-problem
    answers (the last checkpoint's feed the bootstrap)."""
    was_training = student.training
    student.eval()
    correct = correct_answers(student, tok, test_set, preset.max_new_tokens)
    student.train(was_training)
    curve.append((tokens, float(correct.mean())))
    return correct


def run_opd(models: dict, teacher_key: str, rule: str, preset: Any, seed: int,
            train_set, test_set, oracle: bool = False, one_to_one: bool = False) -> dict:
    """One student of ``run_opd_seeds``: the same model it is when trained beside others."""
    return run_opd_seeds(models, teacher_key, rule, preset, [seed], train_set, test_set,
                         oracle=oracle, one_to_one=one_to_one)[0]


def run_opd_seeds(models: dict, teacher_key: str | tuple[str, ...], rule: str, preset: Any,
                  seeds: list[int], train_set, test_set, oracle: bool = False,
                  one_to_one: bool = False, keep_weights: bool = False,
                  route: Callable[[str], str] | None = None,
                  mix: dict[str, float] | None = None) -> list[dict]:
    """OPD from ``teacher_key`` with credit ``rule``, one student per seed, trained together
    (``bench.stacked``: one forward, backward and sampler call for all of them; each student's
    prompts and draws from its own seed, each on its own budget). ``oracle``: trained on the
    teacher's exact byte-marginal log-prob of every student token instead
    (``oracle_scored``), the same teacher's knowledge without the chunk credit guess;
    ``one_to_one``: signal on 1:1 chunks only (``one_to_one_scored``), the m:n chunks' tokens
    counted in ``m_n_masked_tokens``. Teacher scoring, alignment and credit run through the
    step library, per student. ``keep_weights``: each result also holds its student's final
    parameters (``weights``).

    Several teachers (``teacher_key`` a tuple of keys, each teacher named by its key): ``route``
    maps a prompt to the key of the teacher that scores its rows (``Example.teacher``), ``mix``
    weighs every teacher's advantages on every row (``StepSettings.mix``)."""
    student, s_tok = models["student"]
    keys = (teacher_key,) if isinstance(teacher_key, str) else teacher_key
    if oracle and len(keys) > 1:
        raise ValueError("the oracle arm scores with one teacher")
    s_side = StudentSide.from_model(student, s_tok)
    # a single teacher keeps the step library's default name; several are named by their keys,
    # which ``route`` and ``mix`` use
    named = len(keys) > 1
    teachers = {side.name: side for side in (
        TeacherSide.from_tokenizer(HFTeacher(models[k][0]), models[k][1],
                                   **({"name": k} if named else {})) for k in keys)}
    prefix = PrefixLogprobs.from_model(models[keys[0]][0]) if oracle else None
    settings = StepSettings.build(rule, max_new_tokens=preset.max_new_tokens, mix=mix)
    st = Stack.of([student] * len(seeds))
    opt = StackedAdamW(st, lr=preset.opd_lr)
    rngs = [random.Random(seed) for seed in seeds]
    draws = [torch.Generator().manual_seed(seed) for seed in seeds]
    n = len(seeds)
    tokens, masked, shares = [0] * n, [0] * n, [[] for _ in seeds]
    curves, points, correct = [[] for _ in seeds], [curve_points(preset) for _ in seeds], [None] * n
    # fixed widths: a student's arithmetic does not depend on the other students' rows
    prompt_width = max(len(s_side.fmt.prompt_ids([{"role": "user", "content": p}]))
                       for p, _, _ in train_set)
    width = prompt_width + preset.max_new_tokens
    while live := [k for k in range(n) if tokens[k] < preset.budget_tokens]:
        sub = st.select(live)
        batches = [[Example([{"role": "user", "content": p}], str(a),
                            teacher=route(p) if route else None)
                    for p, _, a in rngs[k].sample(train_set, preset.opd_batch)] for k in live]
        prompts = [[s_side.fmt.prompt_ids(e.messages) for e in b] for b in batches]
        responses = sample(sub, prompts, preset.max_new_tokens, s_side.fmt.stop_ids,
                           s_side.pad_id, [draws[k] for k in live], settings.temperature,
                           width=prompt_width)
        seqs = [[list(p) + r.tolist() for p, r in zip(ps, rs)]
                for ps, rs in zip(prompts, responses)]
        spans = [[(len(p), len(p) + len(r)) for p, r in zip(ps, rs)]
                 for ps, rs in zip(prompts, responses)]
        # one forward for both: the rollout log-probs are the update's own, detached (one
        # update per rollout, so the PPO ratio is exactly 1, as in the step library)
        lps = sequence_logprobs(sub, seqs, spans, s_side.pad_id, settings.temperature,
                                width=width)
        old = [[x.detach() for x in row] for row in lps]
        loss, learns = torch.zeros(()), torch.zeros(n, dtype=torch.bool)
        for j, k in enumerate(live):
            # each student's rollouts scored on their own: the teacher's batches, and so its
            # arithmetic, are those of the student trained alone
            scored = score_rollouts(s_side, teachers, batches[j], prompts[j], responses[j],
                                    settings, old_logps=old[j])
            if prefix is not None:
                scored = oracle_scored(scored, prefix, s_side.vocab,
                                       next(iter(teachers.values())).vocab,
                                       settings.penalty, settings.loss.adv_clamp)
            if one_to_one:
                scored, dropped = one_to_one_scored(scored, settings.loss.adv_clamp)
                masked[k] += dropped
            valid = torch.cat(scored.signal)
            if valid.any():  # a student without signal this step does not step (as update)
                loss = loss + policy_loss(torch.cat(lps[j]), torch.cat(old[j]),
                                          torch.cat(scored.advantages), valid,
                                          settings.loss)[0]
                learns[k] = True
            shares[k].append(scored.stats["one_to_one_share"])
            tokens[k] += int(scored.stats["response_tokens"])
        if learns.any():
            loss.backward()
        opt.step(learns)
        due = [k for k in live if points[k] and tokens[k] >= points[k][0]]
        if due:
            for k, right in zip(due, correct_answers_stacked(st.select(due), s_tok, test_set,
                                                             preset.max_new_tokens)):
                correct[k] = right
                curves[k].append((tokens[k], float(right.mean())))
                while points[k] and tokens[k] >= points[k][0]:
                    points[k].pop(0)
    out = []
    for k in range(n):
        r = {"acc": curves[k][-1][1], "correct": correct[k], "tokens": tokens[k],
             "curve": curves[k], "one_to_one_share": float(np.mean(shares[k]))}
        if one_to_one:
            r["m_n_masked_tokens"] = masked[k]
        if keep_weights:
            r["weights"] = {name: w[k].detach().clone() for name, w in st.params.items()}
        out.append(r)
    return out


def correct_answers_stacked(st: Stack, tok: Any, problems: list, max_new_tokens: int
                            ) -> list[np.ndarray]:
    """Per student of ``st``: greedy decoding on ``problems``, the exact answer check (one bool
    per problem), in chunks of 250 problems."""
    out: list[list[np.ndarray]] = [[] for _ in range(st.size)]
    for lo in range(0, len(problems), 250):
        chunk = problems[lo: lo + 250]
        ids = [tok(p, add_special_tokens=False)["input_ids"] for p, _, _ in chunk]
        texts = sample(st, [ids] * st.size, max_new_tokens, [tok.eos_token_id],
                       tok.pad_token_id)
        for k, rows in enumerate(texts):
            out[k].append(np.array([
                check_answer(tok.decode(r[:-1] if r.size and r[-1] == tok.eos_token_id else r,
                                        skip_special_tokens=True), p[2])
                for r, p in zip(rows, chunk)]))
    return [np.concatenate(c) for c in out]


def teacher_samples(models: dict, preset: Any, seed: int, train_set,
                    teacher_key: str = "teacher_x", n: int = 2000) -> list[tuple]:
    """(problem, teacher text) for up to ``n`` training prompts, sampled from the teacher."""
    teacher, t_tok = models[teacher_key]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    probs = rng.sample(train_set, min(len(train_set), n))
    texts = generate_texts(teacher, t_tok, [p[0] for p in probs], preset.max_new_tokens,
                           sample=True)
    return list(zip(probs, texts))


def run_sft(models: dict, preset: Any, seed: int, train_set, test_set,
            samples: list[tuple] | None = None) -> dict:
    """Cross-entropy on T_x's own samples (or on ``samples``: (problem, teacher text) pairs),
    re-spelled in the student's tokenization."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    pairs = []
    if samples is None:
        samples = teacher_samples(models, preset, seed, train_set)
    for prob, text in samples:
        p_ids, r_ids = encode_pair(s_tok, prob[0], text)
        pairs.append((p_ids, r_ids[:160]))  # a rambling sample stays within context
    per_step = 32
    avg = float(np.mean([len(r) for _, r in pairs]))
    curve, tokens = [], 0
    for point in curve_points(preset):
        steps = max(1, round((point - tokens) / (per_step * avg)))
        tokens += supervised_train(student, pairs, steps, preset.sft_lr, per_step, seed + tokens)
        correct = checkpoint(curve, tokens, student, s_tok, test_set, preset)
    return {"acc": curve[-1][1], "correct": correct, "tokens": tokens, "curve": curve}


def run_uld(models: dict, preset: Any, seed: int, train_set, test_set,
            weight: float = 1.0) -> dict:
    """ULD (Boizard et al. 2024): cross-entropy on teacher samples plus the L1 distance between
    the sorted teacher and student next-token distributions, position k against position k of
    each side's own tokenization (truncated to the shorter), vocabularies zero-padded."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    teacher, t_tok = models["teacher_x"]
    data = []
    for prob, text in teacher_samples(models, preset, seed, train_set):
        sp, sr = encode_pair(s_tok, prob[0], text)
        tp, tr = encode_pair(t_tok, prob[0], text)
        data.append(((sp, sr[:160]), (tp, tr[:160])))
    opt = torch.optim.AdamW(student.parameters(), lr=preset.uld_lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    v_max = max(len(s_tok), len(t_tok))
    curve, tokens, points = [], 0, curve_points(preset)
    student.train()
    while points:
        batch = [data[i] for i in rng.integers(0, len(data), size=32)]
        loss = 0.0
        for (sp, sr), (tp, tr) in batch:
            s_ids = torch.tensor([sp + sr])
            s_logits = student(input_ids=s_ids).logits[0, len(sp) - 1: len(sp) + len(sr) - 1]
            ce = torch.nn.functional.cross_entropy(s_logits, torch.tensor(sr))
            with torch.no_grad():
                t_logits = teacher(input_ids=torch.tensor([tp + tr])).logits[
                    0, len(tp) - 1: len(tp) + len(tr) - 1]
            k = min(len(sr), len(tr))
            ps = torch.nn.functional.pad(s_logits[:k].softmax(-1), (0, v_max - len(s_tok)))
            pt = torch.nn.functional.pad(t_logits[:k].softmax(-1), (0, v_max - len(t_tok)))
            l1 = (ps.sort(-1, descending=True).values - pt.sort(-1, descending=True).values)
            loss = loss + ce + weight * l1.abs().sum(-1).mean()
            tokens += len(sr)
        opt.zero_grad(set_to_none=True)
        (loss / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        while points and tokens >= points[0]:
            correct = checkpoint(curve, tokens, student, s_tok, test_set, preset)
            points.pop(0)
    student.eval()
    return {"acc": curve[-1][1], "correct": correct, "tokens": tokens, "curve": curve}


def oracle_scored(scored: Scored, prefix: PrefixLogprobs, sv: Any, tv: Any,
                  special_penalty: float | None, clamp: float, min_mass: float = 0.0,
                  mask_unparsed: bool = False) -> Scored:
    """``scored`` with its targets replaced by the oracle's (``bench.oracle.rollout_oracle``:
    the teacher's exact byte-marginal log-prob of each student token, read off the same
    requests, alignments and teacher log-probs), the same special-token penalties, and the
    advantages recomputed; everything else, statistics included, as scored. Each scored unit
    (a response, or one assistant turn of a trajectory) gets its own span's targets; a
    trajectory's environment tokens stay without signal, and with ``mask_unparsed`` so do
    turns whose tool call did not parse (as ``unparsed_calls: mask``). ``min_mass`` as
    ``rollout_oracle``'s (0: exact)."""
    live = [k for k, u in enumerate(scored.units) if not (mask_unparsed and u.unparsed)]
    found = rollout_oracle(prefix, sv, tv, [scored.requests[k] for k in live],
                           [scored.alignments[k] for k in live],
                           [scored.teacher_logps[k] for k in live], min_mass=min_mass)
    qs = [np.full(len(old), np.nan) for old in scored.old_logps]
    per_unit = dict(zip(live, found))
    for k, u in enumerate(scored.units):
        old = scored.old_logps[u.rollout].numpy()[u.start:u.end]
        q_u = per_unit.get(k, np.full(u.end - u.start, np.nan))
        penalize_specials(q_u, old, u.request, sv.special, special_penalty)
        qs[u.rollout][u.start:u.end] = q_u
    targets, advs, signal = [], [], []
    for q, old in zip(qs, scored.old_logps):
        q_t = torch.from_numpy(q)
        a, v = advantages(q_t, old, clamp)
        targets.append(q_t)
        advs.append(a)
        signal.append(v)
    return dataclasses.replace(scored, targets=targets, advantages=advs, signal=signal)


def one_to_one_scored(scored: Scored, clamp: float) -> tuple[Scored, int]:
    """``scored`` with a signal on 1:1 chunks only: the tokens of m:n chunks get none (their
    targets NaN, advantages recomputed), and how many had one is returned; special-token
    penalties (on unaligned tokens) and everything else as scored."""
    qs, advs, signal, dropped = [], [], [], 0
    for q, a, old in zip(scored.targets, scored.alignments, scored.old_logps):
        drop = torch.from_numpy((a.student_chunk >= 0) & ~a.student_one_to_one) & ~torch.isnan(q)
        dropped += int(drop.sum())
        q = torch.where(drop, torch.full_like(q, float("nan")), q)
        adv, valid = advantages(q, old, clamp)
        qs.append(q)
        advs.append(adv)
        signal.append(valid)
    return dataclasses.replace(scored, targets=qs, advantages=advs, signal=signal), dropped
