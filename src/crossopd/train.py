"""The OPD recipe: sample from the student, score with a teacher of another family, align, assign
credit, and take a PPO-clip step on the per-token reverse-KL advantage. Plain functions around one
config (``crossopd.config.TrainConfig``); read top to bottom."""

from __future__ import annotations

import json
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd import checkpoint as ckpt
from crossopd.bridge import (
    ChatFormat,
    TeacherContext,
    TeacherRequest,
    align_bridged,
    build_teacher_request,
)
from crossopd.config import TrainConfig
from crossopd.credit import assign_credit
from crossopd.data import Example, load_examples
from crossopd.loaders import load_hf_model, load_hf_tokenizer
from crossopd.loss import advantages, policy_loss
from crossopd.rollout.hf import sample
from crossopd.scoring import score_sequences
from crossopd.tokens import ByteVocab

TIMING_PREFIX = "time/"


@dataclass
class Components:
    student: Any
    student_fmt: ChatFormat
    sv: ByteVocab
    teacher: Any  # crossopd.teachers.Teacher
    teacher_fmt: ChatFormat
    tv: ByteVocab
    context: TeacherContext
    pad_id: int
    device: torch.device


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def build_components(cfg: TrainConfig) -> Components:
    device = resolve_device(cfg.device)
    dtype = getattr(torch, cfg.student.dtype)
    s_tok = load_hf_tokenizer(cfg.student.model)
    student_fmt = ChatFormat.from_tokenizer(s_tok, name=cfg.student.model)
    student = load_hf_model(cfg.student.model, dtype=dtype, device=str(device))
    t_cfg = cfg.teacher
    if t_cfg.model:
        from crossopd.teachers.hf import HFTeacher

        teacher = HFTeacher(load_hf_model(t_cfg.model, device=str(device)),
                            max_batch_tokens=cfg.max_batch_tokens)
        t_src = t_cfg.model
    else:
        from crossopd.teachers.http import HTTPTeacher

        teacher = HTTPTeacher(t_cfg.urls, model=t_cfg.served_name, timeout=t_cfg.timeout,
                              retries=t_cfg.retries, max_length=t_cfg.max_length)
        t_src = t_cfg.served_name or ""
    t_tok = load_hf_tokenizer(t_cfg.tokenizer or t_src)
    teacher_fmt = ChatFormat.from_tokenizer(t_tok, plain_template=t_cfg.plain_template,
                                            stop=t_cfg.stop, name=t_src)
    teacher_fmt.max_length = t_cfg.max_length or teacher.max_length or teacher_fmt.max_length
    pad = s_tok.pad_token_id if s_tok.pad_token_id is not None else s_tok.eos_token_id
    return Components(student, student_fmt, ByteVocab.from_pretrained(s_tok), teacher,
                      teacher_fmt, ByteVocab.from_pretrained(t_tok),
                      TeacherContext(system=t_cfg.system), int(pad or 0), device)


# ------------------------------------------------------------------------------- one OPD step
@dataclass
class Scored:
    """Rollouts of one step with everything the update needs."""

    sequences: list[list[int]]  # student prompt + response
    spans: list[tuple[int, int]]  # response positions in ``sequences``
    old_logps: list[torch.Tensor]
    targets: list[torch.Tensor]  # credit q per response token, NaN where no signal
    stats: dict[str, float]


def rollout_and_score(c: Components, examples: list[Example], cfg: TrainConfig,
                      samples_per_prompt: int) -> Scored:
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    prompts = [c.student_fmt.prompt_ids(e.messages) for e in examples]
    prompts = [p for p in prompts for _ in range(samples_per_prompt)]
    exs = [e for e in examples for _ in range(samples_per_prompt)]
    responses = sample(c.student, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                       temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                       stop_ids=c.student_fmt.stop_ids, pad_id=c.pad_id)
    times["rollout"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    reqs: list[TeacherRequest] = [
        build_teacher_request(e.messages, r, c.student_fmt, c.teacher_fmt, c.sv, c.tv,
                              context=c.context, reference=e.reference)
        for e, r in zip(exs, responses)
    ]
    live = [i for i, q in enumerate(reqs) if not q.overflow and q.stop_end > q.response_start]
    t_logps = c.teacher.score([reqs[i].teacher_ids for i in live],
                              [reqs[i].scored_span for i in live]) if live else []
    teacher_lp = dict(zip(live, t_logps))
    times["teacher"] = time.perf_counter() - t0

    sequences = [list(p) + r.tolist() for p, r in zip(prompts, responses)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
    t0 = time.perf_counter()
    with torch.no_grad():
        old = score_sequences(c.student, sequences, spans, max_batch_tokens=cfg.max_batch_tokens,
                              pad_id=c.pad_id)
    old = [o.detach().double().cpu() for o in old]
    times["student_logps"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    targets, agg = [], _Agg()
    for i, (req, lp) in enumerate(zip(reqs, old)):
        a = align_bridged(req, c.sv, c.tv)
        if i in teacher_lp:
            q = assign_credit(a, teacher_lp[i], lp.numpy(), rule=cfg.credit_rule)
        else:
            q = np.full(len(lp), np.nan)
        targets.append(torch.from_numpy(np.asarray(q, dtype=np.float64)))
        agg.add(a, req, lp.numpy(), q)
    times["align_credit"] = time.perf_counter() - t0
    stats = agg.result()
    n_tok = sum(len(r) for r in responses)
    for k, v in times.items():
        stats[f"{TIMING_PREFIX}{k}_s"] = v
        stats[f"{TIMING_PREFIX}{k}_tok_per_s"] = n_tok / v if v > 0 else 0.0
    return Scored(sequences, spans, old, targets, stats)


class _Agg:
    """Alignment and signal statistics over the rollouts of one step (or one evaluation)."""

    def __init__(self) -> None:
        self.c: dict[str, float] = dict.fromkeys(
            ("sequences", "tokens", "bytes", "aligned_bytes", "chunks", "one_to_one",
             "unaligned_tokens", "masked_special", "stop_chunks", "stopped", "overflowed",
             "signal_tokens", "kl_sum"), 0.0)

    def add(self, a, req: TeacherRequest, logps: np.ndarray, q: np.ndarray) -> None:
        c, counts = self.c, a.counts
        c["sequences"] += 1
        c["tokens"] += len(logps)
        c["bytes"] += counts["student_bytes"]
        c["aligned_bytes"] += counts["aligned_student_bytes"] if not req.overflow else 0
        c["chunks"] += a.num_chunks
        c["one_to_one"] += counts["one_to_one_chunks"]
        c["unaligned_tokens"] += counts["unaligned_student_tokens"]
        stop = req.student_stop_index is not None and not req.overflow
        c["masked_special"] += counts["special_student_tokens"] - int(stop)
        c["stop_chunks"] += int(stop)
        c["stopped"] += int(req.student_stop_index is not None)
        c["overflowed"] += int(req.overflow)
        ok = ~np.isnan(q)
        c["signal_tokens"] += int(ok.sum())
        c["kl_sum"] += float((logps[ok] - q[ok]).sum())

    def result(self) -> dict[str, float]:
        c = self.c
        return {
            "kl_per_token": c["kl_sum"] / max(c["signal_tokens"], 1),
            "kl_per_byte": c["kl_sum"] / max(c["aligned_bytes"], 1),
            "coverage": c["aligned_bytes"] / max(c["bytes"], 1),
            "one_to_one_share": c["one_to_one"] / max(c["chunks"], 1),
            "unaligned_tokens": c["unaligned_tokens"],
            "masked_special_tokens": c["masked_special"],
            "stop_chunks": c["stop_chunks"],
            "stop_rate": c["stopped"] / max(c["sequences"], 1),
            "overflowed_sequences": c["overflowed"],
            "response_tokens": c["tokens"],
            "signal_tokens": c["signal_tokens"],
        }


def update(c: Components, s: Scored, optimizer, scheduler, cfg: TrainConfig) -> dict[str, float]:
    """PPO-clip over the step's rollouts, in token-budgeted micro-batches (gradient
    accumulation weighted so the result is the token mean over the whole step)."""
    mask_all = [torch.ones(len(t), dtype=torch.bool) for t in s.targets]
    advs = [advantages(q, o, m, cfg.loss.adv_clamp) for q, o, m in
            zip(s.targets, s.old_logps, mask_all)]
    total_valid = sum(int(v.sum()) for _, v in advs)
    out = {"loss": 0.0, "clip_frac": 0.0, "grad_norm": 0.0}
    all_adv = torch.cat([a[v] for a, v in advs]) if total_valid else torch.zeros(1)
    out.update(adv_mean=float(all_adv.mean()), adv_std=float(all_adv.std()) if
               all_adv.numel() > 1 else 0.0, adv_abs_max=float(all_adv.abs().max()))
    if total_valid == 0:
        return out
    order = sorted(range(len(s.sequences)), key=lambda i: len(s.sequences[i]))
    micro, cur, width = [], [], 0
    for i in order:
        width = max(width, len(s.sequences[i]))
        if cur and width * (len(cur) + 1) > cfg.max_batch_tokens:
            micro.append(cur)
            cur, width = [], len(s.sequences[i])
        cur.append(i)
    micro.append(cur)
    # The student stays in eval mode: with dropout active the update would score the rollout
    # under a different policy than the one that produced old_logps (ratio != 1 on-policy).
    for _ in range(cfg.update_epochs):
        optimizer.zero_grad(set_to_none=True)
        loss_sum, clip_sum = 0.0, 0.0
        for mb in micro:
            logps = score_sequences(c.student, [s.sequences[i] for i in mb],
                                    [s.spans[i] for i in mb], pad_id=c.pad_id, grad=True,
                                    max_batch_tokens=cfg.max_batch_tokens)
            lp = torch.cat(logps).double()
            old = torch.cat([s.old_logps[i] for i in mb]).to(lp.device)
            adv = torch.cat([advs[i][0] for i in mb]).to(lp.device)
            valid = torch.cat([advs[i][1] for i in mb]).to(lp.device)
            n_mb = int(valid.sum())
            if n_mb == 0:
                continue
            loss, st = policy_loss(lp, old, adv, valid, cfg.loss)
            (loss * n_mb / total_valid).backward()
            loss_sum += float(loss.detach()) * n_mb
            clip_sum += st["clip_frac"] * n_mb
        grad_norm = torch.nn.utils.clip_grad_norm_(c.student.parameters(), cfg.optim.grad_clip)
        optimizer.step()
        scheduler.step()
        out.update(loss=loss_sum / total_valid, clip_frac=clip_sum / total_valid,
                   grad_norm=float(grad_norm))
    return out


# ------------------------------------------------------------------------------- evaluation
def evaluate(c: Components, examples: list[Example], cfg: TrainConfig, seed: int) -> dict:
    """Reverse KL per byte (teacher vs student on fresh student samples; comparable across
    tokenizers), stop rate, and accuracy when the data has answers. Uses its own RNG stream so
    training randomness is untouched and every evaluation sees the same sampling noise."""
    from crossopd.evals import answer_correct

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        s = rollout_and_score(c, examples, cfg, samples_per_prompt=1)
    result = {k: v for k, v in s.stats.items() if not k.startswith(TIMING_PREFIX)}
    answers = [e.answer for e in examples]
    if any(a is not None for a in answers):
        texts = [c.sv.concat_bytes(seq[a:b]).decode("utf-8", "replace")
                 for seq, (a, b) in zip(s.sequences, s.spans)]
        scored = [(t, a) for t, a in zip(texts, answers) if a is not None]
        result["accuracy"] = sum(answer_correct(t, a) for t, a in scored) / len(scored)
    return result


# ------------------------------------------------------------------------------- the loop
def _batch(examples: list[Example], step: int, batch_size: int, seed: int) -> list[Example]:
    """The examples of ``step``: epochs of a seeded permutation; a pure function of the step,
    so a resumed run reads exactly the data it would have read."""
    n = len(examples)
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(examples[int(np.random.default_rng(seed + epoch).permutation(n)[k])])
    return out


def _lr_lambda(cfg: TrainConfig):
    return lambda s: min(1.0, (s + 1) / cfg.optim.warmup_steps) if cfg.optim.warmup_steps else 1.0


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          components: Components | None = None) -> dict:
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    examples = load_examples(cfg.data.path, cfg.data.answer_column, cfg.teacher.reference_column)
    if cfg.data.heldout_path:
        heldout = load_examples(cfg.data.heldout_path, cfg.data.answer_column,
                                cfg.teacher.reference_column)
    else:
        if len(examples) <= cfg.data.heldout_size:
            raise ValueError(f"{cfg.data.path} has {len(examples)} rows; need more than "
                             f"data.heldout_size={cfg.data.heldout_size} to hold some out")
        examples, heldout = examples[: -cfg.data.heldout_size], examples[-cfg.data.heldout_size:]
    heldout = heldout[: cfg.eval_prompts]

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    c = components or build_components(cfg)
    optimizer = torch.optim.AdamW(c.student.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_lambda(cfg))
    metrics_path, eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"
    start = 0
    if resume:
        start = ckpt.restore_latest(out_dir, c.student, optimizer, scheduler)
        for path in (metrics_path, eval_path):
            ckpt.truncate_jsonl(path, start)
    else:
        for path in (metrics_path, eval_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)

    def run_eval(step: int) -> dict:
        r = evaluate(c, heldout, cfg, seed=cfg.seed + 10_007)
        ckpt.append_jsonl(eval_path, {"step": step, **r})
        return r

    if start == 0 and cfg.eval_prompts:
        run_eval(0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="opd", unit="step")
    for step in bar:
        scored = rollout_and_score(c, _batch(examples, step, cfg.batch_size, cfg.seed), cfg,
                                   cfg.rollout.samples_per_prompt)
        t0 = time.perf_counter()
        upd = update(c, scored, optimizer, scheduler, cfg)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, **upd, **scored.stats, "lr": scheduler.get_last_lr()[0],
               f"{TIMING_PREFIX}update_s": dt,
               f"{TIMING_PREFIX}update_tok_per_s": scored.stats["response_tokens"] / dt}
        ckpt.append_jsonl(metrics_path, row)
        bar.set_postfix(kl=f"{row['kl_per_token']:.3f}", cov=f"{row['coverage']:.3f}",
                        loss=f"{row['loss']:.3f}")
        done = step + 1
        if cfg.eval_prompts and cfg.eval_every and done % cfg.eval_every == 0 and \
                done != cfg.steps:
            run_eval(done)
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            ckpt.save(out_dir, done, c.student, optimizer, scheduler, cfg.keep_checkpoints)
    final_eval = run_eval(cfg.steps) if cfg.eval_prompts and start < cfg.steps else None
    from crossopd.report import write_report

    report = write_report(out_dir)
    evals = ckpt.read_jsonl(eval_path)
    return {
        "steps": cfg.steps,
        "heldout_kl_before": evals[0]["kl_per_byte"] if evals else None,
        "heldout_kl_after": evals[-1]["kl_per_byte"] if evals else None,
        "final_eval": final_eval,
        "coverage": float(np.mean([m["coverage"] for m in ckpt.read_jsonl(metrics_path)]))
        if metrics_path.exists() else None,
        "report": str(report),
        "output_dir": str(out_dir),
    }
