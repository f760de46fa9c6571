"""Metrics to the trackers users already run (``report_to:``), written through each tracker's own
library as transformers' callbacks write them: TensorBoard event files under
``output_dir/tensorboard`` and a W&B run (``WANDB_MODE=offline`` works without a network).

Every engine logs the same two streams here, at the OPD step: each metrics row as
``opd/<key>`` and each held-out evaluation as ``eval/<key>``, numbers only (``metrics.jsonl``
and ``eval.jsonl`` stay the complete record). Engine ``trl`` also hands ``report_to`` to TRL,
which logs its own per-optimizer-step keys (``train/<key>``) into the same TensorBoard directory
and the same W&B run.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

# what crossopd writes itself; engine trl passes any other transformers tracker to TRL
OWN_TRACKERS = ("tensorboard", "wandb")
TENSORBOARD_DIR = "tensorboard"


def tracker_names(report_to: list[str]) -> list[str]:
    """The trackers asked for: ``none`` (or nothing) is none."""
    return [] if "none" in report_to else list(report_to)


def transformers_trackers() -> list[str]:
    """Every tracker name transformers' ``report_to`` accepts."""
    from transformers.integrations import INTEGRATION_TO_CALLBACK

    return sorted(INTEGRATION_TO_CALLBACK)


def scalars(row: Mapping[str, Any], prefix: str) -> dict[str, float]:
    """The finite numbers of a metrics row, keys prefixed (``step`` is the x-axis, not a
    scalar); lists, text and None are left to the JSON record."""
    return {f"{prefix}{k}": float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


class Trackers:
    """The run's open trackers (main process only); ``log`` sends one row to each."""

    def __init__(self, names: list[str], out_dir: Path, config: dict) -> None:
        self.writer: Any = None
        self.wandb: Any = None
        if "tensorboard" in names:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(log_dir=str(out_dir / TENSORBOARD_DIR))
        if "wandb" in names:
            import wandb

            # a run already open (a notebook's, or transformers' WandbCallback's) is reused, as
            # transformers does
            self.wandb = wandb.run or wandb.init(name=out_dir.name, dir=str(out_dir),
                                                 config=config)
            # crossopd's rows count OPD steps; TRL's own keys count optimizer steps
            self.wandb.define_metric("opd/step")
            for family in ("opd/*", "eval/*"):
                self.wandb.define_metric(family, step_metric="opd/step")

    def log(self, row: Mapping[str, Any], step: int, prefix: str) -> None:
        values = scalars(row, prefix)
        if self.writer is not None:
            for key, value in values.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        if self.wandb is not None:
            self.wandb.log({**values, "opd/step": step})

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        if self.wandb is not None:
            self.wandb.finish()
