"""TRL's own distillation trainers as peers for ``crossopd bench step``.

Each peer runs TRL's trainer unchanged on the same student, teacher, prompts and student-token
budget as crossopd's step: ``batch_size`` prompts per optimizer step, one completion each,
``max_new_tokens`` long, sampled by the student at temperature 1 every step (fully on-policy),
float32, no gradient checkpointing (crossopd's TRL engine turns it off too), no eval, saving or
logging. Only the measured steps (after ``warmup_steps``) are timed, by a ``TrainerCallback``
around each optimizer step, and the student tokens are counted where the trainer generates them.

Every peer runs in a fresh subprocess (``python -m crossopd.bench.peers TRAINER PAIR ...``,
one JSON line on stdout) so that each row's peak RSS is its own process's, not a shared peak.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

TRAINERS = ("gold", "distillation")
PAIRS = ("cross", "same")
DEFAULT_TEACHER = {"cross": "gemma3-270m", "same": None}  # None: the student itself


class PeerUnavailable(RuntimeError):
    """The peer trainer cannot run this pair; the message says why (TRL's own words where
    TRL refused)."""


def hf_dir(name: str) -> str:
    """An HF directory (or hub id) for a bundled name, path or GGUF file: TRL loads teacher
    tokenizers by path, and the bundled models are GGUF files cached as complete HF dirs."""
    from crossopd import bundled
    from crossopd.models.hub import gguf_model_dir

    resolved = bundled.resolve_tokenizer(name)
    if not isinstance(resolved, (str, Path)):
        raise PeerUnavailable(f"{name} is a bare tokenizer, not a model TRL can load")
    path = Path(resolved)
    if path.is_file() and path.suffix.lower() == ".gguf":
        return str(gguf_model_dir(path))
    return str(path) if path.exists() else name


def _dataset(trainer_name: str) -> Any:
    """The bundled arith prompts in the column each trainer reads: DistillationTrainer a
    ``prompt`` message list; GOLD a ``messages`` conversation whose last assistant turn is the
    completion (a ``prompt`` column would make GOLD ask for a ``completion`` one), so the
    reference answer rides along. With lmbda=1 GOLD replaces it by a student sample every step:
    it only fixes the prompt."""
    from datasets import Dataset

    from crossopd.step.data import load_examples

    rows = []
    for e in load_examples("bundled:arith"):
        if trainer_name == "gold":
            answer = {"role": "assistant", "content": e.answer or "."}
            rows.append({"messages": [*e.messages, answer]})
        else:
            rows.append({"prompt": e.messages})
    return Dataset.from_list(rows)


def _common_args(cls: type, out_dir: str, *, batch_size: int, max_new_tokens: int,
                 total_steps: int, device: str, seed: int) -> dict[str, Any]:
    kwargs: dict[str, Any] = dict(
        output_dir=out_dir, per_device_train_batch_size=batch_size,
        gradient_accumulation_steps=1, max_steps=total_steps, seed=seed,
        max_completion_length=max_new_tokens, temperature=1.0, top_p=1.0, top_k=0,
        learning_rate=1e-6, lr_scheduler_type="constant", warmup_steps=0,
        bf16=False, fp16=False, use_cpu=device == "cpu", report_to="none",
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0, remove_unused_columns=False, disable_dropout=True,
    )
    # transformers renamed gradient_checkpointing (deprecated from 5.2x on); TRL defaults it on
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names
           else "gradient_checkpointing"] = False
    return kwargs


def _step_timer(warmup_steps: int) -> Any:
    from transformers import TrainerCallback

    class StepTimer(TrainerCallback):
        """Wall time of each optimizer step; on_step_begin fires after the dataloader has
        collated the batch, so the on-policy generation, both forwards, backward and optimizer
        step are inside, the data loading is not."""

        def __init__(self) -> None:
            self.durations: list[float] = []
            self._t0 = 0.0

        def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self._t0 = time.perf_counter()

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            self.durations.append(time.perf_counter() - self._t0)

        def measured(self) -> float:
            return sum(self.durations[warmup_steps:])

    return StepTimer()


def _count_generation(trainer: Any, name: str, count: Any, calls: list[int]) -> None:
    """Wrap the trainer's generation method on the instance: each call appends the number
    of completion tokens it produced (the trainer's own EOS cut: tokens up to and including
    the first EOS, none of the padding after it)."""
    inner = getattr(trainer, name)

    def wrapped(*a: Any, **kw: Any) -> Any:
        out = inner(*a, **kw)
        calls.append(int(count(out)))
        return out

    setattr(trainer, name, wrapped)


def _gold(student_model: Any, teacher_model: Any, tokenizer: Any, teacher_name: str,
          cross: bool, data: Any, callback: Any, base: dict[str, Any]) -> tuple[Any, str, str]:
    from trl.experimental.gold import GOLDConfig, GOLDTrainer
    from trl.experimental.utils import encode_with_byte_offsets, is_byte_level_tokenizer

    if not cross:
        mode = "gold same-tokenizer reverse KL on-policy"
        note = ("GOLD without ULD: generalized JSD with beta=1 (reverse KL) on the shared "
                "vocabulary, lmbda=1 so every step is student-sampled.")
        args = GOLDConfig(**base, lmbda=1.0, beta=1.0, use_uld_loss=False)
    else:
        teacher_dir = hf_dir(teacher_name)
        from transformers import AutoTokenizer

        t_tok = AutoTokenizer.from_pretrained(teacher_dir)
        # GOLD's extended ULD (its byte-offset alignment, the "GOLD" mode) needs a ByteLevel
        # teacher tokenizer; ask TRL itself so the reason is TRL's, not ours.
        extended_reason = None
        if not is_byte_level_tokenizer(t_tok.backend_tokenizer):
            try:
                encode_with_byte_offsets(t_tok.backend_tokenizer, ["x"])
            except NotImplementedError as e:
                extended_reason = str(e)
        if extended_reason is None:
            mode = "gold cross-tokenizer (extended ULD, byte-offset alignment)"
            note = "GOLD's extended ULD: both tokenizers are ByteLevel."
        else:
            # Forced on, it fails the same way inside compute_loss
            # (build_teacher_inputs_from_texts -> encode_with_byte_offsets on the teacher side).
            mode = "uld cross-tokenizer (positional)"
            note = (f"GOLD's extended ULD (its byte-offset alignment) cannot run this pair: TRL "
                    f"raises NotImplementedError(\"{extended_reason}\") for the teacher "
                    "tokenizer; ran GOLD's positional ULD (use_extended_uld=False, the original "
                    "ULD paper's truncation) instead.")
        note += (" The teacher scores the student's chat-rendered prompt text re-tokenized by "
                 "the teacher tokenizer (GOLD has no per-teacher prompt format, so the plain "
                 "'Question: ...\\nAnswer:' format was not used); lmbda=1 so every step is "
                 "student-sampled.")
        args = GOLDConfig(**base, lmbda=1.0, beta=1.0, use_uld_loss=True,
                          use_extended_uld=extended_reason is None,
                          teacher_tokenizer_name_or_path=teacher_dir)
    trainer = GOLDTrainer(model=student_model, teacher_model=teacher_model, args=args,
                          train_dataset=data, processing_class=tokenizer, callbacks=[callback])
    return trainer, mode, note


def _distillation(student_model: Any, teacher_model: Any, tokenizer: Any, data: Any,
                  callback: Any, base: dict[str, Any]) -> tuple[Any, str, str]:
    from trl import DistillationConfig, DistillationTrainer

    args = DistillationConfig(**base, beta=1.0)
    try:
        trainer = DistillationTrainer(model=student_model, teacher_model=teacher_model, args=args,
                                      train_dataset=data, processing_class=tokenizer,
                                      callbacks=[callback])
    except ValueError as e:  # e.g. its vocab_size check: it needs one shared vocabulary
        raise PeerUnavailable(f"trl.DistillationTrainer refused the pair: {e}") from e
    mode = "same-tokenizer reverse KL on-policy"
    note = ("trl.DistillationTrainer (always on-policy: the student samples every step) with "
            "beta=1 (reverse KL) over the teacher's full next-token distribution.")
    return trainer, mode, note


def _run(trainer_name: str, pair: str, *, batch_size: int, max_new_tokens: int, steps: int,
         warmup_steps: int, device: str, seed: int, student: str,
         teacher: str | None) -> dict[str, Any]:
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    from crossopd.models.hub import load_hf_model, load_hf_tokenizer, quiet_hf

    quiet_hf()
    from datasets.utils.logging import disable_progress_bar

    disable_progress_bar()  # GOLD tokenizes the dataset through datasets.map
    teacher_name = teacher or DEFAULT_TEACHER[pair] or student
    tokenizer = load_hf_tokenizer(student)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    student_model = load_hf_model(student)
    teacher_model = load_hf_model(teacher_name)
    data = _dataset(trainer_name)
    timer = _step_timer(warmup_steps)
    calls: list[int] = []
    with tempfile.TemporaryDirectory(prefix="crossopd-peer-") as out_dir:
        from trl import DistillationConfig
        from trl.experimental.gold import GOLDConfig

        cls = GOLDConfig if trainer_name == "gold" else DistillationConfig
        base = _common_args(cls, out_dir, batch_size=batch_size, max_new_tokens=max_new_tokens,
                            total_steps=warmup_steps + steps, device=device, seed=seed)
        if trainer_name == "gold":
            trainer, mode, note = _gold(student_model, teacher_model, tokenizer, teacher_name,
                                        pair == "cross", data, timer, base)
            # on-policy labels are -100 outside the completion and after its first EOS
            _count_generation(trainer, "generate_on_policy_outputs",
                              lambda out: (out[2] != -100).sum(), calls)
        else:
            trainer, mode, note = _distillation(student_model, teacher_model, tokenizer, data,
                                                timer, base)
            _count_generation(trainer, "_generate_single_turn",
                              lambda out: sum(len(c) for c in out), calls)
        trainer.train()
    measured_calls = calls[warmup_steps:]
    if len(calls) == warmup_steps + steps and len(timer.durations) == warmup_steps + steps:
        tokens = sum(measured_calls)
        note += (" Student tokens: completion tokens the trainer generated and trained on in "
                 "the measured steps (up to and including EOS).")
    else:  # generation did not line up one call per step: fall back to the nominal budget
        tokens = batch_size * max_new_tokens * steps
        note += (f" Student tokens are the nominal batch_size*max_new_tokens*steps: saw "
                 f"{len(calls)} generation calls for {len(timer.durations)} steps.")
    seconds = timer.measured()
    return {
        "trainer": trainer_name, "mode": mode, "pair": pair, "steps": steps,
        "student_tokens": tokens, "seconds": round(seconds, 4),
        "tok_per_s": round(tokens / seconds, 3) if seconds > 0 else 0.0,
        # ru_maxrss is KiB on Linux
        "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "note": note,
    }


def run_peer(trainer: str, pair: str, *, batch_size: int, max_new_tokens: int, steps: int,
             warmup_steps: int = 1, device: str = "cpu", seed: int = 0,
             student: str = "smollm2", teacher: str | None = None,
             in_process: bool = False) -> dict[str, Any]:
    """One peer trainer for ``steps`` measured optimizer steps after ``warmup_steps``.

    trainer: "gold" (TRL's GOLDTrainer; cross-tokenizer ULD on the cross pair) or
    "distillation" (trl.DistillationTrainer, same-tokenizer on-policy). pair: "cross" (teacher
    gemma3-270m unless ``teacher`` is given) or "same" (the student as its own teacher).
    Returns {"trainer", "mode", "pair", "steps", "student_tokens", "seconds", "tok_per_s",
    "peak_rss_mb", "note"}. Raises PeerUnavailable(reason) when the trainer cannot run the pair.
    Runs in a fresh subprocess unless ``in_process`` (then peak_rss_mb is this process's)."""
    if trainer not in TRAINERS:
        raise ValueError(f"trainer must be one of {TRAINERS}, got {trainer!r}")
    if pair not in PAIRS:
        raise ValueError(f"pair must be one of {PAIRS}, got {pair!r}")
    if min(batch_size, max_new_tokens, steps) < 1 or warmup_steps < 0:
        raise ValueError("batch_size, max_new_tokens and steps must be >= 1, warmup_steps >= 0")
    kw = dict(batch_size=batch_size, max_new_tokens=max_new_tokens, steps=steps,
              warmup_steps=warmup_steps, device=device, seed=seed, student=student,
              teacher=teacher)
    if in_process:
        return _run(trainer, pair, **kw)  # type: ignore[arg-type]
    cmd = [sys.executable, "-m", "crossopd.bench.peers", trainer, pair]
    for key, value in kw.items():
        if value is not None:
            cmd += [f"--{key.replace('_', '-')}", str(value)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    result = _result_line(proc.stdout)
    if result is None:
        tail = (proc.stderr or proc.stdout).strip()[-2000:]
        raise RuntimeError(f"peer {trainer}/{pair} exited {proc.returncode} without a result: "
                           f"{tail}")
    if "peer_unavailable" in result:
        raise PeerUnavailable(result["peer_unavailable"])
    return result


def _result_line(stdout: str) -> dict[str, Any] | None:
    """Our JSON line: the last one that parses to a row or a refusal (transformers prints its
    own train-summary dict to stdout too, as a Python repr)."""
    for line in reversed(stdout.splitlines()):
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and ("trainer" in obj or "peer_unavailable" in obj):
            return obj
    return None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crossopd.bench.peers",
                                description="One TRL peer trainer; prints one JSON line.")
    p.add_argument("trainer", choices=TRAINERS)
    p.add_argument("pair", choices=PAIRS)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-new-tokens", type=int, default=48)
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--warmup-steps", type=int, default=1)
    p.add_argument("--device", default="cpu")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--student", default="smollm2")
    p.add_argument("--teacher", default=None)
    a = p.parse_args(argv)
    try:
        row = _run(a.trainer, a.pair, batch_size=a.batch_size, max_new_tokens=a.max_new_tokens,
                   steps=a.steps, warmup_steps=a.warmup_steps, device=a.device, seed=a.seed,
                   student=a.student, teacher=a.teacher)
    except PeerUnavailable as e:
        print(json.dumps({"peer_unavailable": str(e)}), flush=True)
        return 0
    print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
