"""Checkpoints that never lose work: written to a temp dir then renamed, the last N kept, a
SHA-256 of every file written alongside, and a resume that restores model, optimiser, scheduler
and every RNG, so a killed run continues exactly. A checkpoint whose files no longer match their
digests (truncated, corrupted) is skipped with a warning for the one before it."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.files import atomic_dir_write

DIGESTS = "digests.json"


def _dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def step_dir(out_dir: Path, step: int) -> Path:
    return _dir(out_dir) / f"step_{step:07d}"


def save(out_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
         keep: int, tokenizer: Any = None, rng: dict | None = None) -> Path:
    """``checkpoints/step_N``: an HF model directory (with the tokenizer and its chat template,
    so it loads as ``student.model`` or with ``from_pretrained``) plus the trainer state."""
    rng = rng_state() if rng is None else rng

    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        torch.save({"step": step, "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": rng}, tmp / "trainer_state.pt")
        write_digests(tmp)

    try:
        target = atomic_dir_write(step_dir(out_dir, step), write)
    except (OSError, RuntimeError) as e:  # disk full (torch.save raises RuntimeError), quota,
        # permissions: the temp dir is gone and the previous checkpoint untouched
        previous = completed(out_dir)
        kept = f"step {previous[-1].name.split('_')[1].lstrip('0')}" if previous else "none"
        free = shutil.disk_usage(_dir(out_dir)).free // 2**20
        reason = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise RuntimeError(f"could not write the checkpoint of step {step} under "
                           f"{_dir(out_dir)} ({reason}; {free} MiB free there); the previous "
                           f"checkpoint ({kept}) is intact: free space, then --resume") from e
    for old in completed(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def rng_state() -> dict:
    """Every RNG a step draws from, to store with a checkpoint."""
    return {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
            "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def write_digests(path: Path) -> None:
    """``digests.json``: the SHA-256 of every file under ``path`` (names relative to it), so a
    resume can tell a complete checkpoint from a truncated or corrupted one."""
    files = sorted(p for p in Path(path).rglob("*") if p.is_file() and p.name != DIGESTS)
    digests = {p.relative_to(path).as_posix(): sha256(p) for p in files}
    (Path(path) / DIGESTS).write_text(json.dumps(digests, indent=1))


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def verify(path: Path) -> str | None:
    """Why checkpoint ``path`` cannot be trusted, or None. Checkpoints from before digests were
    written pass unverified."""
    listing = path / DIGESTS
    if not listing.exists():
        return None
    try:
        digests = json.loads(listing.read_text())
    except ValueError:
        return f"{DIGESTS} is unreadable"
    for name, digest in digests.items():
        f = path / name
        if not f.exists():
            return f"{name} is missing"
        if sha256(f) != digest:
            return f"{name} does not match its digest (truncated or corrupted)"
    return None


def save_final(out_dir: Path, model: Any, tokenizer: Any, state_dict: dict | None = None,
               base: Any = None) -> Path:
    """``out_dir/final``: the trained student as a complete HF model directory (weights, config,
    generation config, tokenizer, chat template) for ``AutoModelForCausalLM``, ``AutoTokenizer``
    and ``vllm serve``; written atomically. A PEFT model is saved merged (it loads without
    peft), its adapter in ``final/adapter``.

    ``state_dict``: the gathered weights when ``model`` holds only this process's shard
    (ZeRO-3, FSDP); a sharded PEFT model's adapter is then merged into ``base`` (the student's
    source) loaded afresh."""
    def write(tmp: Path) -> None:
        if hasattr(model, "merge_and_unload"):
            model.save_pretrained(str(tmp / "adapter"), state_dict=state_dict)
            if state_dict is None:
                merged = model.merge_and_unload()
            else:
                from peft import PeftModel

                from crossopd.models.hub import load_hf_model

                merged = PeftModel.from_pretrained(load_hf_model(base),
                                                   str(tmp / "adapter")).merge_and_unload()
            merged.save_pretrained(str(tmp))
        else:
            model.save_pretrained(str(tmp), state_dict=state_dict)
        tokenizer.save_pretrained(str(tmp))

    target = Path(out_dir) / "final"
    aside = target.with_name("final.old")
    if target.exists():  # a resumed run's earlier final: kept aside until the new one is in place
        shutil.rmtree(aside, ignore_errors=True)
        os.replace(target, aside)
    atomic_dir_write(target, write)
    shutil.rmtree(aside, ignore_errors=True)
    return target


def completed(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a temp dir of a killed writer is ignored)."""
    d = _dir(out_dir)
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("step_") and ".tmp" not in p.name
                  and (p / "trainer_state.pt").exists())


def restore_latest(out_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    """Restore the newest checkpoint that verifies (older ones when it does not, with a
    warning); returns its step."""
    ckpts = completed(out_dir)
    if not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint under {_dir(out_dir)}; start without "
                                "--resume")
    for path in reversed(ckpts):
        problem = verify(path)
        if problem is None:
            break
        warnings.warn(f"checkpoint {path} is damaged ({problem}): resuming from the one "
                      "before it", stacklevel=2)
    else:
        raise RuntimeError(f"--resume: every checkpoint under {_dir(out_dir)} is damaged; "
                           "start over with --overwrite")
    from safetensors.torch import load_model

    load_model(model, str(path / "model.safetensors"))
    state = torch.load(path / "trainer_state.pt", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    rng = state["rng"]
    torch.set_rng_state(rng["torch"])
    np.random.set_state(rng["numpy"])
    random.setstate(rng["python"])
    if rng["cuda"]:
        torch.cuda.set_rng_state_all(rng["cuda"])
    return int(state["step"])
