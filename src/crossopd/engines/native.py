"""Engine ``native``: crossopd's own single-process loop, the reference. Read top to bottom:
per step, the step's examples, HF ``generate`` rollouts, scoring, the update, a metrics row,
a checkpoint when due."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.run import checkpoint as ckpt
from crossopd.run.config import step_settings
from crossopd.run.lifecycle import AfterStep, Run
from crossopd.step.data import Example
from crossopd.step.rollout import rollout_and_score
from crossopd.step.stats import TIMING_PREFIX, timed
from crossopd.step.update import update


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


def warmup_schedule(optimizer: torch.optim.Optimizer, warmup: int) -> Any:
    """Linear warm-up over ``warmup`` optimizer steps, then constant (TRL's
    ``constant_with_warmup``)."""
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) if warmup else 1.0)


class NativeEngine:
    def start(self, run: Run, resume: bool) -> int:
        cfg = run.cfg
        self.run = run
        self.optimizer = torch.optim.AdamW(run.student.model.parameters(), lr=cfg.optim.lr,
                                           weight_decay=cfg.optim.weight_decay)
        self.scheduler = warmup_schedule(self.optimizer, cfg.optim.warmup_steps)
        self.completed = 0
        if resume:
            self.completed = ckpt.restore_latest(run.out_dir, run.student.model,
                                                 self.optimizer, self.scheduler)
        self.rng = ckpt.rng_state()
        return self.completed

    def train(self, run: Run, start: int, after_step: AfterStep) -> None:
        from tqdm.auto import tqdm

        cfg, student = run.cfg, run.student
        settings = step_settings(cfg)
        bar = tqdm(range(start, cfg.steps), initial=start, total=cfg.steps,
                   disable=not run.progress, desc="opd", unit="step")
        for step in bar:
            t0 = time.perf_counter()
            # the last completed step and the RNG state right after it: what a checkpoint must
            # hold if the teacher goes away in the middle of this step
            self.completed, self.rng = step, ckpt.rng_state()
            batch = step_examples(run.examples, step, cfg.batch_size, cfg.seed)
            scored = rollout_and_score(student, run.teachers, batch, settings,
                                       toolbox=run.toolbox)
            times: dict[str, float] = {}
            with timed(times, "update"):
                upd = update(student, scored, self.optimizer, self.scheduler, settings,
                             grad_clip=cfg.optim.grad_clip, epochs=cfg.update_epochs)
            done = step + 1
            self.completed, self.rng = done, ckpt.rng_state()
            dt = times["update"]
            row = {"step": done, **upd, **scored.stats, "lr": self.scheduler.get_last_lr()[0],
                   "world_size": 1, f"{TIMING_PREFIX}update_s": dt,
                   f"{TIMING_PREFIX}update_tok_per_s": scored.stats["response_tokens"] / dt,
                   f"{TIMING_PREFIX}step_s": time.perf_counter() - t0}
            bar.set_postfix(kl=f"{row['kl_per_token']:.3f}", cov=f"{row['coverage']:.3f}",
                            loss=f"{row['loss']:.3f}")
            after_step(done, row, scored.totals)
            if (cfg.checkpoint_every and done % cfg.checkpoint_every == 0) or \
                    done == cfg.steps:
                self._save(done)

    def _save(self, step: int, rng: dict | None = None) -> Path:
        cfg = self.run.cfg
        return ckpt.save(self.run.out_dir, step, self.run.student.model, self.optimizer,
                         self.scheduler, cfg.keep_checkpoints,
                         tokenizer=self.run.student.tokenizer, rng=rng)

    def save_progress(self) -> tuple[int, Path]:
        path = ckpt.step_dir(self.run.out_dir, self.completed)
        if not path.exists():
            path = self._save(self.completed, rng=self.rng)
        return self.completed, path

    def student_model(self) -> Any:
        return self.run.student.model

    def save_final(self, path: Path) -> None:
        if self.run.main:
            ckpt.save_final(path.parent, self.run.student.model, self.run.student.tokenizer)

    def close(self) -> None:
        """Nothing runs beside the native engine's training loop."""
