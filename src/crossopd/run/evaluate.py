"""``crossopd eval``: a saved student (a run's ``final/``, a checkpoint, any HF model) on held-out
prompts, without training: reverse KL per byte to the teacher, stop rate, task metric, samples.

The teacher, data and sampling settings come from the run that produced the student (the
``config.json`` beside or above it), else from a given config, else from the demo config."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from crossopd.run.config import TrainConfig, load_config
from crossopd.run.lifecycle import heldout_eval
from crossopd.run.load import build_sides, load_splits
from crossopd.teachers import status_line


def run_config_for(student: str) -> Path | None:
    """The ``config.json`` of the run a student directory belongs to (``final/`` and
    ``checkpoints/step_N/`` sit one and two levels below it)."""
    path = Path(student)
    if not path.is_dir():
        return None
    for parent in (path, path.parent, path.parent.parent):
        if (parent / "config.json").is_file() and (parent / "metrics.jsonl").exists():
            return parent / "config.json"
    return None


def eval_config(student: str, config: str | Path | None, overrides: list[str],
                default: Path) -> tuple[TrainConfig, Path]:
    """(config with ``student.model = student``, the file it came from)."""
    source = Path(config) if config else run_config_for(student) or default
    cfg = load_config(source, [*overrides, f"student.model={student}"])
    return cfg, source


def eval_student(cfg: TrainConfig, samples: int = 3) -> dict:
    _, heldout = load_splits(cfg)
    student, teachers = build_sides(cfg)
    result = heldout_eval(cfg, student, teachers, heldout, samples=samples)
    return {"student": cfg.student.model, "prompts": len(heldout), **result}


def render_eval(r: dict, source: Path) -> str:
    lines = [f"student {r['student']} on {r['prompts']} held-out prompts (settings from "
             f"{source})",
             f"reverse KL per byte {r['kl_per_byte']:.4f}, stop rate {r['stop_rate']:.3f}"
             + (f", accuracy {r['accuracy']:.3f}" if "accuracy" in r else "")
             + f", alignment coverage {r['coverage']:.4f}"]
    for x in r["samples"]:
        lines += ["", f"prompt:   {x['prompt']!r}", f"response: {x['response']!r}"]
    return "\n".join(lines)


def load_model(name: str, device: str) -> tuple[Any, Any]:
    """(model, tokenizer) for anything ``student.model`` accepts."""
    from crossopd.models.hub import load_hf_model, load_hf_tokenizer
    from crossopd.run.load import resolve_device

    tokenizer = load_hf_tokenizer(name)
    return load_hf_model(name, device=str(resolve_device(device))), tokenizer


def eval_benchmark_cmd(args: Any) -> int:
    """``crossopd eval [MODEL] --benchmark NAME``: print the table or one JSON object."""
    from crossopd.evaluation.benchmark_runs import (
        default_samples_path,
        grade_benchmark,
        model_format,
        render_benchmark,
        run_benchmark,
        run_gold,
        sampling_for,
    )
    from crossopd.evaluation.benchmarks import load_benchmark
    from crossopd.evaluation.remote import is_url, remote_responses

    if args.overrides:
        raise ValueError(f"key=value overrides ({' '.join(args.overrides)}) are for held-out "
                         "mode; with --benchmark use the flags (crossopd eval --help)")
    if args.gold == (args.student is not None):
        raise ValueError("give a MODEL or --gold (which grades the reference answers), not "
                         + ("both" if args.gold else "neither"))
    bench = load_benchmark(args.benchmark, args.limit, args.question_field, args.answer_field)
    path = Path(args.out) if args.out else default_samples_path(bench, args.student)
    s = None if args.gold else sampling_for(bench, args.samples, args.max_new_tokens,
                                            args.temperature, args.top_p, args.seed,
                                            args.batch_size)
    if args.gold:
        result = run_gold(bench, path)
    elif is_url(args.student):
        # a served model (a teacher's vllm serve): the server's template and engine
        responses = remote_responses(args.student, [bench.messages(it) for it in bench.items],
                                     s, api_key=os.environ.get("CROSSOPD_API_KEY"),
                                     concurrency=args.batch_size)
        result = {"model": args.student, **grade_benchmark(bench, responses, s, path)}
    else:
        status_line(f"loading {args.student} ...")
        model, tokenizer = load_model(args.student, args.device)
        fmt = model_format(model, tokenizer, args.student)
        result = {"model": args.student, **run_benchmark(bench, model, tokenizer, fmt, s, path,
                                                          progress=True)}
    print(json.dumps(result, ensure_ascii=False) if args.json
          else render_benchmark(result, args.student), file=args.stdout)
    return 0 if not result.get("failed") else 1
