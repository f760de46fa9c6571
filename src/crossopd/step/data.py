"""Prompts for training and evaluation: local jsonl/json/parquet files (through ``datasets``)
with a ``messages`` or ``prompt`` column and an optional answer column, or the bundled set."""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from crossopd.step.bridge import Message


class DataError(ValueError):
    """The prompt data cannot be used; the message names the file, row and column."""


@dataclass(frozen=True)
class Example:
    messages: list[Message]
    answer: str | None = None
    reference: str | None = None  # teacher-only context
    teacher: str | None = None  # the teacher that scores it (None: the run's first)


def resolve_path(path: str) -> Path:
    if path.startswith("bundled:"):
        name = path.split(":", 1)[1]
        p = Path(str(files("crossopd").joinpath("data", f"{name}.jsonl")))
        if not p.exists():
            have = ", ".join(sorted(q.stem for q in p.parent.glob("*.jsonl")))
            raise DataError(f"no bundled prompt set {name!r} (have: {have})")
        return p
    return Path(path).expanduser()


def load_examples(path: str, answer_column: str = "answer",
                  reference_column: str | None = None,
                  teacher_column: str | None = "teacher") -> list[Example]:
    """Rows of ``path`` as examples; ``teacher_column`` (when the file has it) names each row's
    teacher."""
    p = resolve_path(path)
    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    suffix = p.suffix.lower()
    fmt = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}.get(suffix)
    if fmt is None:
        raise DataError(f"data file {p}: use .jsonl, .json or .parquet (got {suffix or 'none'})")
    try:
        from datasets import load_dataset

        ds = load_dataset(fmt, data_files=str(p), split="train")
    except Exception as e:  # noqa: BLE001 - datasets raises many kinds for unreadable files
        raise DataError(f"cannot read {p} as {fmt}: {type(e).__name__}: {e}") from e
    cols = set(ds.column_names)
    if not cols & {"messages", "prompt"}:
        raise DataError(f"{p} needs a 'messages' or 'prompt' column; it has: {sorted(cols)}")
    if reference_column and reference_column not in cols:
        raise DataError(f"{p} has no column {reference_column!r} (teacher.reference_column)")
    out = []
    for i, row in enumerate(ds):
        if "messages" in cols and row.get("messages"):
            messages = [{"role": m["role"], "content": m["content"]} for m in row["messages"]]
        else:
            prompt = row.get("prompt")
            if not isinstance(prompt, str) or not prompt.strip():
                raise DataError(f"{p} row {i}: empty prompt")
            messages = [{"role": "user", "content": prompt}]
        if not messages or not any(m["content"].strip() for m in messages if m["role"] == "user"):
            raise DataError(f"{p} row {i}: no non-empty user message")
        answer = row.get(answer_column) if answer_column in cols else None
        ref = row.get(reference_column) if reference_column else None
        teacher = row.get(teacher_column) if teacher_column in cols else None
        out.append(Example(messages, None if answer is None else str(answer),
                           None if ref is None else str(ref),
                           None if teacher is None else str(teacher)))
    if not out:
        raise DataError(f"{p} has no rows")
    return out
