"""``crossopd align``: the chunk alignment of one text under two tokenizers, in the terminal,
as JSON or as an HTML page."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from crossopd import bundled


def tokenizer_help() -> str:
    return (
        "tokenizer: HF directory or hub id, .gguf, tiktoken or SentencePiece .model, Tekken "
        f".json, or a bundled name ({', '.join(bundled.BUNDLED)})"
    )



def trajectory_view(args: argparse.Namespace, sv: Any, tv: Any) -> tuple[list, dict]:
    """Row ``args.row`` of the trajectory file: both sides' chat templates render it."""
    from crossopd.cli.view_trajectory import trajectory_rows
    from crossopd.models.hub import load_hf_tokenizer
    from crossopd.step.bridge import ChatFormat
    from crossopd.step.data import load_trajectories
    from crossopd.step.tool_calls import ToolSyntax

    rows = load_trajectories(args.trajectories)
    if not 0 <= args.row < len(rows):
        raise SystemExit(f"--row {args.row}: {args.trajectories} has rows 0..{len(rows) - 1}")
    s_fmt = ChatFormat.from_tokenizer(load_hf_tokenizer(args.student), name=args.student)
    t_fmt = ChatFormat.from_tokenizer(load_hf_tokenizer(args.teacher), name=args.teacher)
    return trajectory_rows(rows[args.row], ToolSyntax.of(s_fmt, args.tool_format), sv,
                           ToolSyntax.of(t_fmt, args.tool_format), tv)


def cmd_align(args: argparse.Namespace) -> int:
    from crossopd import ByteVocab
    from crossopd.cli.view import alignment_json, chunk_rows, render_html, render_terminal
    from crossopd.core.align import align_text

    sv = ByteVocab.from_pretrained(args.student)
    tv = ByteVocab.from_pretrained(args.teacher)
    if args.trajectories is not None:
        rows, stats = trajectory_view(args, sv, tv)
    else:
        data = Path(args.file).read_bytes() if args.file is not None else \
            args.text.encode("utf-8")
        s_ids, t_ids, a = align_text(data, sv, tv)
        rows = chunk_rows(a, s_ids, t_ids, sv, tv)
        stats = a.stats()
    if args.html:
        Path(args.html).write_text(
            render_html(rows, stats, args.student, args.teacher), encoding="utf-8"
        )
    if args.json:
        result = alignment_json(rows, stats, args.student, args.teacher)
        print(json.dumps(result, ensure_ascii=False), file=args.stdout)
    else:
        color = args.stdout.isatty() and not args.no_color
        print(
            f"student {args.student} ({sv.kind}, {sv.vocab_size} ids)  vs  "
            f"teacher {args.teacher} ({tv.kind}, {tv.vocab_size} ids)",
            file=args.stdout,
        )
        print(render_terminal(rows, stats, color=color, max_rows=args.max_rows), file=args.stdout)
        if args.html:
            print(f"HTML view written to {args.html}", file=args.stdout)
    return 0


def add_align_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``align`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    a = sub.add_parser(
        "align",
        help="show the chunk alignment of one text under two tokenizers",
        description="Tokenize TEXT with the student, spell the same bytes with the "
        "teacher, and show the Dual-Pointer Chunk Alignment.",
    )
    a.add_argument("--student", required=True, help="student " + tokenizer_help())
    a.add_argument("--teacher", required=True, help="teacher " + tokenizer_help())
    src = a.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="the response text")
    src.add_argument("--file", help="read the response bytes from this file (any bytes)")
    src.add_argument("--trajectories", metavar="FILE",
                     help="a JSONL/JSON file of complete tool-calling conversations (as "
                          "`doctor --data`): show row --row as the teacher scores it, each "
                          "assistant turn on its own, environment and tool-call format "
                          "stretches in their own colours (needs chat templates on both sides)")
    a.add_argument("--row", type=int, default=0, help="with --trajectories: the row (default 0)")
    a.add_argument("--tool-format", choices=("hermes",),
                   help="with --trajectories: how a side whose template has no tool-call "
                        "syntax writes a call")
    a.add_argument("--json", action="store_true", help="print one JSON object")
    a.add_argument("--html", metavar="OUT", help="also write an HTML view to OUT")
    a.add_argument("--max-rows", type=int, default=200, help="chunk rows shown in the terminal")
    a.add_argument("--no-color", action="store_true", help="no ANSI colours")
    a.set_defaults(func=cmd_align)
    return a
