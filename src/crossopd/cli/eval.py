"""``crossopd eval``: a model on a benchmark, or held-out against the teacher. The work is in
``crossopd.run.evaluate``; nothing heavy is imported until the command runs."""

from __future__ import annotations

import argparse
import json
from typing import Any

from crossopd.cli.train import demo_config_path
from crossopd.evaluation.benchmarks import SHIPPED
from crossopd.models.hub import quiet_hf


def add_eval_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``eval`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    ev = sub.add_parser("eval", help="evaluate a model: on a benchmark, or held-out vs the "
                        "teacher", description="With --benchmark: MODEL's accuracy on "
                        f"{', '.join(SHIPPED)} (installed by `make install`) or a "
                        "local .jsonl/.parquet file with question/answer columns; each prompt "
                        "in MODEL's own chat template, K samples per item (pass@1 averaged over "
                        "them, with its standard error, and pass@K), per-item responses and "
                        "grades in a JSONL file (docs/eval.md). --gold grades the references "
                        "themselves (no MODEL): 1.0 on every shipped benchmark. Without "
                        "--benchmark: held-out reverse KL per byte to the teacher, stop rate, "
                        "accuracy (when the data has answers) and sample responses of MODEL; "
                        "teacher, data and sampling come from --config, else the run MODEL "
                        "belongs to, else the demo config.")
    ev.add_argument("student", nargs="?", metavar="MODEL", help="HF model directory (e.g. "
                    "runs/demo/final), hub id, .gguf or bundled name; with --benchmark also a "
                    "server URL (http://HOST:PORT/v1 of `vllm serve`: generation runs there, "
                    "through its /v1/chat/completions; API key from CROSSOPD_API_KEY)")
    ev.add_argument("overrides", nargs="*", help="held-out mode: key=value config overrides, "
                    "e.g. eval_prompts=64")
    ev.add_argument("--benchmark", metavar="NAME", help=f"{', '.join(SHIPPED)}, "
                    "or a .jsonl / .jsonl.gz / .parquet file")
    ev.add_argument("--limit", type=int, help="benchmark: only the first N items")
    ev.add_argument("--samples", type=int, metavar="K", help="samples per item (benchmark; "
                    "default per benchmark: 4 for aime25, else 1) or per held-out prompt "
                    "(default: the config's eval_samples)")
    ev.add_argument("--gold", action="store_true", help="benchmark: grade each item's reference "
                    "answer instead of a model's (a self-test of the grader; lists failures)")
    ev.add_argument("--temperature", type=float, help="benchmark: sampling temperature "
                    "(default 0.6; 0 is greedy)")
    ev.add_argument("--top-p", type=float, help="benchmark: nucleus (default 0.95)")
    ev.add_argument("--max-new-tokens", type=int, help="benchmark: response length limit "
                    "(default 512 for gsm8k, 2048 for aime25, else 1024)")
    ev.add_argument("--seed", type=int, default=0, help="benchmark: sampling seed (default 0)")
    ev.add_argument("--batch-size", type=int, default=8, help="benchmark: responses generated "
                    "together (default 8; with a URL MODEL, items requested at once)")
    ev.add_argument("--device", default="cpu", help="benchmark: cpu, cuda or auto (default cpu)")
    ev.add_argument("--question-field", default="question", help="local file: the prompt column")
    ev.add_argument("--answer-field", default="answer", help="local file: the reference column "
                    "(a number, a LaTeX answer, a solution ending in '#### N' or with a "
                    "\\boxed{})")
    ev.add_argument("--out", help="benchmark: the per-item JSONL file (default "
                    "runs/eval/NAME-MODEL.jsonl)")
    ev.add_argument("--config", help="held-out mode: YAML config for teacher, data and sampling")
    ev.add_argument("--show", type=int, default=3, help="held-out mode: prompts with responses "
                    "to print")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    ev.set_defaults(func=cmd_eval)
    return ev


def cmd_eval(args: argparse.Namespace) -> int:
    if args.benchmark:
        from crossopd.run.evaluate import eval_benchmark_cmd

        quiet_hf()
        return eval_benchmark_cmd(args)
    if args.gold or args.student is None:
        raise ValueError("--gold grades a benchmark's references: give --benchmark NAME"
                         if args.gold else "give a MODEL to evaluate, or --benchmark NAME")
    from crossopd.run.evaluate import eval_config, eval_student, render_eval

    overrides = list(args.overrides)
    if args.samples is not None:  # samples per held-out prompt, as --samples is per item
        overrides.append(f"eval_samples={args.samples}")
    cfg, source = eval_config(args.student, args.config, overrides, demo_config_path())
    quiet_hf()
    result = eval_student(cfg, samples=args.show)
    print(json.dumps(result, ensure_ascii=False) if args.json else render_eval(result, source),
          file=args.stdout)
    return 0


