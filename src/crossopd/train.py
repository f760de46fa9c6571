"""The native OPD recipe: build the student and the teacher from one ``TrainConfig``, then loop
over the step library (``crossopd.opd``) with checkpoints, held-out evaluation and a report.
A plain loop; read top to bottom."""

from __future__ import annotations

import json
import random
import shutil
import time
from pathlib import Path

import numpy as np
import torch

from crossopd import checkpoint as ckpt
from crossopd.build import build_components, load_splits
from crossopd.config import TrainConfig
from crossopd.files import append_jsonl, read_jsonl, truncate_jsonl
from crossopd.opd import TIMING_PREFIX, Components, evaluate, rollout_and_score, update
from crossopd.prompts import Example


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
          components: Components | None = None) -> dict:
    from tqdm.auto import tqdm

    out_dir = Path(cfg.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))
    examples, heldout = load_splits(cfg)

    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
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
    else:
        for path in (metrics_path, eval_path):
            path.unlink(missing_ok=True)
        shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    step_args = {"credit_rule": cfg.credit_rule, "max_batch_tokens": cfg.max_batch_tokens}

    def run_eval(step: int) -> dict:
        r = evaluate(c, heldout, cfg.rollout, seed=cfg.seed + 10_007, **step_args)
        append_jsonl(eval_path, {"step": step, **r})
        return r

    if start == 0 and cfg.eval_prompts:
        run_eval(0)
    bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps, disable=not progress,
               desc="opd", unit="step")
    for step in bar:
        batch = step_examples(examples, step, cfg.batch_size, cfg.seed)
        scored = rollout_and_score(c, batch, cfg.rollout, **step_args)
        t0 = time.perf_counter()
        upd = update(c, scored, optimizer, scheduler, cfg.loss, grad_clip=cfg.optim.grad_clip,
                     epochs=cfg.update_epochs, max_batch_tokens=cfg.max_batch_tokens,
                     temperature=cfg.rollout.temperature)
        dt = time.perf_counter() - t0
        row = {"step": step + 1, **upd, **scored.stats, "lr": scheduler.get_last_lr()[0],
               f"{TIMING_PREFIX}update_s": dt,
               f"{TIMING_PREFIX}update_tok_per_s": scored.stats["response_tokens"] / dt}
        append_jsonl(metrics_path, row)
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
    evals = read_jsonl(eval_path)
    return {
        "steps": cfg.steps,
        "heldout_kl_before": evals[0]["kl_per_byte"] if evals else None,
        "heldout_kl_after": evals[-1]["kl_per_byte"] if evals else None,
        "final_eval": final_eval,
        "coverage": float(np.mean([m["coverage"] for m in read_jsonl(metrics_path)]))
        if metrics_path.exists() else None,
        "report": str(report),
        "output_dir": str(out_dir),
    }


def render_result(result: dict) -> str:
    """What ``crossopd train`` and ``crossopd demo`` print at the end of a run."""
    lines = []
    before, after = result["heldout_kl_before"], result["heldout_kl_after"]
    if before is not None:
        lines.append(f"held-out reverse KL per byte: {before:.4f} -> {after:.4f}")
    if result.get("final_eval"):
        e = result["final_eval"]
        lines.append(f"alignment: coverage {e['coverage']:.4f}, 1:1 chunk share "
                     f"{e['one_to_one_share']:.3f}, stop rate {e['stop_rate']:.3f}"
                     + (f", accuracy {e['accuracy']:.3f}" if "accuracy" in e else ""))
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)
