"""``crossopd doctor --data FILE`` on complete tool-calling trajectories: per row, what the
teacher sees and how much of the student's assistant bytes it can judge."""

from __future__ import annotations

from typing import Any

import numpy as np

from crossopd.core.tokens import ByteVocab
from crossopd.step.bridge import ChatFormat, TemplateError, align_bridged
from crossopd.step.data import DataError, load_trajectories
from crossopd.step.tool_calls import ToolSyntax
from crossopd.step.trajectory import trajectory_from_messages, turn_requests


def trajectory_report(row: Any, student: ToolSyntax, sv: ByteVocab, teacher: ToolSyntax,
                      tv: ByteVocab, decode: Any) -> dict:
    """One conversation: its assistant turns, environment and format tokens, coverage over
    the assistant bytes, unaligned tokens outside tool-call syntax, and the teacher's whole
    input (the last turn's request, ``decode``-d with the teacher's tokenizer)."""
    prompt, _, traj = trajectory_from_messages(row.messages, student.fmt, sv, student,
                                               row.tools)
    reqs = turn_requests(prompt, traj, student, sv, teacher, tv, tools=row.tools)
    total = aligned = fmt_tokens = unaligned = 0
    turns = []
    for tr in reqs:
        a = align_bridged(tr.request, sv, tv)
        c = a.counts
        total += c["student_bytes"]
        aligned += c["aligned_student_bytes"]
        if tr.reformatted:
            fmt_tokens += c["unaligned_student_tokens"]
        else:
            unaligned += c["unaligned_student_tokens"]
        turns.append({"tokens": tr.end - tr.start, "coverage": a.coverage,
                      "tool_call": tr.reformatted})
    return {"assistant_turns": len(reqs), "env_tokens": traj.env_tokens,
            "format_tokens": fmt_tokens, "coverage": aligned / total if total else 1.0,
            "unaligned_tokens": unaligned, "unparsed_tool_calls": traj.unparsed_tool_calls,
            "turns": turns, "teacher_text": decode(reqs[-1].request.teacher_ids)}


def check_trajectories(path: str, s_fmt: ChatFormat, t_fmt: ChatFormat, sv: ByteVocab,
                       tv: ByteVocab, decode: Any, warnings: list[str],
                       tool_format: str | None = None) -> list[dict]:
    """``trajectory_report`` for every row; a row that cannot be rendered is a warning with
    its reason, and its entry holds ``error``."""
    try:
        rows = load_trajectories(path)
        student, teacher = ToolSyntax.of(s_fmt, tool_format), ToolSyntax.of(t_fmt, tool_format)
    except (DataError, TemplateError) as e:
        warnings.append(f"data: {e}")
        return []
    out = []
    for i, row in enumerate(rows):
        try:
            out.append(trajectory_report(row, student, sv, teacher, tv, decode))
        except TemplateError as e:
            warnings.append(f"data row {i}: {e}")
            out.append({"error": str(e)})
    unparsed = sum(r.get("unparsed_tool_calls", 0) for r in out)
    if unparsed:
        warnings.append(f"data: {unparsed} assistant turns look like tool calls the student's "
                        "template does not write that way: scored as written, counted")
    return out


def trajectory_lines(rows: list[dict]) -> list[str]:
    lines = [f"{'row':>4} {'turns':>5} {'env tok':>7} {'format':>6} {'unaligned':>9} "
             f"{'coverage':>8}"]
    for i, r in enumerate(rows):
        if "error" in r:
            lines.append(f"{i:>4} error: {r['error']}")
            continue
        lines.append(f"{i:>4} {r['assistant_turns']:>5} {r['env_tokens']:>7} "
                     f"{r['format_tokens']:>6} {r['unaligned_tokens']:>9} "
                     f"{r['coverage']:>8.4f}")
    covs = [r["coverage"] for r in rows if "error" not in r]
    if covs:
        lines.append(f"mean coverage over assistant bytes {float(np.mean(covs)):.4f}")
    return lines
