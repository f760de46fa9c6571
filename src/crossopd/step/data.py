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
    tools: list[dict] | None = None  # tool definitions both templates render into the prompt

    def row(self) -> dict:
        """The example as a dataset row, TRL's layout (``prompt`` is the messages): what
        ``OPDTrainer`` trains on and what an environment's ``reset(**row)`` receives in every
        engine."""
        return {"prompt": self.messages, "answer": self.answer, "reference": self.reference,
                "teacher": self.teacher}


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


@dataclass(frozen=True)
class TrajectoryRow:
    """A complete conversation: prompt, assistant turns (content and/or ``tool_calls``) and
    environment messages, with the tool definitions both templates render."""

    messages: list[Message]
    tools: list[dict] | None = None


def is_trajectory_file(path: str) -> bool:
    """Whether the first row of a jsonl/json file is a complete conversation, ending with an
    assistant turn (a trajectory file); a multi-turn prompt ends with the user's turn."""
    rows = _json_rows(resolve_path(path), limit=1)
    messages = (rows[0].get("messages") or [{}]) if rows else [{}]
    return isinstance(messages[-1], dict) and messages[-1].get("role") == "assistant"


def load_trajectories(path: str) -> list[TrajectoryRow]:
    """Rows of a jsonl/json file of complete conversations: ``messages`` (with ``assistant``
    turns) and optional ``tools``."""
    p = resolve_path(path)
    out = []
    for i, row in enumerate(_json_rows(p)):
        messages = row.get("messages")
        if not isinstance(messages, list) or not messages:
            raise DataError(f"{p} row {i}: a trajectory row needs a 'messages' list")
        for j, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise DataError(f"{p} row {i} message {j}: needs a 'role'")
            if m["role"] == "assistant" and not m.get("content") and not m.get("tool_calls"):
                raise DataError(f"{p} row {i} message {j}: an assistant turn needs 'content' "
                                "or 'tool_calls'")
        tools = row.get("tools")
        if tools is not None and not isinstance(tools, list):
            raise DataError(f"{p} row {i}: 'tools' must be a list of tool definitions")
        out.append(TrajectoryRow([dict(m) for m in messages], tools))
    if not out:
        raise DataError(f"{p} has no rows")
    return out


def _json_rows(p: Path, limit: int | None = None) -> list[dict]:
    import json

    if not p.is_file():
        raise DataError(f"data file {p} does not exist")
    if p.suffix.lower() not in (".jsonl", ".json"):
        raise DataError(f"trajectory file {p}: use .jsonl or .json")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            rows = json.loads(text)
            rows = rows if isinstance(rows, list) else [rows]
        else:
            rows = [json.loads(line) for line in text.splitlines()[:limit] if line.strip()]
    except json.JSONDecodeError as e:
        raise DataError(f"cannot read {p} as JSON: {e}") from e
    return rows[:limit] if limit else rows

