"""The run, written once for every engine: the run directory (refused or resumed), the sides,
held-out evaluation before, during and after, metrics rows with their overflow check, the
teacher-patience checkpoint, ``final/``, the report and the result.

An engine is a small adapter (``Engine``): it builds its optimizer or trainer on the student,
restores its own checkpoints, runs the steps and calls ``after_step`` once per OPD step. A new
engine is one module with such a class plus one line in ``crossopd.engines.ENGINES``.
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch

from crossopd.evaluation.heldout import evaluate
from crossopd.evaluation.summary import heldout_summary
from crossopd.files import append_jsonl, read_jsonl, truncate_jsonl
from crossopd.run import rundir
from crossopd.run.config import TrainConfig, step_settings
from crossopd.run.load import build_sides, check_tool_sides, load_splits, load_toolbox
from crossopd.run.registry import engine_for
from crossopd.run.trackers import Trackers, tracker_names
from crossopd.step.data import Example
from crossopd.step.multiturn import Toolbox
from crossopd.step.sides import StudentSide, TeacherSide
from crossopd.teachers import TeacherError, status_line

# Held-out sampling draws from its own stream, offset from the run seed so it never replays a
# training rollout; every evaluation of every engine (and ``crossopd eval``) uses it.
EVAL_SEED_OFFSET = 10_007

AfterStep = Callable[[int, dict, dict], None]  # (completed steps, metrics row, StepStats sums)


@dataclass(frozen=True)
class Run:
    """What a run trains on and with: an engine reads it, never edits it."""

    cfg: TrainConfig
    student: StudentSide
    teachers: dict[str, TeacherSide]
    examples: list[Example]
    heldout: list[Example]
    progress: bool = True
    main: bool = True  # this process writes the run directory (rank 0)
    toolbox: Toolbox | None = None  # tools the rollouts may call (engine native)

    @property
    def out_dir(self) -> Path:
        return Path(self.cfg.output_dir)


class Engine(Protocol):
    """An engine's part of a run. ``steps`` are OPD steps: one rollout batch each, trained on
    for ``update_epochs`` optimizer steps."""

    def start(self, run: Run, resume: bool) -> int:
        """Build the optimizer or trainer on ``run.student``; with ``resume``, restore the newest
        checkpoint. Returns the number of completed steps."""

    def train(self, run: Run, start: int, after_step: AfterStep) -> None:
        """Steps ``start + 1 .. run.cfg.steps``; ``after_step`` after each one, in every process
        (it evaluates when due, and evaluation may need every process)."""

    def save_progress(self) -> tuple[int, Path]:
        """A checkpoint of the last completed step (written now if missing) when the teacher
        stops the run: (step, its path)."""

    def student_model(self) -> Any:
        """The trained student as a plain model (unwrapped from any distributed wrapper)."""

    def save_final(self, path: Path) -> None:
        """A complete Hugging Face model directory at ``path``. Called in every process (a
        sharded engine gathers the weights from all of them); the main process writes."""

    def close(self) -> None:
        """Stop what the engine started beside the trainer (a colocated vLLM engine), while
        the process group it was built on still exists."""


def heldout_eval(cfg: TrainConfig, student: StudentSide, teachers: dict[str, TeacherSide],
                 heldout: list[Example], samples: int = 3) -> dict:
    """The held-out evaluation every run and ``crossopd eval`` report (with the run's tools:
    graded on each rollout's last assistant turn)."""
    return evaluate(student, teachers, heldout, step_settings(cfg),
                    seed=cfg.seed + EVAL_SEED_OFFSET, samples=samples,
                    samples_per_prompt=cfg.eval_samples, toolbox=load_toolbox(cfg))


def check_overflow(sequences: int, overflowed: int, where: str, cfg: TrainConfig) -> None:
    """Say loudly when sequences overflowed the teacher's context (they get no signal); stop
    when all did, since nothing can be learned or measured then."""
    if not overflowed:
        return
    # under teachers: each teacher has its own context
    model_s = "the model's"
    limit = ", ".join(f"{n}: {t.max_length or model_s}" for n, t in cfg.teachers.items()) \
        if cfg.teachers else (cfg.teacher.max_length or model_s)
    key = "teachers.NAME.max_length" if cfg.teachers else "teacher.max_length"
    msg = (f"{where}: {overflowed} of {sequences} sequences overflowed the teacher's context "
           f"({limit} tokens) and got no teacher signal")
    if overflowed == sequences:
        raise ValueError(f"{msg}. Raise {key} (up to the teacher's context), "
                         "shorten the prompts or lower rollout.max_new_tokens")
    status_line(f"warning: {msg}")


def step_line(row: dict, steps: int) -> str:
    return (f"step {row['step']}/{steps}: kl/token {row['kl_per_token']:.4f}, coverage "
            f"{row['coverage']:.4f}, loss {row['loss']:.4f}, stop rate {row['stop_rate']:.3f}")


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def train_run(cfg: TrainConfig, resume: bool = False, progress: bool = True,
              overwrite: bool = False,
              sides: tuple[StudentSide, dict[str, TeacherSide]] | None = None,
              engine: Engine | None = None) -> dict:
    """A whole run of ``cfg.engine`` (or ``engine``): what ``crossopd train`` runs. ``sides``:
    an already built student and teachers (tests, notebooks); else built from ``cfg``."""
    out_dir = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", 0)) == 0
    engine = engine or engine_for(cfg.engine)
    examples, heldout = load_splits(cfg)
    if main:
        rundir.prepare(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite)
    seed_everything(cfg.seed)
    if sides is None:
        named = [f"{t.model or ', '.join(t.urls)}" + (f" ({n})" if cfg.teachers else "")
                 for n, t in cfg.teacher_sections().items()]
        status_line(f"loading student {cfg.student.model} and teacher{'s' * bool(cfg.teachers)} "
               f"{'; '.join(named)} ...")
        # with LoRA the base is frozen and loads in student.dtype; trained weights stay float32
        dtype = getattr(torch, cfg.student.dtype) if cfg.student.lora else None
        sides = build_sides(cfg, student_dtype=dtype)
    student, teachers = sides
    # generate() with the student, during training (TRL samples with the generation config)
    # and after it (final/), stops where rollouts stop: at the format's end-of-turn ids
    student.model.generation_config.eos_token_id = sorted(student.fmt.stop_ids)
    toolbox = load_toolbox(cfg)
    if toolbox is not None:
        check_tool_sides(student, teachers)
    run = Run(cfg, student, teachers, examples, heldout, progress=progress, main=main,
              toolbox=toolbox)
    trackers = Trackers(tracker_names(cfg.report_to) if main else [], out_dir, cfg.to_dict())
    metrics_path, eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"

    start = engine.start(run, resume)
    if resume and main:
        for path in (metrics_path, eval_path):
            truncate_jsonl(path, start)

    def run_eval(step: int) -> dict:
        status_line(f"evaluating at step {step} on {len(heldout)} held-out prompts ...")
        model = engine.student_model()
        was_training = model.training
        model.eval()
        r = heldout_eval(cfg, replace(student, model=model), teachers, heldout)
        if cfg.eval_benchmark:
            from crossopd.evaluation.benchmark_runs import benchmark_metrics

            status_line(f"evaluating at step {step} on benchmark {cfg.eval_benchmark} ...")
            r.update(benchmark_metrics(
                cfg.eval_benchmark, cfg.eval_benchmark_limit, model, student.tokenizer,
                student.fmt, cfg.seed + EVAL_SEED_OFFSET,
                out_dir / "benchmark" / f"step_{step:07d}.jsonl" if main else None,
                progress=progress))
        model.train(was_training)
        check_overflow(len(heldout) * cfg.eval_samples, int(r["overflowed_sequences"]),
                       f"evaluation at step {step}", cfg)
        if main:
            append_jsonl(eval_path, {"step": step, **r})
            trackers.log(r, step, "eval/")
        return r

    def after_step(done: int, row: dict, totals: dict) -> None:
        if main:
            append_jsonl(metrics_path, row)
            trackers.log(row, done, "opd/")
            if not progress:  # one line per step for logs (stderr: --json keeps stdout clean)
                print(step_line(row, cfg.steps), file=sys.stderr, flush=True)
        check_overflow(int(totals["sequences"]), int(totals["overflowed"]), f"step {done}", cfg)
        if cfg.eval_prompts and cfg.eval_every and done % cfg.eval_every == 0 and \
                done != cfg.steps:
            run_eval(done)

    # (a run stopped at step 0 by its teacher has this row already; every process reads the
    # same file, so all of them evaluate or none does)
    if start == 0 and cfg.eval_prompts and not read_jsonl(eval_path):
        run_eval(0)
    try:
        engine.train(run, start, after_step)
    except TeacherError as e:
        # every process gets here together (the engines share a teacher failure before their
        # next collective), so the checkpoint is written by all of them
        step, path = engine.save_progress()
        trackers.close()
        engine.close()
        release_processes()
        raise TeacherError(f"{e} -- stopped; steps 1..{step} are saved in {path}: when the "
                           "teacher is back, run the same command with --resume") from e
    final_eval = run_eval(cfg.steps) if cfg.eval_prompts and start < cfg.steps else None
    engine.save_final(out_dir / "final")  # every process: a sharded engine gathers first
    report = None
    if main:
        from crossopd.run.report import write_report

        report = write_report(out_dir)
    trackers.close()  # TensorBoard flushes every row; an interrupted W&B run ends at exit
    engine.close()
    release_processes()
    return run_result(cfg, engine_name=cfg.engine, final_eval=final_eval, report=report)


def release_processes() -> None:
    """End this process's part of a multi-process run: its process group is destroyed while
    every thread of it can still be joined. Left to the interpreter's exit, gloo's threads are
    torn down mid-flight now and then, and the process aborts ("terminate called without an
    active exception") after a run that succeeded."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_result(cfg: TrainConfig, *, engine_name: str, final_eval: dict | None,
               report: Path | None) -> dict:
    """The result of a run, the same keys for every engine (what ``--json`` prints)."""
    out_dir = Path(cfg.output_dir)
    evals, rows = read_jsonl(out_dir / "eval.jsonl"), read_jsonl(out_dir / "metrics.jsonl")
    return {
        "engine": engine_name,
        "steps": cfg.steps,
        "world_size": int(os.environ.get("WORLD_SIZE", 1)),
        **heldout_summary(evals),
        "final_eval": final_eval,
        "coverage": float(np.mean([m["coverage"] for m in rows])) if rows else None,
        "overflowed_sequences": sum(int(m["overflowed_sequences"]) for m in rows),
        "report": str(report) if report else None,
        "output_dir": str(out_dir),
        "final": str(out_dir / "final"),
    }
