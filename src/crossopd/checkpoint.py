"""Checkpoints that never lose work: written to a temp dir then renamed, the last N kept, and a
resume that restores model, optimiser, scheduler and every RNG, so a killed run continues
exactly."""

from __future__ import annotations

import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.files import atomic_dir_write


def _dir(out_dir: Path) -> Path:
    return Path(out_dir) / "checkpoints"


def save(out_dir: Path, step: int, model: Any, optimizer: Any, scheduler: Any,
         keep: int) -> Path:
    def write(tmp: Path) -> None:
        model.save_pretrained(str(tmp))
        torch.save({
            "step": step,
            "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(),
            "rng": {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
                    "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []},
        }, tmp / "trainer_state.pt")

    target = atomic_dir_write(_dir(out_dir) / f"step_{step:07d}", write)
    for old in completed(out_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return target


def completed(out_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (a temp dir of a killed writer is ignored)."""
    d = _dir(out_dir)
    if not d.exists():
        return []
    return sorted(p for p in d.iterdir() if p.name.startswith("step_") and ".tmp" not in p.name
                  and (p / "trainer_state.pt").exists())


def restore_latest(out_dir: Path, model: Any, optimizer: Any, scheduler: Any) -> int:
    ckpts = completed(out_dir)
    if not ckpts:
        raise FileNotFoundError(f"--resume: no checkpoint under {_dir(out_dir)}; start without "
                                "--resume")
    path = ckpts[-1]
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
