"""Files that must never be half-written: the on-disk cache, atomic directory writes, and the
JSON-lines metrics files a killed run is resumed from."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def cache_dir() -> Path:
    """Where converted tokenizers and models live (``$CROSSOPD_CACHE``, default
    ``~/.cache/crossopd``)."""
    return Path(os.environ.get("CROSSOPD_CACHE", Path.home() / ".cache" / "crossopd"))


def file_digest(path: Path) -> str:
    """The identity of a file's bytes: the same GGUF installed into a new virtual environment or
    clone keeps its cache entry (a key on path and mtime grew a 500 MB model copy per clone)."""
    st = path.stat()
    return _content_digest(str(path.resolve()), st.st_size, st.st_mtime_ns)


@functools.lru_cache(maxsize=64)
def _content_digest(path: str, size: int, mtime_ns: int) -> str:
    # size and mtime are part of the memo key only, so an edited file is hashed again.
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()[:16]


def atomic_dir_write(target: Path, write: Callable[[Path], None]) -> Path:
    """Write a directory via a temp sibling then rename, so a killed writer leaves no half cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp", dir=target.parent))
    try:
        write(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process won the race; theirs is as good as ours
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def atomic_write_text(path: Path, text: str) -> Path:
    """Write a file via a temp sibling then rename: a killed writer leaves the old file or
    none, never half of one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
    return path


def append_jsonl(path: Path, row: dict) -> None:
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")
        f.flush()


def read_jsonl(path: Path) -> list[dict]:
    if not Path(path).exists():
        return []
    rows = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:  # a line cut by a kill mid-write
            continue
    return rows


def truncate_jsonl(path: Path, step: int) -> None:
    """Keep rows up to ``step``: what a killed run wrote after its last checkpoint is redone."""
    rows = [r for r in read_jsonl(path) if r.get("step", 0) <= step]
    tmp = Path(str(path) + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    tmp.replace(path)
