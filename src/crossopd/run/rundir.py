"""Run directories that cannot be destroyed by accident: a new run refuses a directory that holds
one unless told to overwrite it, and ``--resume`` refuses a config that would make the continued
run a different run than the one its checkpoints came from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

# What may change between a run and its resumption: how long it runs, how often it evaluates and
# saves, where the teacher server lives, and how work is batched (none of which changes what
# the continued run computes). Everything else must be equal.
RESUMABLE_KEYS = frozenset({
    "steps", "eval_every", "checkpoint_every", "keep_checkpoints", "device", "max_batch_tokens",
    "output_dir", "teacher.urls", "teacher.timeout", "teacher.retries", "teacher.api_key",
    "teacher.patience_s",
})
RUN_FILES = ("metrics.jsonl", "eval.jsonl", "checkpoints", "final", "report.html")


class RunDirError(ValueError):
    """The output directory and the requested start do not fit together."""


def existing_run(out_dir: Path) -> list[str]:
    """What of a previous run ``out_dir`` holds (empty: nothing to lose). TRL's own checkpoint
    directories count too."""
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    found += sorted(p.name for p in out_dir.glob("checkpoint-*"))[:3]
    return found


def prepare(out_dir: Path, config: dict, resume: bool, overwrite: bool) -> None:
    """Check the directory against the start mode, clear it when overwriting, write
    ``config.json``. Call before loading any model."""
    if resume and overwrite:
        raise RunDirError("--resume continues the run in output_dir and --overwrite deletes it: "
                          "choose one")
    found = existing_run(out_dir)
    if resume:
        saved = out_dir / "config.json"
        if saved.exists():
            changed = config_changes(json.loads(saved.read_text()), config)
            if changed:
                raise RunDirError(
                    f"--resume with a different config: {'; '.join(changed)}. These change what "
                    f"the run computes; only {', '.join(sorted(RESUMABLE_KEYS))} may change. "
                    "Put the old values back, or start a new run in another output_dir")
    elif found and not overwrite:
        raise RunDirError(
            f"{out_dir} already holds a run ({', '.join(found)}): continue it with --resume, "
            "start over with --overwrite (deletes it), or set output_dir=... for a new run")
    elif found:
        for name in RUN_FILES:
            path = out_dir / name
            shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
        for path in out_dir.glob("checkpoint-*"):
            shutil.rmtree(path, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))


def config_changes(old: dict, new: dict) -> list[str]:
    """``key: old -> new`` for every leaf that differs and may not change on resume. Keys only
    one side has (a config saved by another crossopd version) are not compared."""
    a, b = _flatten(old), _flatten(new)
    return [f"{k}: {a[k]!r} -> {b[k]!r}" for k in sorted(set(a) & set(b))
            if a[k] != b[k] and _as_teacher_key(k) not in RESUMABLE_KEYS]


def _as_teacher_key(key: str) -> str:
    """``teachers.<name>.urls`` may change like ``teacher.urls``."""
    parts = key.split(".")
    return "teacher." + ".".join(parts[2:]) if parts[0] == "teachers" and len(parts) > 2 else key


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        if isinstance(v, dict) and k != "trl":  # the trl passthrough compares as one value
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out
