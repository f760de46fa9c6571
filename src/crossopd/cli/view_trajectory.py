"""One complete trajectory as the teacher scores it, for ``crossopd align --trajectories``: the
chunks of each assistant turn (its own teacher request), the environment's stretches between
the turns (never trained), and, in a turn whose tool call the teacher scores in its own syntax,
the call syntax between the equal stretches (format: no signal)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from crossopd.cli.view import ChunkRow, chunk_rows
from crossopd.core.tokens import ByteVocab
from crossopd.step.bridge import align_bridged
from crossopd.step.data import TrajectoryRow
from crossopd.step.tool_calls import ToolSyntax
from crossopd.step.trajectory import trajectory_from_messages, turn_requests


def environment_row(ids: np.ndarray, sv: ByteVocab) -> ChunkRow:
    return ChunkRow(-1, ids.tolist(), [], sv.token_bytes(ids), [], role="environment")


def trajectory_rows(row: TrajectoryRow, student: ToolSyntax, sv: ByteVocab,
                    teacher: ToolSyntax, tv: ByteVocab) -> tuple[list[ChunkRow], dict]:
    """The rows of ``row``'s trajectory in order, and its statistics over the assistant
    turns (the keys ``render_terminal`` reads, and the trajectory's counts)."""
    prompt, _, traj = trajectory_from_messages(row.messages, student.fmt, sv, student, row.tools)
    reqs = turn_requests(prompt, traj, student, sv, teacher, tv, tools=row.tools)
    rows: list[ChunkRow] = []
    totals = dict.fromkeys(("num_chunks", "one_to_one_chunks", "many_chunks", "student_bytes",
                            "aligned_student_bytes", "unaligned_student_tokens",
                            "format_tokens"), 0)
    equal, pos = True, 0
    for tr in reqs:
        if tr.start > pos:
            rows.append(environment_row(traj.ids[pos:tr.start], sv))
        req = tr.request
        a = align_bridged(req, sv, tv)
        turn = chunk_rows(a, req.student_response.tolist(),
                          req.teacher_ids[req.response_start:req.stop_end], sv, tv)
        counts = a.counts
        if tr.reformatted:  # the unaligned stretches are the two syntaxes of one call
            turn = [replace(r, role="format") if r.index < 0 else r for r in turn]
            totals["format_tokens"] += counts["unaligned_student_tokens"]
        else:
            totals["unaligned_student_tokens"] += counts["unaligned_student_tokens"]
        for k in ("one_to_one_chunks", "many_chunks", "student_bytes", "aligned_student_bytes"):
            totals[k] += counts[k]
        totals["num_chunks"] += a.num_chunks
        equal &= a.bytes_equal
        rows += turn
        pos = tr.end
    if pos < len(traj.ids):
        rows.append(environment_row(traj.ids[pos:], sv))
    n = totals["num_chunks"]
    stats = {"num_chunks": n,
             "coverage": totals["aligned_student_bytes"] / totals["student_bytes"]
             if totals["student_bytes"] else 1.0,
             "one_to_one_share": totals["one_to_one_chunks"] / n if n else 0.0,
             "many_chunks": totals["many_chunks"], "bytes_equal": equal,
             "unaligned_student_tokens": totals["unaligned_student_tokens"],
             "assistant_turns": len(reqs), "env_tokens": traj.env_tokens,
             "format_tokens": totals["format_tokens"],
             "unparsed_tool_calls": traj.unparsed_tool_calls}
    return rows, stats
