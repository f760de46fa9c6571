"""The ``crossopd`` command line: one module per command (its arguments beside its code), put
together here. Every command has ``--help``; ``--json`` prints one object."""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings

from crossopd.cli.align import add_align_parser
from crossopd.cli.bench import add_bench_parser
from crossopd.cli.doctor import add_doctor_parser
from crossopd.cli.eval import add_eval_parser
from crossopd.cli.serve import add_serve_parser
from crossopd.cli.train import add_demo_parser, add_train_parser

COMMANDS = (add_align_parser, add_bench_parser, add_demo_parser, add_train_parser,
            add_eval_parser, add_doctor_parser, add_serve_parser)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="crossopd",
        description="On-policy distillation across LLM families (exact cross-tokenizer alignment).",
    )
    sub = p.add_subparsers(dest="command", required=True)
    for add in COMMANDS:
        add(sub)
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
    # a command prints its result to args.stdout; with --json that is one object and nothing
    # else, so whatever a library prints to stdout meanwhile (DeepSpeed announces its
    # accelerator on import) goes to stderr
    args.stdout = sys.stdout
    quiet = contextlib.redirect_stdout(sys.stderr) if getattr(args, "json", False) else None
    try:
        with quiet or contextlib.nullcontext():
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
