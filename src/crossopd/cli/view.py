"""Human views of an alignment: chunk rows for the terminal, an HTML page, a JSON document."""

from __future__ import annotations

import html
from dataclasses import dataclass

import numpy as np

from crossopd.core.align import Alignment
from crossopd.core.tokens import ByteVocab


@dataclass(frozen=True)
class ChunkRow:
    index: int  # -1 for an unaligned stretch
    student_ids: list[int]
    teacher_ids: list[int]
    student_pieces: list[bytes]
    teacher_pieces: list[bytes]
    # in a trajectory: "environment" (tokens the student did not write, never trained) or
    # "format" (a tool call's syntax where the teacher scores its own: no signal)
    role: str | None = None

    @property
    def kind(self) -> str:
        if self.role is not None:
            return self.role
        if self.index < 0:
            return "unaligned"
        return "1:1" if len(self.student_ids) == 1 and len(self.teacher_ids) == 1 else "m:n"

    @property
    def text(self) -> str:
        return show_bytes(b"".join(self.student_pieces or self.teacher_pieces))


def show_bytes(b: bytes) -> str:
    """Text where bytes are valid UTF-8, ``\\xNN`` escapes where they are not."""
    return b.decode("utf-8", "backslashreplace")


def chunk_rows(
    a: Alignment,
    student_ids: list[int],
    teacher_ids: list[int],
    sv: ByteVocab,
    tv: ByteVocab,
) -> list[ChunkRow]:
    """One row per chunk in order; unaligned student/teacher tokens grouped into their own rows."""
    s_ids, t_ids = np.asarray(student_ids), np.asarray(teacher_ids)
    s_pieces, t_pieces = sv.token_bytes(s_ids), tv.token_bytes(t_ids)
    s_bounds = _run_bounds(a.student_chunk)
    t_bounds = _run_bounds(a.teacher_chunk)
    rows: list[ChunkRow] = []
    si = ti = 0
    for c in range(a.num_chunks):
        s0, s1 = s_bounds[c]
        t0, t1 = t_bounds[c]
        if si < s0 or ti < t0:  # unaligned stretch before this chunk
            rows.append(
                ChunkRow(
                    -1,
                    s_ids[si:s0].tolist(),
                    t_ids[ti:t0].tolist(),
                    s_pieces[si:s0],
                    t_pieces[ti:t0],
                )
            )
        rows.append(
            ChunkRow(
                c, s_ids[s0:s1].tolist(), t_ids[t0:t1].tolist(), s_pieces[s0:s1], t_pieces[t0:t1]
            )
        )
        si, ti = s1, t1
    if si < len(s_ids) or ti < len(t_ids):
        rows.append(
            ChunkRow(-1, s_ids[si:].tolist(), t_ids[ti:].tolist(), s_pieces[si:], t_pieces[ti:])
        )
    return rows


def _run_bounds(chunk: np.ndarray) -> dict[int, tuple[int, int]]:
    """(first, last + 1) token index of every chunk; chunks are contiguous runs."""
    idx = np.flatnonzero(chunk >= 0)
    if idx.size == 0:
        return {}
    ids = chunk[idx]
    first = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    last = np.r_[first[1:], ids.size] - 1
    return {int(ids[f]): (int(idx[f]), int(idx[g]) + 1) for f, g in zip(first, last)}


def _pieces(pieces: list[bytes]) -> str:
    return " ".join(
        "[" + show_bytes(p).replace("\n", "\\n").replace("\t", "\\t").replace("\r", "\\r") + "]"
        if p
        else "[<special>]"
        for p in pieces
    )


# the kinds of row and their colours: terminal escape, HTML class, HTML background
KINDS = {"1:1": ("\x1b[2m", "one", None), "m:n": ("\x1b[33m", "many", "#fff3b0"),
         "unaligned": ("\x1b[31m", "un", "#ffc9c9"),
         "environment": ("\x1b[36m", "env", "#e3e3e3"), "format": ("\x1b[34m", "fmt", "#cfe2ff")}
LEGEND = {"many": "m:n chunk", "un": "unaligned", "env": "environment (never trained)",
          "fmt": "tool-call syntax the teacher scores in its own (no signal)"}


def render_terminal(rows: list[ChunkRow], stats: dict, color: bool, max_rows: int = 200) -> str:
    reset = "\x1b[0m" if color else ""
    trajectory = "".join(f"  {k.replace('_', ' ')} {stats[k]}" for k in
                         ("assistant_turns", "env_tokens", "format_tokens") if k in stats)
    out = [
        f"chunks {stats['num_chunks']}  coverage {stats['coverage']:.4f}  "
        f"1:1 share {stats['one_to_one_share']:.3f}  m:n chunks {stats['many_chunks']}  "
        f"unaligned student tokens {stats['unaligned_student_tokens']}  "
        f"bytes equal {stats['bytes_equal']}{trajectory}",
        f"{'chunk':>6}  {'kind':<11}  student pieces  ||  teacher pieces",
    ]
    for row in rows[:max_rows]:
        tint = KINDS[row.kind][0] if color else ""
        label = "-" if row.index < 0 else str(row.index)
        out.append(
            f"{tint}{label:>6}  {row.kind:<11}  {_pieces(row.student_pieces)}  ||  "
            f"{_pieces(row.teacher_pieces)}{reset}"
        )
    if len(rows) > max_rows:
        out.append(f"... {len(rows) - max_rows} more rows (use --max-rows or --html for all)")
    return "\n".join(out)


def render_html(rows: list[ChunkRow], stats: dict, student: str, teacher: str) -> str:
    spans, table = [], []
    for row in rows:
        cls = KINDS[row.kind][1]
        tip = f"student: {_pieces(row.student_pieces)}\nteacher: {_pieces(row.teacher_pieces)}"
        spans.append(
            f'<span class="{cls}" title="{html.escape(tip)}">{html.escape(row.text)}</span>'
        )
        table.append(
            f'<tr class="{cls}"><td>{"-" if row.index < 0 else row.index}</td><td>{row.kind}</td>'
            f"<td>{html.escape(_pieces(row.student_pieces))}</td>"
            f"<td>{html.escape(_pieces(row.teacher_pieces))}</td></tr>"
        )
    summary = ", ".join(
        f"{k}: {v:.4f}" if isinstance(v, float) else f"{k}: {v}" for k, v in stats.items()
    )
    shown = {KINDS[r.kind][1] for r in rows}
    styles = " ".join(f".{c} {{ background: {bg}; }}" for _, c, bg in KINDS.values() if bg)
    legend = ", ".join(f'<span class="{c}">{LEGEND[c]}</span>' for c in LEGEND
                       if c in shown or c in ("many", "un"))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>crossopd alignment</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2em; }}
.text {{ white-space: pre-wrap; font-family: monospace; line-height: 1.9; }}
.text span {{ border: 1px solid #ccc; border-radius: 3px; padding: 0 1px; margin: 0 1px; }}
{styles}
table {{ border-collapse: collapse; font-family: monospace; margin-top: 2em; }}
td, th {{ border: 1px solid #ddd; padding: 2px 6px; text-align: left; white-space: pre; }}
</style></head><body>
<h1>Chunk alignment</h1>
<p>student <b>{html.escape(student)}</b> vs teacher <b>{html.escape(teacher)}</b></p>
<p>{html.escape(summary)}</p>
<p>Each box is one chunk (hover for the pieces); {legend}.</p>
<div class="text">{"".join(spans)}</div>
<table><tr><th>chunk</th><th>kind</th><th>student pieces</th><th>teacher pieces</th></tr>
{"".join(table)}
</table></body></html>
"""


def alignment_json(rows: list[ChunkRow], stats: dict, student: str, teacher: str) -> dict:
    return {
        "student": student,
        "teacher": teacher,
        **stats,
        "chunks": [
            {
                "index": r.index,
                "kind": r.kind,
                "text": r.text,
                "student_ids": r.student_ids,
                "teacher_ids": r.teacher_ids,
                "student_pieces": [show_bytes(p) for p in r.student_pieces],
                "teacher_pieces": [show_bytes(p) for p in r.teacher_pieces],
            }
            for r in rows
        ],
    }
