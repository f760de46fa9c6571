"""The ``crossopd bench`` arguments and dispatch (kept beside the benchmarks' entry points so the
parser module stays small; nothing heavy is imported until a benchmark runs)."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_bench_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``bench`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    b = sub.add_parser(
        "bench",
        help="benchmarks (JSON with --json)",
        description="Run a benchmark. 'align': student tokens/s of align + credit "
        "vs the decode-based baseline on three real tokenizer pairs. 'learn': held-out "
        "accuracy of SFT, ULD, cross-tokenizer OPD (four credit rules), OPD on the same "
        "teacher's exact byte-marginal targets (the oracle: the headline ratio) and "
        "same-tokenizer OPD at an equal student-token budget, on small models, over three "
        "shipped strength-matched teacher pairs and several seeds, with two-level bootstrap "
        "intervals and their half-widths, an oracle diagnosis of the credit rules and an "
        "identity control (standard preset: ~35 min on 2 cores; --quick: a smoke test, ~4 min). "
        "'serve': serve-teacher on the bundled teacher under one "
        "client, then N concurrent clients (requests/s, tokens/s, p50/p99 latency, errors, "
        "peak RSS; --quick: ~1 min on 2 cores). 'step': one whole OPD step per phase for the "
        "native and TRL engines on the bundled cross pair and a same-tokenizer control, the "
        "cross-family overhead, and TRL's distillation trainers beside it (--quick: ~4 min on 2 "
        "cores).",
    )
    b.add_argument("which", choices=["align", "learn", "serve", "step"])
    b.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="learn: preset settings, e.g. budget_tokens=240000 opd_lr=3e-4 "
                   "arms=sft,opd_cross_proportional,opd_same, together=1 (OPD students one "
                   "at a time; default 0: an arm's seeds trained together, same results), "
                   "headline_seeds=12 (seeds of the cross and oracle arms) "
                   "(fields of bench.learn.Preset)")
    b.add_argument("--quick", action="store_true", help="align: fewer sizes, shorter timing; "
                   "learn: the quick preset")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--multi-teacher", action="store_true", help="learn: two specialist "
                   "teachers of two tokenizer families (shipped), each strong on one of two "
                   "sub-tasks: each alone, routed, mixed, SFT on the routed teachers' samples; "
                   "per-skill gains with two-level intervals (tiny, quick or standard preset; "
                   "KEY=VALUE: fields of bench.learn_multi.MultiPreset)")
    b.add_argument("--agentic", action="store_true", help="learn: a tool task (two-turn "
                   "trajectories: a call of a mul tool, then the answer) with a cross-family "
                   "teacher that writes calls in another syntax: SFT on its trajectories, "
                   "cross-OPD, the oracle, same-tokenizer OPD, and the *_masked arms "
                   "(unparsed_calls=mask); accuracy and tool-call validity with two-level "
                   "intervals (tiny, quick or standard preset; standard 26 min on 2 cores)")
    b.add_argument("--teacher-properties", action="store_true", help="learn: per shipped "
                   "teacher pair, each teacher's properties on the student's own samples "
                   "(entropy, log-prob of the right continuation, advantage mass on the answer, "
                   "how well it tells right student answers from wrong, ...), and with --gains "
                   "their rank correlation with each teacher's teaching gain (~1 min)")
    b.add_argument("--gains", metavar="RESULT_JSON", help="learn --teacher-properties: a "
                   "`bench learn` result.json whose per-pair arm accuracies give each teacher's "
                   "gain (e.g. docs/bench_learn/standard/result.json)")
    b.add_argument("--preset", choices=["tiny", "quick", "standard", "full"],
                   help="learn: size preset (default: quick with --quick, else standard, the "
                   "one docs/benchmarks.md quotes; quick is a smoke test, full trains larger "
                   "models of its own)")
    b.add_argument("--retrain-teachers", action="store_true", help="learn: train the teacher "
                   "pairs (with --multi-teacher: the specialist sets) and the student anew "
                   "(into the cache) instead of loading the ones shipped with crossopd")
    b.add_argument("--out", help="learn, serve: output directory (default runs/bench_learn, "
                   "runs/bench_serve)")
    b.add_argument("--device", default="cpu", help="step: cpu, cuda or auto (default cpu)")
    b.add_argument("--no-peers", action="store_true", help="step: skip TRL's distillation "
                   "trainers")
    b.add_argument("--vllm-python", help="step: a Python with vLLM installed (e.g. "
                   ".venv-vllm/bin/python) for TRL rows with vLLM rollouts")
    b.add_argument("--clients", type=int, help="serve: concurrent clients (default 8 with "
                   "--quick, else 16)")
    b.set_defaults(func=cmd_bench)
    return b


def cmd_bench(args: argparse.Namespace) -> int:
    if args.overrides and args.which != "learn":
        raise ValueError(f"KEY=VALUE overrides ({' '.join(args.overrides)}) are for "
                         "`bench learn` only")
    if args.which == "learn":
        from crossopd.bench.learn import bench_learn
        from crossopd.bench.learn_stats import render_learn_table

        preset = args.preset or ("quick" if args.quick else "standard")
        if args.retrain_teachers and args.agentic:
            raise ValueError("--retrain-teachers is not for `bench learn --agentic` (it trains "
                             "its models into the cache)")
        if sum((args.multi_teacher, args.agentic, args.teacher_properties)) > 1:
            raise ValueError("choose one of --multi-teacher, --agentic and "
                             "--teacher-properties")
        if args.gains and not args.teacher_properties:
            raise ValueError("--gains is for `bench learn --teacher-properties`")
        log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
        if args.teacher_properties:
            from crossopd.bench.teacher_props import render_properties, teacher_properties

            if args.overrides or args.retrain_teachers:
                raise ValueError("bench learn --teacher-properties reads the shipped teacher "
                                 "pairs: it takes no KEY=VALUE overrides or --retrain-teachers")
            if preset not in ("quick", "standard"):
                raise ValueError("bench learn --teacher-properties: the shipped pairs are the "
                                 "quick and standard presets' models; use one of those")
            result = teacher_properties(preset, gains=args.gains, progress=log)
            print(json.dumps(result) if args.json else render_properties(result),
                  file=args.stdout)
            return 0
        if args.multi_teacher:
            from crossopd.bench.learn_multi import (
                MULTI_PRESETS,
                bench_learn_multi,
                render_multi_table,
            )

            if preset not in MULTI_PRESETS:
                raise ValueError(f"bench learn --multi-teacher: preset {preset!r}; choose one "
                                 f"of {', '.join(MULTI_PRESETS)}")
            result = bench_learn_multi(preset, out_dir=args.out or "runs/bench_learn_multi",
                                       progress=log, retrain_teachers=args.retrain_teachers,
                                       settings=args.overrides)
            print(json.dumps(result) if args.json else render_multi_table(result), file=args.stdout)
            return 0
        if args.agentic:
            from crossopd.bench.learn_agentic import (
                AGENTIC_PRESETS,
                bench_learn_agentic,
                render_agentic_table,
            )

            if args.overrides:
                raise ValueError("bench learn --agentic takes no KEY=VALUE overrides")
            if preset not in AGENTIC_PRESETS:
                raise ValueError(f"bench learn --agentic: preset {preset!r}; choose one of "
                                 f"{', '.join(AGENTIC_PRESETS)}")
            result = bench_learn_agentic(preset, out_dir=args.out or "runs/bench_learn_agentic",
                                         progress=log)
            print(json.dumps(result) if args.json else render_agentic_table(result),
                  file=args.stdout)
            return 0
        result = bench_learn(preset, out_dir=args.out or "runs/bench_learn", progress=log,
                             settings=args.overrides, retrain_teachers=args.retrain_teachers)
        print(json.dumps(result) if args.json else render_learn_table(result), file=args.stdout)
        return 0
    if args.which == "serve":
        from crossopd.bench.serve import bench_serve, render_serve

        log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
        result = bench_serve(quick=args.quick, clients=args.clients,
                             out_dir=args.out or "runs/bench_serve", progress=log)
        print(json.dumps(result) if args.json else render_serve(result), file=args.stdout)
        return 0 if result["errors"] == 0 else 1
    if args.which == "step":
        from crossopd.bench.step import bench_step, render_step

        log = (lambda m: print(m, file=sys.stderr, flush=True)) if args.json else print
        result = bench_step(quick=args.quick, out_dir=args.out or "runs/bench_step",
                            peers=not args.no_peers, vllm_python=args.vllm_python,
                            device=args.device, progress=log)
        print(json.dumps(result) if args.json else render_step(result), file=args.stdout)
        return 0
    from crossopd.bench.align import bench_align, render_row

    def progress(row: dict) -> None:
        if not args.json:
            print(render_row(row), file=args.stdout, flush=True)

    result = bench_align(quick=args.quick, progress=progress)
    if args.json:
        print(json.dumps(result), file=args.stdout)
    return 0
