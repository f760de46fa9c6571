"""crossopd's sampler for verl's v1 trainer (``trainer.v1.sampler.custom_sampler``): verl's own
replay buffer, plus crossopd's per-step counts.

Each trajectory carries the counts of crossopd's teacher step (``extra_fields.crossopd_stats``:
sequences, aligned bytes, chunks, tokens without a signal by reason, overflowed sequences, the
KL sum). When the trainer samples a training batch, their sums become ``opd/<name>`` metrics
(``coverage``, ``signal_tokens``, ``kl_per_token``, ``stop_rate``, ``overflowed_sequences``, ...,
and ``opd/teachers/<name>/...`` with several teachers), logged with the step by verl's tracker.

The batch is also checked before it trains, as crossopd's own engines check theirs:
- a rollout whose agent loop failed (a teacher gone past its patience, a refused trajectory)
  stops the run: verl's sync trainer would pad it and train on, and OPD learns nothing there;
- a batch with no signal token at all (every sequence overflowed the teacher's context, say)
  stops the run: its token mean would divide by zero;
- overflowed sequences are reported on the driver's log as they happen.
"""

from __future__ import annotations

import logging
from typing import Any

import transfer_queue as tq
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from crossopd.integrations.verl.teacher_step import STATS_FIELD, opd_metrics

logger = logging.getLogger(__name__)


def batch_stats(keys: list[str], partition_id: str) -> list[dict]:
    """Each trajectory's counts from TransferQueue; a trajectory without them was not scored by
    crossopd's teacher step (one line saying so)."""
    data = tq.kv_batch_get(keys=keys, partition_id=partition_id, select_fields=["extra_fields"])
    rows = [ef.get(STATS_FIELD) if isinstance(ef, dict) else None
            for ef in list(data["extra_fields"])]
    missing = [k for k, r in zip(keys, rows) if r is None]
    if missing:
        raise RuntimeError(f"crossopd: {len(missing)} trajectories (e.g. {missing[0]}) carry no "
                           "teacher-step counts: set actor_rollout_ref.rollout.agent."
                           "agent_loop_manager_class=crossopd.integrations.verl.worker."
                           "CrossOPDAgentLoopManager")
    return rows


def check_batch(metrics: dict[str, float], failed: int, global_steps: int) -> None:
    where = f"crossopd: step {global_steps}"
    if failed:
        raise RuntimeError(f"{where}: {failed} rollout group(s) failed in the agent loop (the "
                           "error is in the agent-loop worker's log above); stopping rather than "
                           "training on padding")
    n, over = int(metrics["opd/sequences"]), int(metrics["opd/overflowed_sequences"])
    if over:
        logger.warning("%s: %d of %d sequences overflowed the teacher's context and got no "
                       "teacher signal", where, over, n)
    if metrics["opd/signal_tokens"] == 0:
        raise ValueError(f"{where}: none of the {n} sequences got a teacher signal ({over} "
                         "overflowed the teacher's context): raise the teacher's context "
                         "(crossopd.teacher.max_length, or the pool's inference.max_model_len), "
                         "shorten the prompts or lower data.max_response_length")


class CrossOPDReplayBuffer(ReplayBuffer):
    """verl's sync replay buffer; a training batch also reports crossopd's counts."""

    def sample(self, global_steps: int, partition_id: str,
               batch_size: int) -> tuple[Any, dict]:
        batch, metrics = super().sample(global_steps, partition_id, batch_size)
        if partition_id != "train":
            return batch, metrics
        # the snapshot this sample was selected from: failed groups stay in it until the next
        failed = len(self.failure_keys[partition_id])
        opd = opd_metrics(batch_stats(list(batch.keys), partition_id)) if batch.keys else {}
        opd.setdefault("opd/sequences", 0.0)
        opd.setdefault("opd/overflowed_sequences", 0.0)
        opd.setdefault("opd/signal_tokens", 0.0)
        opd["opd/failed_rollout_groups"] = float(failed)
        check_batch(opd, failed, global_steps)
        metrics.update(opd)
        return batch, metrics
