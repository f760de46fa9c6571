"""A training-free check of the credit rules in the learning benchmark: each rule's per-token
advantages against the exact teacher signal, on the same student rollouts.

Inside a chunk the teacher covers several student tokens with fewer tokens of its own, so it
never scores the student's intermediate byte prefixes; the credit rules guess how to share the
chunk's log-prob out. The teacher does define them, through its byte-level marginal: from its
state ``s`` at the chunk start (its own prompt and canonical tokens up to that sync point),

    f_s(β) = P(the teacher's continuation bytes start with β)
           = Σ_{t: bytes(t) starts with β} P(t|s)
             + Σ_{t nonempty, β strictly starts with bytes(t)} P(t|s) · f_{s+t}(β[len(t):])

and the oracle target of student token i is ``log f(β_≤i) − log f(β_<i)`` (``β_≤i``: the chunk
bytes up to the end of token i, ``f(b"") = 1``). The second sum walks the teacher's
non-canonical tokenizations of the chunk's proper prefixes, one forward pass per distinct
teacher-id prefix (cached; these teachers are ~0.1M parameters). A chunk's oracle targets sum to
``log f(chunk bytes)``, which is at least ``L_T``: the gap is teacher mass on other spellings.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from crossopd.bench.learn_task import make_split
from crossopd.core.align import Alignment
from crossopd.core.credit import BUILTIN_RULES
from crossopd.core.tokens import ByteVocab
from crossopd.models.scoring import token_budget_batches
from crossopd.step.bridge import TeacherRequest
from crossopd.step.data import Example
from crossopd.step.loss import LossConfig
from crossopd.step.rollout import sample_rollouts
from crossopd.step.score import Scored, credit_targets, score_rollouts
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, TeacherSide, hf_pair

# [len(seq), V] next-token log-probs after every prefix seq[:j + 1], one array per sequence
SequenceLogprobs = Callable[[list[tuple[int, ...]]], Sequence[np.ndarray]]


class PrefixLogprobs:
    """Next-token log-prob vectors of a causal LM for id prefixes, cached by prefix.

    A prefix of another requested prefix is read off that one's forward pass (causal), so the
    chunk starts of one rollout cost one pass over its teacher sequence."""

    def __init__(self, fn: SequenceLogprobs) -> None:
        self.fn = fn
        self.cache: dict[tuple[int, ...], np.ndarray] = {}
        self.forwards = 0  # sequences passed through the model

    @classmethod
    def from_model(cls, model: Any, pad_id: int = 0,
                   logits_budget_bytes: int = 2**28) -> PrefixLogprobs:
        """From a Hugging Face causal LM (right padding; float64 log-softmax of its logits)."""
        vocab = model.get_output_embeddings().weight.shape[0]
        budget = max(1, min(8192, logits_budget_bytes // (8 * vocab)))
        device = next(model.parameters()).device

        @torch.inference_mode()
        def run(seqs: list[tuple[int, ...]]) -> list[np.ndarray]:
            out: list[np.ndarray] = [np.empty(0)] * len(seqs)
            for batch in token_budget_batches([len(s) for s in seqs], budget):
                width = max(len(seqs[i]) for i in batch)
                ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for r, i in enumerate(batch):
                    ids[r, : len(seqs[i])] = torch.tensor(seqs[i])
                    mask[r, : len(seqs[i])] = 1
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
                lp = torch.log_softmax(logits.double(), -1).cpu().numpy()
                for r, i in enumerate(batch):
                    out[i] = lp[r, : len(seqs[i])]
            return out

        return cls(run)

    def get(self, prefixes: Sequence[tuple[int, ...]]) -> list[np.ndarray]:
        missing = sorted({p for p in prefixes if p not in self.cache})
        if any(len(p) == 0 for p in missing):
            raise ValueError("an empty prefix has no next-token distribution here")
        # sorted: a prefix of any later entry is a prefix of the very next one
        roots = [i for i, p in enumerate(missing)
                 if i + 1 == len(missing) or missing[i + 1][: len(p)] != p]
        if roots:
            self.forwards += len(roots)
            rows = self.fn([missing[i] for i in roots])
            k = 0
            for i, p in enumerate(missing):
                while roots[k] < i:
                    k += 1
                self.cache[p] = rows[k][len(p) - 1]
        return [self.cache[p] for p in prefixes]


@dataclass(frozen=True)
class ChunkQuery:
    """One chunk: the teacher ids before it and its bytes, one piece per student token."""

    prefix: tuple[int, ...]
    pieces: tuple[bytes, ...]


def _token_matrix(tv: ByteVocab, width: int) -> np.ndarray:
    """[V, width] int16: each token's first ``width`` bytes, -1 past its end (never a byte)."""
    lengths = tv.lengths
    flat = np.frombuffer(tv.concat_bytes(np.arange(tv.vocab_size)), dtype=np.uint8)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    col = np.arange(width)
    inside = col[None, :] < lengths[:, None]
    idx = np.minimum(starts[:, None] + col[None, :], max(flat.size - 1, 0))
    return np.where(inside, flat[idx] if flat.size else 0, -1).astype(np.int16)


def oracle_targets_many(logprobs: PrefixLogprobs, tv: ByteVocab, queries: Sequence[ChunkQuery],
                        *, min_mass: float = 0.0, max_nodes: int = 100_000) -> list[np.ndarray]:
    """Oracle targets (one per piece) for many chunks, walking all of them a byte offset at a
    time so each level's forward passes go through the model together.

    ``min_mass``: non-canonical paths whose probability falls to it or below are not expanded
    (0: exact). ``max_nodes`` guards against a long chunk's exponential number of spellings."""
    if any(len(p) == 0 for q in queries for p in q.pieces):
        raise ValueError("every student token of a chunk spells at least one byte")
    betas = [np.frombuffer(b"".join(q.pieces), dtype=np.uint8) for q in queries]
    width = max((b.size for b in betas), default=1)
    mat = _token_matrix(tv, width)
    lengths = tv.lengths
    f = [np.zeros(b.size + 1) for b in betas]
    # nodes[k]: (query, teacher ids, path probability) reaching byte offset k exactly
    nodes: dict[int, list[tuple[int, tuple[int, ...], float]]] = {
        0: [(n, tuple(q.prefix), 1.0) for n, q in enumerate(queries)]}
    lcp_cache: dict[tuple[int, int], np.ndarray] = {}
    expanded = 0
    for k in range(width):
        level = nodes.pop(k, [])
        expanded += len(level)
        if expanded > max_nodes:
            raise ValueError(f"more than {max_nodes} teacher states: raise min_mass or max_nodes")
        dists = logprobs.get([ids for _, ids, _ in level])
        for (n, ids, mass), lp in zip(level, dists):
            rest = betas[n][k:]
            g = rest.size
            lcp = lcp_cache.get((n, k))
            if lcp is None:  # common prefix of every token with the chunk's remaining bytes
                lcp = np.cumprod(mat[:, :g] == rest[None, :], axis=1).sum(axis=1)
                lcp_cache[n, k] = lcp
            p = np.exp(lp)
            # tokens reaching at least j bytes further along the chunk: f[k + j] for j >= 1
            reach = np.bincount(lcp, weights=p, minlength=g + 1)[::-1].cumsum()[::-1]
            f[n][k + 1:] += mass * reach[1:]
            inner = np.flatnonzero((lcp == lengths) & (lengths > 0) & (lengths < g))
            for t in inner.tolist():
                child = mass * p[t]
                if child > min_mass:
                    nodes.setdefault(k + int(lengths[t]), []).append((n, ids + (t,), child))
    out = []
    for q, fq in zip(queries, f):
        ends = np.cumsum([len(p) for p in q.pieces])
        fq[0] = 1.0
        logf = np.log(fq[np.concatenate(([0], ends))])
        out.append(np.diff(logf))
    return out


def oracle_targets(logprobs: PrefixLogprobs, tv: ByteVocab, teacher_prefix_ids: Sequence[int],
                   pieces: Sequence[bytes], *, min_mass: float = 0.0) -> np.ndarray:
    """Oracle targets of one chunk's student tokens (``pieces``: their bytes) after the teacher
    ids ``teacher_prefix_ids``."""
    q = ChunkQuery(tuple(int(i) for i in teacher_prefix_ids), tuple(pieces))
    return oracle_targets_many(logprobs, tv, [q], min_mass=min_mass)[0]


def rollout_oracle(logprobs: PrefixLogprobs, sv: ByteVocab, tv: ByteVocab,
                   reqs: Sequence[TeacherRequest], alignments: Sequence[Alignment],
                   teacher_logps: Sequence[np.ndarray | None], *, min_mass: float = 0.0
                   ) -> list[np.ndarray]:
    """Oracle target per student response token of each rollout, NaN where none: unaligned
    tokens and a chunk whose first teacher token also spells seam bytes. The stop chunk (no
    bytes) gets the teacher's log-prob of its end-of-turn tokens, which is exact there."""
    out, queries, where = [], [], []
    for r, (req, a, t_lp) in enumerate(zip(reqs, alignments, teacher_logps)):
        q = np.full(a.student_chunk.size, np.nan)
        out.append(q)
        if t_lp is None or a.num_chunks == 0:
            continue
        # chunks are numbered in text order and contiguous on both sides
        s_idx = np.flatnonzero(a.student_chunk >= 0)
        s_bounds = np.searchsorted(a.student_chunk[s_idx], np.arange(a.num_chunks + 1))
        t_ok = np.flatnonzero(a.teacher_chunk >= 0)
        t_first = t_ok[np.searchsorted(a.teacher_chunk[t_ok], np.arange(a.num_chunks))]
        pieces = sv.token_bytes(req.student_response)
        for c in range(a.num_chunks):
            members = s_idx[s_bounds[c]: s_bounds[c + 1]]
            if req.lead and t_first[c] == 0:
                continue
            if all(len(pieces[i]) == 0 for i in members):  # the stop chunk
                q[members] = t_lp[a.teacher_chunk == c].sum() / members.size
                continue
            prefix = tuple(req.teacher_ids[: req.response_start + int(t_first[c])])
            queries.append(ChunkQuery(prefix, tuple(pieces[i] for i in members)))
            where.append((r, members))
    for (r, members), targets in zip(where, oracle_targets_many(logprobs, tv, queries,
                                                                  min_mass=min_mass)):
        out[r][members] = targets
    return out


# ------------------------------------------------------------------------ the benchmark's models
class TaskSizes(Protocol):
    """What ``diagnose`` reads from a ``bench.learn`` preset (read-only, as in its frozen
    dataclass)."""

    @property
    def n_train(self) -> int: ...
    @property
    def digits(self) -> int: ...
    @property
    def max_new_tokens(self) -> int: ...


def sample_problems(student: StudentSide, preset: TaskSizes, n_rollouts: int, seed: int
                    ) -> tuple[list[Example], list[list[int]], list[np.ndarray], StepSettings]:
    """Student samples on ``n_rollouts`` training problems, from their own RNG stream (the same
    problems and samples for the same student, preset and seed)."""
    train = make_split(preset.n_train, 1, digits=preset.digits)
    problems = random.Random(seed).sample(train, min(n_rollouts, len(train)))
    examples = [Example([{"role": "user", "content": p}], str(a)) for p, _, a in problems]
    settings = StepSettings.build(max_new_tokens=preset.max_new_tokens)
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        exs, prompts, responses = sample_rollouts(student, examples, settings)
    return exs, prompts, responses, settings


def rule_targets(scored: Scored, student: StudentSide, teacher: TeacherSide,
                 settings: StepSettings) -> dict[str, list[np.ndarray]]:
    """Every built-in rule's targets on the same scored rollouts: the teacher's log-probs, the
    alignments and the rollout log-probs are read from ``scored``, never computed again."""
    penalty = settings.penalty
    return {rule: [credit_targets(q, lp, o.numpy(), student.vocab, teacher.vocab, rule=rule,
                                  special_penalty=penalty, alignment=a).targets
                   for q, lp, o, a in zip(scored.requests, scored.teacher_logps,
                                          scored.old_logps, scored.alignments)]
            for rule in BUILTIN_RULES}


def answer_tokens(sv: ByteVocab, response: np.ndarray) -> np.ndarray:
    """Student tokens spelling the digits right after the response's last ``=``."""
    lens = sv.lengths[response]
    ends = np.cumsum(lens)
    data = sv.concat_bytes(response)
    eq = data.rfind(b"=")
    run = eq + 1
    while 0 <= eq and run < len(data) and data[run: run + 1].isdigit():
        run += 1
    return (eq >= 0) & (ends - lens > eq) & (ends <= run) & (lens > 0)


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    ok = x.size > 1 and x.std() > 0 and y.std() > 0
    return float(np.corrcoef(x, y)[0, 1]) if ok else None


def _share(hit: np.ndarray) -> float | None:  # a mean; None without data
    return float(hit.mean()) if hit.size else None


def _rollouts(models: dict[str, tuple[Any, Any]], teacher_key: str, preset: TaskSizes,
              n_rollouts: int, seed: int) -> tuple[StudentSide, TeacherSide, list[np.ndarray],
                                                   Scored, dict[str, list[np.ndarray]]]:
    """Student rollouts scored once by one teacher, and every rule's targets on them: the
    pieces both checks below read."""
    student, s_tok = models["student"]
    teacher, t_tok = models[teacher_key]
    s_side, teachers = hf_pair(student, s_tok, teacher, t_tok)
    t_side = next(iter(teachers.values()))
    exs, prompts, responses, settings = sample_problems(s_side, preset, n_rollouts, seed)
    scored = score_rollouts(s_side, teachers, exs, prompts, responses, settings)
    return s_side, t_side, responses, scored, rule_targets(scored, s_side, t_side, settings)


def diagnose(models: dict[str, tuple[Any, Any]], preset: TaskSizes, n_rollouts: int = 64,
             seed: int = 0) -> dict[str, Any]:
    """Each credit rule's advantages against the oracle's, on the same student rollouts from
    T_x (``models`` as ``bench.learn`` builds them). Advantages are ``clamp(target - log p, ±10)``
    as in training. Per rule: Pearson correlation with the oracle over all tokens that have an
    oracle target and over tokens of chunks that are not 1:1, sign agreement on answer tokens
    and on not-1:1 tokens (no signal counts as disagreement), mean absolute difference, and the
    share of response tokens with no signal (advantage NaN or exactly 0). A statistic without
    data (or a constant side for a correlation) is None."""
    t0 = time.perf_counter()
    s_side, t_side, responses, scored, targets = _rollouts(models, "teacher_x", preset,
                                                           n_rollouts, seed)
    sv, tv = s_side.vocab, t_side.vocab
    aligns, t_lps = scored.alignments, scored.teacher_logps
    logprobs = PrefixLogprobs.from_model(models["teacher_x"][0])
    oracle = rollout_oracle(logprobs, sv, tv, scored.requests, aligns, t_lps)
    clamp = LossConfig().adv_clamp
    old = np.concatenate([o.numpy() for o in scored.old_logps])
    adv_o = np.clip(np.concatenate(oracle) - old, -clamp, clamp)
    has = ~np.isnan(adv_o)
    multi = has & ~np.concatenate([a.student_one_to_one for a in aligns])
    answer = has & np.concatenate([answer_tokens(sv, r) for r in responses])
    gaps = []  # log f(chunk bytes) - L_T: teacher mass on spellings other than its own
    for a, o, t_lp, r in zip(aligns, oracle, t_lps, responses):
        ok = ~np.isnan(o) & (a.student_chunk >= 0) & (sv.lengths[r] > 0)  # no stop chunk
        if t_lp is not None and ok.any():
            f = np.bincount(a.student_chunk[ok], weights=o[ok], minlength=a.num_chunks)
            t_ok = a.teacher_chunk >= 0
            lt = np.bincount(a.teacher_chunk[t_ok], weights=t_lp[t_ok], minlength=a.num_chunks)
            chunks = np.unique(a.student_chunk[ok])
            gaps.append(f[chunks] - lt[chunks])
    rules = {}
    for rule, qs in targets.items():
        adv = np.clip(np.concatenate(qs) - old, -clamp, clamp)
        rules[rule] = {
            "pearson_all": _pearson(adv[has], adv_o[has]),
            "pearson_multi": _pearson(adv[multi], adv_o[multi]),
            "sign_agree_answer": _share(np.sign(adv[answer]) == np.sign(adv_o[answer])),
            "sign_agree_multi": _share(np.sign(adv[multi]) == np.sign(adv_o[multi])),
            "mean_abs_diff_all": _share(np.abs(adv[has] - adv_o[has])),
            "mean_abs_diff_multi": _share(np.abs(adv[multi] - adv_o[multi])),
            "no_signal_share": _share(np.isnan(adv) | (adv == 0)),
        }
    stats = scored.stats
    gap = np.concatenate(gaps) if gaps else np.zeros(0)
    return {
        "rules": rules,
        "oracle_no_signal_share": _share(~has | (adv_o == 0)),
        "one_to_one_share": float(stats["one_to_one_share"]),
        "noncanonical_logmass_mean": _share(gap),
        "counts": {"rollouts": len(responses), "response_tokens": int(old.size),
                   "oracle_tokens": int(has.sum()), "multi_tokens": int(multi.sum()),
                   "answer_tokens": int(answer.sum()),
                   "chunks": int(sum(a.num_chunks for a in aligns)),
                   "teacher_forwards": logprobs.forwards},
        "seconds": time.perf_counter() - t0,
    }


def identity_check(models: dict[str, tuple[Any, Any]], preset: TaskSizes,
                   n_rollouts: int = 16, seed: int = 0) -> dict[str, Any]:
    """The control: student rollouts scored by T_s through a tokenizer object of its own that
    spells the student's vocabulary. Every chunk must be 1:1 and every rule's target the
    teacher's log-prob of the token, bit for bit: ``exact`` (``max_abs_diff`` 0.0 for every
    rule)."""
    _, _, responses, scored, targets = _rollouts(models, "teacher_s", preset, n_rollouts, seed)
    aligns, t_lps = scored.alignments, scored.teacher_logps
    diffs = dict.fromkeys(targets, 0.0)
    aligned = 0
    for r, (a, t_lp) in enumerate(zip(aligns, t_lps)):
        s_ok, t_ok = a.student_chunk >= 0, a.teacher_chunk >= 0
        if t_lp is None or not s_ok.any():
            continue
        aligned += int(s_ok.sum())
        for rule, qs in targets.items():
            q = qs[r][s_ok]
            d = np.abs(q - t_lp[t_ok]).max() if q.size == t_ok.sum() else np.inf
            diffs[rule] = max(diffs[rule], float(d))
    chunks = sum(a.num_chunks for a in aligns)
    one = sum(a.counts["one_to_one_chunks"] for a in aligns)
    return {"rollouts": len(responses), "chunks": chunks, "one_to_one_chunks": one,
            "aligned_tokens": aligned, "coverage": float(scored.stats["coverage"]),
            "max_abs_diff": diffs, "exact": one == chunks and max(diffs.values()) == 0.0}
