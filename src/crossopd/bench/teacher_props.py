"""Why one teacher teaches better than another of equal accuracy: properties of each teacher of
the learning benchmark's pairs, measured on the student's own samples, beside each teacher's
teaching gain (``crossopd bench learn --teacher-properties``).

Every pair's T_x and T_s are matched on validation accuracy, yet in every pair T_s teaches far
better, and the oracle arm shows the tokenizer projection is not why. So the cause is in the
teachers' distributions over what the student writes. Each teacher is read through its exact
log-prob of every student token (``bench.oracle.rollout_oracle``: for T_s, whose tokenizer is
the student's, that is its own token log-prob), so the properties compare teachers, not
projections. Per teacher, on the same rollouts of the untrained student:

- ``accuracy``: its own greedy accuracy on the test split (the matched quantity);
- ``entropy_per_token`` / ``entropy_per_byte``: its next-token entropy (nats) over its own
  tokens of the student's responses, per token and summed per response byte;
- ``correct_logp_per_byte``: its log-prob of the worked solution (and its end of sequence),
  per byte, on test problems: how sure it is of the right continuation;
- ``reverse_kl_per_token``: the mean of ``log p_student - target`` over student tokens (the
  quantity OPD lowers);
- ``positive_advantage_share``: the share of student tokens whose advantage is positive;
- ``answer_advantage_share``: the share of the advantage mass (sum of |advantage|) on the
  answer's digits (the tokens after the last ``=``);
- ``answer_auc``: how well its log-prob of the student's answer tokens tells correct student
  answers from wrong ones (the area under the ROC curve; 0.5: not at all).

Teaching gains come from a ``bench learn`` result (``--gains result.json``): per pair, T_x's
gain is the oracle arm's accuracy minus the untrained student's (its own signal, no
projection; the cross arm's is reported beside it) and T_s's is the same-tokenizer arm's. With
them the result ranks each property against the gains over all teachers (Spearman)."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from crossopd.bench.learn import PRESETS, Preset, load_models, splits
from crossopd.bench.learn_task import accuracy, check_answer, encode_pair
from crossopd.bench.machine import machine
from crossopd.bench.oracle import PrefixLogprobs, answer_tokens, rollout_oracle, sample_problems
from crossopd.core.tokens import ByteVocab
from crossopd.step.bridge import TeacherRequest
from crossopd.step.loss import LossConfig
from crossopd.step.score import score_rollouts
from crossopd.step.sides import hf_pair

TEACHERS = ("teacher_x", "teacher_s")
PROPERTIES = ("accuracy", "entropy_per_token", "entropy_per_byte", "correct_logp_per_byte",
              "reverse_kl_per_token", "positive_advantage_share", "answer_advantage_share",
              "answer_auc")
# the arm whose per-pair accuracy is each teacher's gain, and a second one reported beside it
GAIN_ARMS = {"teacher_x": ("opd_oracle", "opd_cross_proportional"),
             "teacher_s": ("opd_same", None)}


def auc(scores: np.ndarray, positive: np.ndarray) -> float | None:
    """The probability that a positive's score exceeds a negative's (ties count half); None
    without both classes."""
    pos, neg = scores[positive], scores[~positive]
    if not pos.size or not neg.size:
        return None
    diff = pos[:, None] - neg[None, :]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def spearman(x: np.ndarray, y: np.ndarray) -> float | None:
    """Rank correlation (average ranks for ties); None when either side is constant."""
    def ranks(v: np.ndarray) -> np.ndarray:
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v), dtype=float)
        for value in np.unique(v):  # ties share their mean rank
            tied = v == value
            r[tied] = r[tied].mean()
        return r

    rx, ry = ranks(x), ranks(y)
    if rx.std() == 0 or ry.std() == 0:
        return None
    return float(np.corrcoef(rx, ry)[0, 1])


def correct_logp_per_byte(model: Any, tok: Any, problems: list, logprobs: PrefixLogprobs
                          ) -> float:
    """The teacher's log-prob of each worked solution and its end of sequence given the problem,
    summed over problems, per solution byte."""
    seqs, spans, n_bytes = [], [], 0
    for prompt, solution, _ in problems:
        p, r = encode_pair(tok, prompt, solution)
        seqs.append(tuple(p + r))
        spans.append((len(p), len(p) + len(r)))
        n_bytes += len(solution.encode())
    total = 0.0
    for seq, (lo, hi), lp in zip(seqs, spans, logprobs.fn(seqs)):
        total += float(lp[np.arange(lo - 1, hi - 1), np.asarray(seq[lo:hi])].sum())
    return total / n_bytes


def response_entropy(requests: Sequence[TeacherRequest], logprobs: PrefixLogprobs,
                     tv: ByteVocab) -> tuple[float, int, int]:
    """(summed next-token entropy in nats, tokens, bytes) over the teacher's own tokens of each
    response: the positions that predict them, in the teacher's input as the bridge built it
    (requests that overflowed the teacher's context are left out)."""
    live = [q for q in requests if not q.overflow]
    entropy, n_tokens, n_bytes = 0.0, 0, 0
    for q, lp in zip(live, logprobs.fn([tuple(q.teacher_ids) for q in live])):
        rows = lp[q.response_start - 1: q.response_end - 1]
        entropy += float(-(np.exp(rows) * rows).sum())
        n_tokens += q.response_end - q.response_start
        n_bytes += int(tv.lengths[np.asarray(q.teacher_ids[q.response_start:
                                                           q.response_end])].sum())
    return entropy, n_tokens, n_bytes


def measure_teacher(models: dict, key: str, preset: Preset, test_set: list,
                    n_rollouts: int, seed: int) -> dict[str, Any]:
    """Every property of ``models[key]`` on ``n_rollouts`` student samples (the same samples
    for both teachers of a pair: the same student, problems and sampling seed)."""
    student, s_tok = models["student"]
    teacher, t_tok = models[key]
    s_side, teachers = hf_pair(student, s_tok, teacher, t_tok)
    sv, tv = s_side.vocab, next(iter(teachers.values())).vocab
    exs, prompts, responses, settings = sample_problems(s_side, preset, n_rollouts, seed)
    scored = score_rollouts(s_side, teachers, exs, prompts, responses, settings)
    logprobs = PrefixLogprobs.from_model(teacher)
    exact = rollout_oracle(logprobs, sv, tv, scored.requests, scored.alignments,
                           scored.teacher_logps)
    entropy, n_teacher_tokens, resp_bytes = response_entropy(scored.requests, logprobs, tv)
    clamp = LossConfig().adv_clamp
    old = np.concatenate([o.numpy() for o in scored.old_logps])
    target = np.concatenate(exact)
    has = ~np.isnan(target)
    adv = np.clip(target - old, -clamp, clamp)
    answer = np.concatenate([answer_tokens(sv, r) for r in responses]) & has
    # per rollout: its answer tokens' summed target, and whether the answer is right
    answer_logp, right = [], []
    for e, r, t in zip(exs, responses, exact):
        mask = answer_tokens(sv, r) & ~np.isnan(t)
        answer_logp.append(float(t[mask].sum()) if mask.any() else -np.inf)
        right.append(check_answer(s_tok.decode(r, skip_special_tokens=True), int(e.answer)))
    right_arr = np.asarray(right)
    return {
        "accuracy": accuracy(teacher, t_tok, test_set, preset.max_new_tokens),
        "entropy_per_token": entropy / max(1, n_teacher_tokens),
        "entropy_per_byte": entropy / max(1, resp_bytes),
        "correct_logp_per_byte": correct_logp_per_byte(teacher, t_tok, test_set[:n_rollouts],
                                                       logprobs),
        "reverse_kl_per_token": float((old[has] - target[has]).mean()),
        "positive_advantage_share": float((adv[has] > 0).mean()),
        "answer_advantage_share": float(np.abs(adv[answer]).sum() / np.abs(adv[has]).sum()),
        "answer_auc": auc(np.asarray(answer_logp), right_arr),
        "counts": {"rollouts": len(responses), "student_tokens": int(old.size),
                   "signal_tokens": int(has.sum()), "answer_tokens": int(answer.sum()),
                   "teacher_tokens": n_teacher_tokens, "right_answers": int(right_arr.sum())},
    }


def gains_from(result: dict) -> dict[str, list[dict[str, float | None]]]:
    """Per teacher, per pair: its gain (and the second arm's) over the untrained student, from a
    ``bench learn`` result's per-pair arm accuracies."""
    arms = result["arms"]
    base = arms["untrained"]["acc_per_pair"]
    missing = [a for pair in GAIN_ARMS.values() for a in pair if a and a not in arms]
    if missing:
        raise ValueError(f"the bench learn result has no arm {', '.join(missing)}: give one "
                         "that ran them (the standard preset does)")
    out = {}
    for key, (arm, also) in GAIN_ARMS.items():
        out[key] = [{"gain": arms[arm]["acc_per_pair"][k] - b,
                     "gain_arm": arm,
                     "also": (arms[also]["acc_per_pair"][k] - b) if also else None,
                     "also_arm": also} for k, b in enumerate(base)]
    return out


def teacher_properties(preset_name: str = "standard", gains: str | Path | None = None,
                       n_rollouts: int = 512, seed: int = 0, progress=print) -> dict[str, Any]:
    """Every property of both teachers of every shipped pair; with ``gains`` (a ``bench learn``
    result.json), each property's rank correlation with the teaching gain over all teachers."""
    t0 = time.perf_counter()
    preset = PRESETS[preset_name]
    pairs, source, artifacts = load_models(preset, progress=progress)
    _, _, test_set = splits(preset)
    rows = []
    for models in pairs:
        for key in TEACHERS:
            props = measure_teacher(models, key, preset, test_set, n_rollouts, seed)
            rows.append({"pair": models["pair"], "teacher": key, **props})
            progress(f"pair {models['pair']} {key}: " + ", ".join(
                f"{p} {props[p]:.3f}" for p in PROPERTIES if props[p] is not None))
    out: dict[str, Any] = {"teachers": rows, "preset": preset_name, "rollouts": n_rollouts,
                           "seed": seed, "artifacts": artifacts, "source": source}
    if gains is not None:
        found = gains_from(json.loads(Path(gains).read_text()))
        for row in rows:
            row.update(found[row["teacher"]][row["pair"]])
        g = np.asarray([r["gain"] for r in rows])
        out["gains_from"] = str(gains)
        out["spearman_with_gain"] = {
            p: spearman(np.asarray([r[p] for r in rows], dtype=float), g)
            for p in PROPERTIES if all(r[p] is not None for r in rows)}
    out.update(machine=machine(), seconds=time.perf_counter() - t0)
    return out


def render_properties(r: dict) -> str:
    """The table: one row per teacher, one column per property (and gain, when known)."""
    cols = ["pair", "teacher", *PROPERTIES, *(["gain"] if "spearman_with_gain" in r else [])]
    lines = ["  ".join(f"{c:>10.10}" for c in cols)]
    for row in r["teachers"]:
        cells = [f"{row[c]:>10.3f}" if isinstance(row[c], float) else f"{row[c]!s:>10.10}"
                 for c in cols]
        lines.append("  ".join(cells))
    if "spearman_with_gain" in r:
        lines.append("rank correlation with the teaching gain over "
                     f"{len(r['teachers'])} teachers (Spearman):")
        lines += [f"  {p:<26} {v:+.2f}" if v is not None else f"  {p:<26} n/a"
                  for p, v in r["spearman_with_gain"].items()]
    lines.append(f"{r['rollouts']} student rollouts per teacher, seed {r['seed']}; "
                 f"{r['seconds']:.0f} s")
    return "\n".join(lines)
