"""One OPD step as a library: sample from the student, score with a teacher of another family,
align, assign credit, and take a PPO-clip step on the per-token reverse-KL advantage.

Every engine builds on these functions: the native recipe (``crossopd.train``), the benchmarks
and the TRL integration. Each takes the config sections it uses, never a whole run config, and
holds no trainer-framework types.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from crossopd.bridge import (
    ChatFormat,
    TeacherContext,
    TeacherRequest,
    align_bridged,
    build_teacher_request,
)
from crossopd.config import RolloutConfig
from crossopd.credit import RULES, assign_credit
from crossopd.loss import LossConfig, advantages, policy_loss
from crossopd.prompts import Example
from crossopd.rollout.hf import sample
from crossopd.scoring import score_sequences, token_budget_batches
from crossopd.teachers import Teacher
from crossopd.tokens import ByteVocab

TIMING_PREFIX = "time/"


@dataclass
class Components:
    """The student, the teacher, and each side's prompt format and byte view."""

    student: Any
    student_fmt: ChatFormat
    sv: ByteVocab
    teacher: Teacher
    teacher_fmt: ChatFormat
    tv: ByteVocab
    context: TeacherContext
    pad_id: int
    device: torch.device
    student_tokenizer: Any = None  # the HF tokenizer (engines that render prompts themselves)
    # the student's compute dtype: weights stay float32 (master weights) and its forward passes
    # run under autocast, so small updates are not rounded away in bf16/fp16
    compute_dtype: torch.dtype = torch.float32

    def student_autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.compute_dtype,
                              enabled=self.compute_dtype != torch.float32)

    @classmethod
    def from_tokenizers(
        cls,
        student: Any,
        student_tokenizer: Any,
        teacher: Teacher,
        teacher_tokenizer: Any,
        *,
        student_fmt: ChatFormat | None = None,
        teacher_fmt: ChatFormat | None = None,
        context: TeacherContext | None = None,
    ) -> Components:
        """From loaded models and their Hugging Face tokenizers (chat templates included); the
        formats default to each tokenizer's own chat template."""
        tok = student_tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
        fmt = student_fmt or ChatFormat.from_tokenizer(tok, eos_ids=generation_eos(student))
        return cls(
            student=student,
            student_fmt=fmt,
            sv=ByteVocab.from_pretrained(tok),
            teacher=teacher,
            teacher_fmt=teacher_fmt or ChatFormat.from_tokenizer(teacher_tokenizer),
            tv=ByteVocab.from_pretrained(teacher_tokenizer),
            context=context or TeacherContext(),
            pad_id=int(pad or 0),
            device=next(student.parameters()).device,
            student_tokenizer=tok,
        )


def generation_eos(model: Any) -> list[int]:
    """The EOS ids of a model's generation config (an int or a list: Llama 3 Instruct ends turns
    on several)."""
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


@dataclass
class Scored:
    """Rollouts of one step with everything the update needs."""

    sequences: list[list[int]]  # student prompt + response
    spans: list[tuple[int, int]]  # response positions in ``sequences``
    old_logps: list[torch.Tensor]
    targets: list[torch.Tensor]  # credit q per response token, NaN where no signal
    stats: dict[str, float]
    totals: dict[str, float] = dataclasses.field(default_factory=dict)  # StepStats sums
    times: dict[str, float] = dataclasses.field(default_factory=dict)  # seconds per phase


class StepStats:
    """Alignment and signal statistics over the rollouts of one step (or one evaluation).

    Every token that gets no signal is counted under the reason why: unaligned bytes, masked
    special tokens, or a sequence that overflowed the teacher's context."""

    KEYS = ("sequences", "tokens", "bytes", "aligned_bytes", "chunks", "one_to_one",
            "unaligned_tokens", "masked_special", "penalized_special", "stop_chunks", "stopped",
            "overflowed", "signal_tokens", "kl_sum")

    def __init__(self, totals: dict[str, float] | None = None) -> None:
        """``totals``: sums to start from, e.g. the sums of several processes added up."""
        self.totals: dict[str, float] = dict.fromkeys(self.KEYS, 0.0)
        self.totals.update(totals or {})

    def add(self, a: Any, req: TeacherRequest, logps: np.ndarray, q: np.ndarray,
            penalized: int = 0) -> None:
        """``q``: the teacher's credit targets (before special-token penalties); ``penalized``:
        special tokens that got a penalty instead of no signal."""
        c, counts = self.totals, a.counts
        c["sequences"] += 1
        c["tokens"] += len(logps)
        c["bytes"] += counts["student_bytes"]
        c["aligned_bytes"] += counts["aligned_student_bytes"] if not req.overflow else 0
        c["chunks"] += a.num_chunks
        c["one_to_one"] += counts["one_to_one_chunks"]
        c["unaligned_tokens"] += counts["unaligned_student_tokens"]
        stop = req.student_stop_index is not None and not req.overflow
        c["masked_special"] += counts["special_student_tokens"] - int(stop) - penalized
        c["penalized_special"] += penalized
        c["stop_chunks"] += int(stop)
        c["stopped"] += int(req.student_stop_index is not None)
        c["overflowed"] += int(req.overflow)
        ok = ~np.isnan(q)
        c["signal_tokens"] += int(ok.sum())
        c["kl_sum"] += float((logps[ok] - q[ok]).sum())

    def result(self) -> dict[str, float]:
        c = self.totals
        return {
            "kl_per_token": c["kl_sum"] / max(c["signal_tokens"], 1),
            "kl_per_byte": c["kl_sum"] / max(c["aligned_bytes"], 1),
            "coverage": c["aligned_bytes"] / max(c["bytes"], 1),
            "one_to_one_share": c["one_to_one"] / max(c["chunks"], 1),
            "unaligned_tokens": c["unaligned_tokens"],
            "masked_special_tokens": c["masked_special"],
            "penalized_special_tokens": c["penalized_special"],
            "stop_chunks": c["stop_chunks"],
            "stop_rate": c["stopped"] / max(c["sequences"], 1),
            "overflowed_sequences": c["overflowed"],
            "response_tokens": c["tokens"],
            "signal_tokens": c["signal_tokens"],
        }


# ------------------------------------------------------------------------------- rollout + score
def sample_rollouts(
    c: Components, examples: Sequence[Example], rollout: RolloutConfig
) -> tuple[list[Example], list[list[int]], list[np.ndarray]]:
    """(examples, student prompt ids, sampled response ids), ``samples_per_prompt`` each."""
    n = rollout.samples_per_prompt
    exs = [e for e in examples for _ in range(n)]
    # one template rendering per prompt, repeated for its samples
    prompts = [p for e in examples for p in [c.student_fmt.prompt_ids(e.messages)] * n]
    with c.student_autocast():
        responses = sample(c.student, prompts, max_new_tokens=rollout.max_new_tokens,
                           temperature=rollout.temperature, top_p=rollout.top_p,
                           stop_ids=c.student_fmt.stop_ids, pad_id=c.pad_id)
    return exs, prompts, responses


def teacher_requests(c: Components, examples: Sequence[Example],
                     responses: Sequence[np.ndarray]) -> list[TeacherRequest]:
    """Each response bridged into the teacher's prompt format and vocabulary."""
    return [build_teacher_request(e.messages, r, c.student_fmt, c.teacher_fmt, c.sv, c.tv,
                                  context=c.context, reference=e.reference)
            for e, r in zip(examples, responses)]


def score_requests(c: Components, reqs: Sequence[TeacherRequest]) -> dict[int, np.ndarray]:
    """Teacher log-probs by request index; an overflowed or empty request gets none."""
    live = [i for i, q in enumerate(reqs) if not q.overflow and q.stop_end > q.response_start]
    t_logps = c.teacher.score([reqs[i].teacher_ids for i in live],
                              [reqs[i].scored_span for i in live]) if live else []
    return dict(zip(live, t_logps))


def score_rollouts(
    c: Components,
    examples: Sequence[Example],
    prompts: Sequence[Sequence[int]],
    responses: Sequence[np.ndarray],
    *,
    credit_rule: str,
    max_batch_tokens: int,
    old_logps: Sequence[torch.Tensor] | None = None,
    temperature: float = 1.0,
    special_penalty: float | None = None,
) -> Scored:
    """Teacher scoring, alignment and credit for sampled responses (from any rollout engine).

    ``old_logps`` are the student's rollout-time log-probs of each response token under the
    sampling distribution; when not given they are computed here with the student at
    ``temperature``. ``special_penalty``: the advantage ``-special_penalty`` for special
    tokens sampled mid-response (``None``: they get no signal)."""
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    reqs = teacher_requests(c, examples, responses)
    times["bridge"] = time.perf_counter() - t0  # teacher prompts + teacher tokenization
    t0 = time.perf_counter()
    teacher_lp = score_requests(c, reqs)
    times["teacher"] = time.perf_counter() - t0

    sequences = [list(p) + np.asarray(r).tolist() for p, r in zip(prompts, responses)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
    t0 = time.perf_counter()
    if old_logps is None:
        with torch.no_grad(), c.student_autocast():
            old_logps = score_sequences(c.student, sequences, spans, temperature=temperature,
                                        max_batch_tokens=max_batch_tokens, pad_id=c.pad_id)
    old = [o.detach().double().cpu() for o in old_logps]
    times["student_logps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets, stats = [], StepStats()
    for i, (req, lp) in enumerate(zip(reqs, old)):
        a = align_bridged(req, c.sv, c.tv)
        if i in teacher_lp:
            q = assign_credit(a, teacher_lp[i], lp.numpy(), rule=credit_rule)
        else:
            q = np.full(len(lp), np.nan)
        q = np.asarray(q, dtype=np.float64)
        # the KL statistics read sum(log p - q) per chunk, which is L_S - L_T only for the
        # sum-invariant rules: an ablation rule's rollouts report the uniform rule's KL
        q_kl = q.copy()
        if credit_rule not in RULES and i in teacher_lp:
            q_kl = np.asarray(assign_credit(a, teacher_lp[i], lp.numpy(), rule="uniform"))
        hit = _penalize_specials(q, lp.numpy(), req, c.sv.special, special_penalty)
        q_kl[hit] = np.nan  # a penalty is not the teacher's judgement: kept out of the KL
        stats.add(a, req, lp.numpy(), q_kl, penalized=int(hit.sum()))
        targets.append(torch.from_numpy(q))
    times["align_credit"] = time.perf_counter() - t0
    out = stats.result()
    add_timings(out, times, sum(len(r) for r in responses))
    return Scored(sequences, spans, old, targets, out, dict(stats.totals), times)


def _penalize_specials(q: np.ndarray, logps: np.ndarray, req: TeacherRequest,
                       special: np.ndarray, penalty: float | None) -> np.ndarray:
    """Targets that give special tokens sampled mid-response the advantage ``-penalty``, in
    place; returns where. Teacher-independent: no teacher writes such a token."""
    if penalty is None:
        return np.zeros(len(q), dtype=bool)
    hit = special[req.student_response]  # a copy (fancy indexing)
    if req.student_stop_index is not None:
        hit[req.student_stop_index] = False
    q[hit] = logps[hit] - penalty
    return hit


def add_timings(stats: dict[str, float], times: dict[str, float], tokens: int) -> None:
    """``time/<phase>_s`` and ``time/<phase>_tok_per_s`` (student tokens) for each phase."""
    for k, v in times.items():
        stats[f"{TIMING_PREFIX}{k}_s"] = v
        stats[f"{TIMING_PREFIX}{k}_tok_per_s"] = tokens / v if v > 0 else 0.0


def rollout_and_score(
    c: Components,
    examples: Sequence[Example],
    rollout: RolloutConfig,
    *,
    credit_rule: str = "proportional",
    max_batch_tokens: int = 8192,
) -> Scored:
    """One step's data: HF ``generate`` rollouts, then ``score_rollouts``."""
    t0 = time.perf_counter()
    exs, prompts, responses = sample_rollouts(c, examples, rollout)
    t_rollout = time.perf_counter() - t0
    scored = score_rollouts(c, exs, prompts, responses, credit_rule=credit_rule,
                            max_batch_tokens=max_batch_tokens, temperature=rollout.temperature,
                            special_penalty=rollout.special_token_penalty())
    scored.times["rollout"] = t_rollout
    add_timings(scored.stats, {"rollout": t_rollout}, int(scored.stats["response_tokens"]))
    return scored


# ------------------------------------------------------------------------------- update
def update(
    c: Components,
    s: Scored,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    loss_cfg: LossConfig,
    *,
    grad_clip: float = 1.0,
    epochs: int = 1,
    max_batch_tokens: int = 8192,
    temperature: float = 1.0,
) -> dict[str, float]:
    """PPO-clip over the step's rollouts, in token-budgeted micro-batches (gradient
    accumulation weighted so the result is the token mean over the whole step). ``temperature``
    is the rollout's: the ratio compares the same tempered distributions."""
    mask_all = [torch.ones(len(t), dtype=torch.bool) for t in s.targets]
    advs = [advantages(q, o, m, loss_cfg.adv_clamp) for q, o, m in
            zip(s.targets, s.old_logps, mask_all)]
    total_valid = sum(int(v.sum()) for _, v in advs)
    out = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    all_adv = torch.cat([a[v] for a, v in advs]) if total_valid else torch.zeros(1)
    out.update(adv_mean=float(all_adv.mean()), adv_std=float(all_adv.std()) if
               all_adv.numel() > 1 else 0.0, adv_abs_max=float(all_adv.abs().max()))
    if total_valid == 0:  # nothing to learn from; the schedule still counts the step
        scheduler.step()
        return out
    micro = token_budget_batches([len(x) for x in s.sequences], max_batch_tokens)
    # The student stays in eval mode: with dropout active the update would score the rollout
    # under a different policy than the one that produced old_logps (ratio != 1 on-policy).
    for _ in range(epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum = 0.0, 0.0
        for mb in micro:
            with c.student_autocast():
                logps = score_sequences(c.student, [s.sequences[i] for i in mb],
                                        [s.spans[i] for i in mb], pad_id=c.pad_id, grad=True,
                                        max_batch_tokens=max_batch_tokens,
                                        temperature=temperature)
            lp = torch.cat(logps).double()
            old = torch.cat([s.old_logps[i] for i in mb]).to(lp.device)
            adv = torch.cat([advs[i][0] for i in mb]).to(lp.device)
            valid = torch.cat([advs[i][1] for i in mb]).to(lp.device)
            n_mb = int(valid.sum())
            if n_mb == 0:
                continue
            loss, st = policy_loss(lp, old, adv, valid, loss_cfg)
            (loss * n_mb / total_valid).backward()
            loss_sum += float(loss.detach()) * n_mb
            clip_sum += st["clip_frac"] * n_mb
        grad_norm = torch.nn.utils.clip_grad_norm_(c.student.parameters(), grad_clip)
        optimizer.step()
        scheduler.step()
        out.update(loss=loss_sum / total_valid, clip_frac=clip_sum / total_valid,
                   grad_norm=float(grad_norm))
    return out


# ------------------------------------------------------------------------------- evaluation
def evaluate(
    c: Components,
    examples: Sequence[Example],
    rollout: RolloutConfig,
    *,
    seed: int,
    credit_rule: str = "proportional",
    max_batch_tokens: int = 8192,
    samples: int = 3,
    samples_per_prompt: int = 1,
) -> dict:
    """Reverse KL per byte (teacher vs student on fresh student samples, ``samples_per_prompt``
    each; comparable across tokenizers), stop rate, accuracy when the data has answers
    (``evals.answer_correct``), and the first ``samples`` prompts with their responses. Uses
    its own RNG stream so training randomness is untouched and every evaluation sees the same
    sampling noise."""
    from crossopd.evals import answer_correct

    k = samples_per_prompt
    each = dataclasses.replace(rollout, samples_per_prompt=k)
    # every device's generator: manual_seed below reseeds CUDA too
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        s = rollout_and_score(c, examples, each, credit_rule=credit_rule,
                              max_batch_tokens=max_batch_tokens)
    result = {key: v for key, v in s.stats.items() if not key.startswith(TIMING_PREFIX)}
    texts = [c.sv.concat_bytes(seq[a:b]).decode("utf-8", "replace")
             for seq, (a, b) in zip(s.sequences, s.spans)]
    answers = [e.answer for e in examples]
    if any(a is not None for a in answers):
        # per prompt, the mean over its k samples (None: no answer): before/after pair up
        result["correct"] = [
            None if a is None else
            float(np.mean([answer_correct(t, a) for t in texts[i * k:(i + 1) * k]]))
            for i, a in enumerate(answers)]
        hits = [x for x in result["correct"] if x is not None]
        result["accuracy"] = sum(hits) / len(hits)
    result["samples"] = [{"prompt": e.messages[-1]["content"], "response": texts[i * k],
                          "answer": e.answer} for i, e in enumerate(examples[:samples])]
    return result
