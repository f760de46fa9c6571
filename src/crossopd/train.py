"""The native OPD recipe: build the student and the teacher from one ``TrainConfig``, then loop
over the step library (``crossopd.opd``) with checkpoints, held-out evaluation and a report.
A plain loop; read top to bottom."""

from __future__ import annotations

import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd import checkpoint as ckpt
from crossopd import rundir
from crossopd.build import build_components, load_splits
from crossopd.config import TrainConfig
from crossopd.evals import heldout_summary
from crossopd.files import append_jsonl, read_jsonl, truncate_jsonl
from crossopd.opd import TIMING_PREFIX, Components, evaluate, rollout_and_score, update
from crossopd.prompts import Example
from crossopd.teachers import TeacherError


def step_examples(examples: list[Example], step: int, batch_size: int,
                  seed: int) -> list[Example]:
    """The examples of ``step``: epochs of a seeded permutation; a pure function of the step,
    so a resumed run reads exactly the data it would have read."""
    n = len(examples)
    out = []
    for pos in range(step * batch_size, (step + 1) * batch_size):
        epoch, k = divmod(pos, n)
        out.append(examples[int(np.random.default_rng(seed + epoch).permutation(n)[k])])
    return out


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          components: Components | None = None, overwrite: bool = False) -> dict:
    """``overwrite``: start over in an ``output_dir`` that holds a run (else refused)."""
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    examples, heldout = load_splits(cfg)
    rundir.prepare(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if components is None:
        teacher = cfg.teacher.model or ", ".join(cfg.teacher.urls)
        status(f"loading student {cfg.student.model} and teacher {teacher} ...")
    c = components or build_components(cfg)
    optimizer = torch.optim.AdamW(c.student.parameters(), lr=cfg.optim.lr,
                                  weight_decay=cfg.optim.weight_decay)
    warmup = cfg.optim.warmup_steps
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)
    metrics_path, eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"
    start = 0
    if resume:
        start = ckpt.restore_latest(out_dir, c.student, optimizer, scheduler)
        for path in (metrics_path, eval_path):
            truncate_jsonl(path, start)
    step_args = {"credit_rule": cfg.credit_rule, "max_batch_tokens": cfg.max_batch_tokens}

    def run_eval(step: int) -> dict:
        status(f"evaluating at step {step} on {len(heldout)} held-out prompts ...")
        r = evaluate(c, heldout, cfg.rollout, seed=cfg.seed + 10_007,
                     samples_per_prompt=cfg.eval_samples, **step_args)
        check_overflow({"sequences": len(heldout) * cfg.eval_samples,
                        "overflowed": r["overflowed_sequences"]},
                       f"evaluation at step {step}", cfg, bar_write)
        append_jsonl(eval_path, {"step": step, **r})
        return r

    def bar_write(msg: str) -> None:
        tqdm.write(msg, file=sys.stderr)

    if start == 0 and cfg.eval_prompts and not read_jsonl(eval_path):
        run_eval(0)  # (a run stopped at step 0 by its teacher has this row already)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="opd", unit="step")
    for step in bar:
        # the last completed step and the RNG state right after it: what a checkpoint must
        # hold if the teacher goes away in the middle of this step
        completed, rng = step, ckpt.rng_state()
        try:
            batch = step_examples(examples, step, cfg.batch_size, cfg.seed)
            scored = rollout_and_score(c, batch, cfg.rollout, **step_args)
            t0 = time.perf_counter()
            upd = update(c, scored, optimizer, scheduler, cfg.loss,
                         grad_clip=cfg.optim.grad_clip, epochs=cfg.update_epochs,
                         max_batch_tokens=cfg.max_batch_tokens,
                         temperature=cfg.rollout.temperature)
            dt = time.perf_counter() - t0
            completed, rng = step + 1, ckpt.rng_state()
            row = {"step": step + 1, **upd, **scored.stats, "lr": scheduler.get_last_lr()[0],
                   f"{TIMING_PREFIX}update_s": dt,
                   f"{TIMING_PREFIX}update_tok_per_s": scored.stats["response_tokens"] / dt}
            append_jsonl(metrics_path, row)
            check_overflow(scored.totals, f"step {step + 1}", cfg, bar_write)
            bar.set_postfix(kl=f"{row['kl_per_token']:.3f}", cov=f"{row['coverage']:.3f}",
                            loss=f"{row['loss']:.3f}")
            if not progress:  # one line per step for logs (stderr: --json keeps stdout clean)
                print(step_line(row, cfg.steps), file=sys.stderr, flush=True)
            done = step + 1
            if cfg.eval_prompts and cfg.eval_every and done % cfg.eval_every == 0 and \
                    done != cfg.steps:
                run_eval(done)
        except TeacherError as e:
            if not (ckpt.step_dir(out_dir, completed)).exists():
                ckpt.save(out_dir, completed, c.student, optimizer, scheduler,
                          cfg.keep_checkpoints, tokenizer=c.student_tokenizer, rng=rng)
            raise TeacherError(f"{e} -- stopped; steps 1..{completed} are saved in "
                               f"{ckpt.step_dir(out_dir, completed)}: when the teacher is back, "
                               "run the same command with --resume") from e
        if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or done == cfg.steps:
            ckpt.save(out_dir, done, c.student, optimizer, scheduler, cfg.keep_checkpoints,
                      tokenizer=c.student_tokenizer)
    final_eval = run_eval(cfg.steps) if cfg.eval_prompts and start < cfg.steps else None
    # generate() with the saved student then stops where rollouts stopped
    c.student.generation_config.eos_token_id = sorted(c.student_fmt.stop_ids)
    final = ckpt.save_final(out_dir, c.student, c.student_tokenizer)
    from crossopd.report import write_report

    report = write_report(out_dir)
    evals, rows = read_jsonl(eval_path), read_jsonl(metrics_path)
    return {
        "steps": cfg.steps,
        **heldout_summary(evals),
        "final_eval": final_eval,
        "coverage": float(np.mean([m["coverage"] for m in rows])) if rows else None,
        "overflowed_sequences": sum(int(m["overflowed_sequences"]) for m in rows),
        "report": str(report),
        "output_dir": str(out_dir),
        "final": str(final),
    }


def status(message: str) -> None:
    """A status line for the slow parts without a bar (model loading, evaluation)."""
    print(f"crossopd: {message}", file=sys.stderr, flush=True)


def check_overflow(totals: dict, where: str, cfg: TrainConfig, write: Any) -> None:
    """Say loudly when sequences overflowed the teacher's context (they get no signal); stop
    when all did, since nothing can be learned or measured then."""
    n, over = int(totals["sequences"]), int(totals["overflowed"])
    if not over:
        return
    limit = cfg.teacher.max_length or "the model's"
    msg = (f"{where}: {over} of {n} sequences overflowed the teacher's context ({limit} "
           "tokens) and got no teacher signal")
    if over == n:
        raise ValueError(f"{msg}. Raise teacher.max_length (up to the teacher's context), "
                         "shorten the prompts or lower rollout.max_new_tokens")
    write(f"warning: {msg}")


def step_line(row: dict, steps: int) -> str:
    return (f"step {row['step']}/{steps}: kl/token {row['kl_per_token']:.4f}, coverage "
            f"{row['coverage']:.4f}, loss {row['loss']:.4f}, stop rate {row['stop_rate']:.3f}")


def render_result(result: dict) -> str:
    """What ``crossopd train`` and ``crossopd demo`` print at the end of a run."""
    lines = []
    if result["heldout_kl_before"] is not None:
        lines.append(f"{'held-out':<26} {'before':>8} {'after':>8}")
        rows = [("reverse KL per byte", "heldout_kl"), ("stop rate", "heldout_stop_rate")]
        if result.get("metric"):
            rows.insert(1, (result["metric"], "heldout_metric"))
        for label, key in rows:
            line = f"{label:<26} {result[key + '_before']:>8.4f} {result[key + '_after']:>8.4f}"
            if key == "heldout_metric" and "heldout_metric_change_se" in result:
                change = result["heldout_metric_after"] - result["heldout_metric_before"]
                se = result["heldout_metric_change_se"]
                line += f"   change {change:+.3f} (paired SE {se:.3f})"
            lines.append(line)
    if result.get("final_eval"):
        e = result["final_eval"]
        lines.append(f"alignment: coverage {e['coverage']:.4f}, 1:1 chunk share "
                     f"{e['one_to_one_share']:.3f}, stop rate {e['stop_rate']:.3f}"
                     + (f", accuracy {e['accuracy']:.3f}" if "accuracy" in e else ""))
    if result.get("overflowed_sequences"):
        lines.append(f"warning: {result['overflowed_sequences']} training sequences overflowed "
                     "the teacher's context and got no signal (metrics.jsonl: "
                     "overflowed_sequences)")
    if result.get("final"):
        lines.append(f"student: {result['final']} (a Hugging Face model directory)")
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)
