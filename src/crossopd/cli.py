"""The ``crossopd`` command line: every command has ``--help``; ``--json`` prints one object."""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from crossopd import bundled
from crossopd.bench_cli import add_bench_parser
from crossopd.hub import quiet_hf


def _tokenizer_help() -> str:
    return (
        "tokenizer: HF directory or hub id, .gguf, tiktoken or SentencePiece .model, Tekken "
        f".json, or a bundled name ({', '.join(bundled.BUNDLED)})"
    )


DEMO_CONFIGS = {"gemma": "demo.yaml", "qwen": "demo_qwen.yaml"}


def demo_config_path(pair: str = "gemma") -> Path:
    """The shipped demo config of ``pair`` (what ``crossopd demo --pair PAIR`` runs; a config to
    copy). Held-out ``crossopd eval`` of a model from no run reads the Gemma one, whose teacher
    is the lighter."""
    from importlib.resources import files

    return Path(str(files("crossopd").joinpath("configs", DEMO_CONFIGS[pair])))


def cmd_align(args: argparse.Namespace) -> int:
    from crossopd import ByteVocab
    from crossopd.align import align_text
    from crossopd.view import alignment_json, chunk_rows, render_html, render_terminal

    if args.file is not None:
        data = Path(args.file).read_bytes()
    else:
        data = args.text.encode("utf-8")
    sv = ByteVocab.from_pretrained(args.student)
    tv = ByteVocab.from_pretrained(args.teacher)
    s_ids, t_ids, a = align_text(data, sv, tv)
    rows = chunk_rows(a, s_ids, t_ids, sv, tv)
    stats = a.stats()
    if args.html:
        Path(args.html).write_text(
            render_html(rows, stats, args.student, args.teacher), encoding="utf-8"
        )
    if args.json:
        print(
            json.dumps(alignment_json(rows, stats, args.student, args.teacher), ensure_ascii=False)
        )
    else:
        color = sys.stdout.isatty() and not args.no_color
        print(
            f"student {args.student} ({sv.kind}, {sv.vocab_size} ids)  vs  "
            f"teacher {args.teacher} ({tv.kind}, {tv.vocab_size} ids)"
        )
        print(render_terminal(rows, stats, color=color, max_rows=args.max_rows))
        if args.html:
            print(f"HTML view written to {args.html}")
    return 0


def cmd_train(args: argparse.Namespace) -> int:
    from crossopd.config import load_config
    from crossopd.train import render_result, train

    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # only overrides were given
    cfg = load_config(config, overrides)
    progress = not args.no_progress and not args.json
    quiet_hf()
    result = train(cfg, resume=args.resume, progress=progress, overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # one process reports
    print(json.dumps(result) if args.json else render_result(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Cross-family OPD on the bundled models: SmolLM2-135M learns from
    Qwen2.5-Coder-1.5B-Instruct (or, with ``--pair gemma``, from Gemma 3 270M base)."""
    from crossopd.config import load_config
    from crossopd.train import render_result, train

    cfg = load_config(demo_config_path(args.pair), list(args.overrides))
    quiet_hf()
    result = train(cfg, progress=not args.json, overwrite=True)  # the demo reruns from scratch
    keys = ("heldout_kl_before", "heldout_kl_after", "metric", "heldout_metric_before",
            "heldout_metric_after", "heldout_metric_change_se", "heldout_metric_se_before",
            "heldout_metric_se_after", "heldout_stop_rate_before", "heldout_stop_rate_after",
            "steps", "coverage", "report")
    out = {k: result.get(k) for k in keys}
    if args.json:
        print(json.dumps(out))
    else:
        print(render_result(result))
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    if args.benchmark:
        from crossopd.eval_run import eval_benchmark_cmd

        quiet_hf()
        return eval_benchmark_cmd(args)
    if args.gold or args.student is None:
        raise ValueError("--gold grades a benchmark's references: give --benchmark NAME"
                         if args.gold else "give a MODEL to evaluate, or --benchmark NAME")
    from crossopd.eval_run import eval_config, eval_student, render_eval

    overrides = list(args.overrides)
    if args.samples is not None:  # samples per held-out prompt, as --samples is per item
        overrides.append(f"eval_samples={args.samples}")
    cfg, source = eval_config(args.student, args.config, overrides, demo_config_path())
    quiet_hf()
    result = eval_student(cfg, samples=args.show)
    print(json.dumps(result, ensure_ascii=False) if args.json else render_eval(result, source))
    return 0


def cmd_doctor(args: argparse.Namespace) -> int:
    from crossopd.doctor import doctor_pairs, render_report

    quiet_hf()
    report = doctor_pairs(args.student, args.teacher, args.teacher_template, args.teacher_stop,
                          score=args.score, device=args.device, teacher_url=args.teacher_url,
                          served_name=args.served_name, data=args.data)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        pairs = report.get("pairs") or [{"teacher_name": args.teacher[0], **report}]
        print("\n\n".join(render_report(r, args.student, r["teacher_name"]) for r in pairs))
    return 0


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from crossopd.teachers.server import API_KEY_ENV, serve
    from crossopd.teachers.validate import ServeLimits

    # the environment is the safer place for the key: a flag shows in `ps`
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    limits = ServeLimits(max_prompts=args.max_prompts, max_request_tokens=args.max_request_tokens,
                         max_body_bytes=args.max_body_bytes)
    serve(args.model, host=args.host, port=args.port, device=args.device,
          max_batch_tokens=args.max_batch_tokens, name=args.name, api_key=api_key,
          limits=limits, max_queue=args.max_queue, max_batch_requests=args.max_batch_requests,
          log_every_s=args.log_every, log_level=args.log_level)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossopd",
        description="On-policy distillation across LLM families (exact cross-tokenizer alignment).",
    )
    sub = p.add_subparsers(dest="command", required=True)

    a = sub.add_parser(
        "align",
        help="show the chunk alignment of one text under two tokenizers",
        description="Tokenize TEXT with the student, spell the same bytes with the "
        "teacher, and show the Dual-Pointer Chunk Alignment.",
    )
    a.add_argument("--student", required=True, help="student " + _tokenizer_help())
    a.add_argument("--teacher", required=True, help="teacher " + _tokenizer_help())
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the response text")
    src.add_argument("--file", help="read the response bytes from this file (any bytes)")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--html", metavar="OUT", help="also write an HTML view to OUT")
    a.add_argument("--max-rows", type=int, default=200, help="chunk rows shown in the terminal")
    a.add_argument("--no-color", action="store_true", help="no ANSI colours")
    a.set_defaults(func=cmd_align)

    add_bench_parser(sub)

    d = sub.add_parser("demo", help="short real cross-family OPD run on the bundled models",
                       description="Student SmolLM2-135M-Instruct learns from teacher "
                       "Qwen2.5-Coder-1.5B-Instruct (another family: its own tokenizer and chat "
                       "template; a system prompt only the teacher sees) to answer counting "
                       "questions about its prompt; prints held-out accuracy (with its paired "
                       "standard error), stop rate and reverse KL per byte before and after, "
                       "alignment statistics and the report path. About 5 minutes on 2 CPU "
                       "cores, the first run included (configs/demo_qwen.yaml). --pair gemma: "
                       "the teacher is Gemma 3 270M base (plain template, three worked "
                       "examples; configs/demo.yaml).")
    d.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. steps=4)")
    d.add_argument("--pair", choices=sorted(DEMO_CONFIGS), default="qwen",
                   help="the teacher: qwen (Qwen2.5-Coder-1.5B-Instruct, the default) or gemma "
                   "(Gemma 3 270M base)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_demo)

    t = sub.add_parser("train", help="the OPD training recipe",
                       description="Train a student on-policy from a teacher of any family. "
                       "CONFIG is a YAML file (see docs/config.md; src/crossopd/configs/ has a "
                       "commented example); key=value overrides use dotted keys, e.g. "
                       "optim.lr=1e-5 rollout.max_new_tokens=128. engine=native (default) is "
                       "crossopd's own loop; engine=trl runs TRL's GRPOTrainer and works under "
                       "`torchrun -m crossopd train` and `accelerate launch -m crossopd train` "
                       "(docs/scale.md).")
    t.add_argument("config", nargs="?", help="YAML config file (optional: every key but the "
                   "teacher has a default)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint "
                   "(native: checkpoints/step_N; trl: checkpoint-N)")
    t.add_argument("--overwrite", action="store_true", help="start over in an output_dir that "
                   "holds a run (deletes its metrics and checkpoints; without it such a "
                   "directory is refused)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: one line per "
                   "step instead")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.set_defaults(func=cmd_train)

    from crossopd.eval_cli import add_eval_parser

    add_eval_parser(sub).set_defaults(func=cmd_eval)

    doc = sub.add_parser("doctor", help="check a student/teacher pair before training",
                         description="Tokenizer kinds, byte-view round trips, alignment coverage "
                         "on sample texts, both rendered prompts, both stop markers, warnings.")
    doc.add_argument("--student", required=True, help="student " + _tokenizer_help())
    doc.add_argument("--teacher", required=True, action="append",
                     help="teacher " + _tokenizer_help() + "; repeat it for several teachers "
                     "(one report per pair)")
    doc.add_argument("--teacher-template", action="append",
                     help="plain prompt template for a teacher without a chat template, e.g. "
                     "'Question: {prompt}\\nAnswer:' (once for all teachers, or once per "
                     "--teacher)")
    doc.add_argument("--teacher-stop", action="append", help="what ends the teacher's answer "
                     "(with a plain template), e.g. '\\n\\nQuestion:'")
    doc.add_argument("--score", action="store_true", help="load the teacher model and measure "
                     "its log-probs of sample answers: first token (the prompt/response seam), "
                     "the rest, the stop chunk; warns when the format costs nats")
    doc.add_argument("--device", default=None, help="device for --score (default: cuda if "
                     "available)")
    doc.add_argument("--teacher-url", help="also check a teacher server: reachable, the model "
                     "it serves, its context length")
    doc.add_argument("--served-name", help="with --teacher-url: the model name it must serve")
    doc.add_argument("--data", help="also check a prompt file: rows, and the longest prompt "
                     "against both contexts")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.set_defaults(func=cmd_doctor)

    st = sub.add_parser("serve-teacher", help="serve a teacher over HTTP (vLLM-compatible subset)",
                        description="Serve POST /v1/completions with prompt_logprobs for token-id "
                        "prompts, scoring with an in-process Hugging Face model. Point "
                        "HTTPTeacher (or the training config) at http://HOST:PORT.")
    st.add_argument("--model", required=True, help="HF model dir, hub id, .gguf file or bundled "
                    "name (smollm2, gemma3-270m)")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    st.add_argument("--max-batch-tokens", type=int, default=8192,
                    help="token budget of one forward pass; waiting requests are grouped up to "
                    "it (default 8192)")
    st.add_argument("--served-model-name", "--name", dest="name", default=None,
                    help="served model name, as vLLM's flag (default: --model)")
    st.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on "
                    "/v1/* (default: $CROSSOPD_API_KEY; /health stays open)")
    st.add_argument("--max-prompts", type=int, default=64,
                    help="prompts per request (default 64; more: HTTP 413)")
    st.add_argument("--max-request-tokens", type=int, default=65536,
                    help="tokens per request, all prompts together (default 65536; more: 413)")
    st.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                    help="request body size (default 8 MiB; more: HTTP 413)")
    st.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting to be scored (default 256; more: HTTP 429 with "
                    "Retry-After)")
    st.add_argument("--max-batch-requests", type=int, default=64,
                    help="requests grouped into one forward pass (default 64; 1: each request "
                    "scored alone, so its scores never depend on what else was queued)")
    st.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                    help="one summary line (requests, tokens, latency, errors) per interval "
                    "(default 60; 0: none)")
    st.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                    help="debug: one line per request")
    st.set_defaults(func=cmd_serve_teacher)
    return p


def _warning_line(message: Warning | str, category: type, *args: object, **kw: object) -> str:
    return f"warning: {message}\n"


def main(argv: list[str] | None = None) -> int:
    warnings.formatwarning = _warning_line  # the CLI's warnings are for users, not stack frames
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # `train CONFIG --resume steps=20`: overrides may come after the flags too
    if extra and hasattr(args, "overrides") and all("=" in e and not e.startswith("-")
                                                     for e in extra):
        args.overrides = [*args.overrides, *extra]
    elif extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.func(args)
    except (OSError, ValueError, RuntimeError) as e:  # the user's to fix: one line, no traceback
        if os.environ.get("CROSSOPD_DEBUG"):
            raise
        lines = str(e).strip().splitlines() or [type(e).__name__]
        if isinstance(e, OSError) and len(lines) > 1:  # library essays: their first line
            lines = [lines[0] + " (CROSSOPD_DEBUG=1 shows the rest)"]
        print(f"crossopd {args.command}: error: " + "\n".join(lines), file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
