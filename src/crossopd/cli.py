"""The ``crossopd`` command line: every command has ``--help``; ``--json`` prints one object."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from crossopd import models

DEMO_TEXT = (
    "Sure! Here is the plan: 1) compute 12345 × 678 = 8369910; 2) check it.\n"
    "<think>Chunks must line up byte-for-byte.</think>\n"
    "中文和日本語、한국어 and emoji 👩\u200d💻🎉 — café vs cafe\u0301.\n"
    "\tdef f(x):\r\n        return x ** 2\n"
)


def _tokenizer_help() -> str:
    return (
        "tokenizer: HF directory or hub id, .gguf, tiktoken or SentencePiece .model, Tekken "
        f".json, or a bundled name ({', '.join(models.BUNDLED)})"
    )


def cmd_align(args: argparse.Namespace) -> int:
    from crossopd import ByteVocab, align
    from crossopd.view import alignment_json, chunk_rows, render_html, render_terminal

    if args.file is not None:
        data = Path(args.file).read_bytes()
    else:
        data = args.text.encode("utf-8")
    sv = ByteVocab.from_pretrained(args.student)
    tv = ByteVocab.from_pretrained(args.teacher)
    # The student's ids are its own tokenization of the text (as if it had sampled them); the
    # teacher's ids spell the student's bytes exactly.
    s_ids = sv.encode_bytes(data)
    t_ids = tv.encode_bytes(sv.concat_bytes(s_ids))
    a = align(s_ids, t_ids, sv, tv)
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


def cmd_bench(args: argparse.Namespace) -> int:
    if args.which != "align":
        print(
            f"crossopd bench {args.which}: not implemented yet (only 'align' exists so far)",
            file=sys.stderr,
        )
        return 2
    from crossopd.bench import bench_align

    def progress(row: dict) -> None:
        if not args.json:
            base = row["baseline_tok_per_s"]
            extra = (
                f"  baseline {base / 1e6:8.3f} M tok/s  speedup {row['speedup']:6.0f}x "
                f"(median {row['speedup_median']:.0f}x)  "
                f"baseline unaligned {row['baseline_unaligned_share']:.3%}"
                if base
                else "  (baseline not found: run from a source checkout)"
            )
            print(
                f"{row['pair']:<24} {row['tokens']:>6} tok  crossopd "
                f"{row['crossopd_tok_per_s'] / 1e6:8.2f} M tok/s  unaligned "
                f"{row['unaligned_share']:.3%}{extra}",
                flush=True,
            )

    result = bench_align(quick=args.quick, progress=progress)
    if args.json:
        print(json.dumps(result))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Until the training recipe lands, the demo is a real cross-family alignment."""
    ns = argparse.Namespace(
        student="smollm2",
        teacher="gemma3-270m",
        text=DEMO_TEXT,
        file=None,
        json=args.json,
        html=args.html,
        no_color=False,
        max_rows=200,
    )
    return cmd_align(ns)


def cmd_doctor(args: argparse.Namespace) -> int:
    from crossopd.doctor import render_report, run_doctor

    report = run_doctor(args.student, args.teacher, args.teacher_template, args.teacher_stop)
    if args.json:
        print(json.dumps(report, ensure_ascii=False))
    else:
        print(render_report(report, args.student, args.teacher))
    return 0


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from crossopd.teachers.server import serve

    serve(args.model, host=args.host, port=args.port, device=args.device,
          max_batch_tokens=args.max_batch_tokens, name=args.name)
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

    b = sub.add_parser(
        "bench",
        help="benchmarks (JSON with --json)",
        description="Run a benchmark. 'align': student tokens/s of align + credit "
        "vs the decode-based baseline on three real tokenizer pairs.",
    )
    b.add_argument("which", choices=["align", "learn", "step"])
    b.add_argument("--quick", action="store_true", help="fewer sizes, shorter timing")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.set_defaults(func=cmd_bench)

    d = sub.add_parser(
        "demo",
        help="real cross-family example on the bundled models",
        description="Align a mixed-language response between SmolLM2-135M "
        "(student) and Gemma 3 270M (teacher). The training demo comes with "
        "the OPD recipe.",
    )
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.add_argument("--html", metavar="OUT", help="also write an HTML view to OUT")
    d.set_defaults(func=cmd_demo)
    doc = sub.add_parser("doctor", help="check a student/teacher pair before training",
                         description="Tokenizer kinds, byte-view round trips, alignment coverage "
                         "on sample texts, both rendered prompts, both stop markers, warnings.")
    doc.add_argument("--student", required=True, help="student " + _tokenizer_help())
    doc.add_argument("--teacher", required=True, help="teacher " + _tokenizer_help())
    doc.add_argument("--teacher-template", help="plain prompt template for a teacher without a "
                     "chat template, e.g. 'Question: {prompt}\\nAnswer:'")
    doc.add_argument("--teacher-stop", help="what ends the teacher's answer (with a plain "
                     "template), e.g. '\\n\\nQuestion:'")
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
    st.add_argument("--max-batch-tokens", type=int, default=8192)
    st.add_argument("--name", default=None, help="served model name (default: --model)")
    st.set_defaults(func=cmd_serve_teacher)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"crossopd {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
