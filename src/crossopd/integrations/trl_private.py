"""Every call crossopd makes into TRL's private API, in one place.

TRL 1.16 has no public hook for per-token advantages, so ``OPDTrainer`` needs these private
pieces of ``GRPOTrainer``: the method that samples and scores a generation batch (overridden to
put crossopd's advantages in), the sampler under it and its tool loop (wrapped to keep the
conversations of a tool-calling batch: the prompts after the environments' ``reset``, the tool
messages, the tool mask and the tool-call counts), the per-token log-prob helper (the rollout
log-probs when TRL skips them on-policy), each rollout's tools, the metrics buffer its logs
read, and the checkpoint writer (the teacher-patience checkpoint). ``check_private_api``
compares their signatures with the ones this module was written against and fails loudly,
naming the TRL version, when they changed.
"""

from __future__ import annotations

import copy
import inspect
import time
from typing import Any

import torch
from trl import GRPOTrainer

SUPPORTED = "trl>=1.16,<1.17"

# method name -> the leading parameters (after self) crossopd passes
SIGNATURES: dict[str, tuple[str, ...]] = {
    "_generate_and_score_completions": ("inputs",),
    "_generate": ("prompts",),
    "_tool_call_loop": ("prompts", "prompt_ids", "completion_ids", "completions", "logprobs"),
    "_get_per_token_logps_and_entropies": ("model", "input_ids", "attention_mask",
                                           "logits_to_keep", "batch_size"),
    "_save_checkpoint": ("model", "trial"),
}


class TRLPrivateAPIError(ImportError):
    """The installed TRL's private API is not the one crossopd's TRL engine was written for."""


def check_private_api(trainer_cls: type = GRPOTrainer) -> None:
    """Raise ``TRLPrivateAPIError`` (one line, with the fix) when a private method crossopd
    calls is missing or takes other parameters."""
    import trl

    for name, expected in SIGNATURES.items():
        method = getattr(trainer_cls, name, None)
        if method is None:
            raise TRLPrivateAPIError(f"TRL {trl.__version__}: GRPOTrainer.{name} is gone; "
                                     f"crossopd's TRL engine needs {SUPPORTED}")
        params = tuple(inspect.signature(method).parameters)[1:1 + len(expected)]
        if params != expected:
            raise TRLPrivateAPIError(
                f"TRL {trl.__version__}: GRPOTrainer.{name} takes ({', '.join(params)}), not "
                f"({', '.join(expected)}); crossopd's TRL engine needs {SUPPORTED}")


class GRPOHooks(GRPOTrainer):
    """``GRPOTrainer`` with its sampling step opened up: ``score_batch(out, inputs, seconds)``
    sees every generation batch right after TRL sampled it (in ``seconds``) and returns it with
    the advantages it wants."""

    # the last batch's conversations: each rollout's prompt messages as sampled (after an
    # environment's reset text), its completion messages (assistant turns, tool results) and
    # its tool mask (1 on sampled tokens) before TRL zeroes the rows it masks as truncated
    last_prompts: list[list[dict]] = []
    last_completions: list[list[dict]] = []
    last_tool_masks: list[list[int]] | None = None
    last_tool_counts: tuple[int, int] = (0, 0)  # this process's tool calls, failed calls

    def score_batch(self, out: dict, inputs: list[dict], rollout_s: float) -> dict:
        raise NotImplementedError

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        return self.score_batch(out, inputs, time.perf_counter() - t0)

    def _generate(self, prompts: list) -> tuple:
        self.last_prompts = copy.deepcopy(prompts)  # TRL's tool loop appends to its own copy
        result = super()._generate(prompts)
        self.last_tool_masks, self.last_completions = result[2], result[3]
        return result

    def _tool_call_loop(self, *args: Any) -> tuple:
        result = super()._tool_call_loop(*args)
        self.last_tool_counts = (int(result[4]), int(result[5]))
        return result


def rollout_tools(trainer: GRPOTrainer, n: int) -> list[list[Any]]:
    """The tools each of the batch's ``n`` rollouts was prompted with (with environments, the
    standalone tools and its environment's methods), in the order TRL renders them."""
    envs = getattr(trainer, "environment_factories", None)
    if envs is None:
        return [list(trainer.tools)] * n
    return [list(trainer._env_tools[name]) for name in trainer._batch_environments]


def rollout_logps(trainer: GRPOTrainer, out: dict) -> torch.Tensor:
    """Per-token log-probs ``[B, T]`` of the completions in ``out`` under the trainer's model,
    in the shape TRL's own ``old_per_token_logps`` has."""
    c_ids, c_mask = out["completion_ids"], out["completion_mask"]
    with torch.no_grad():
        return trainer._get_per_token_logps_and_entropies(
            trainer.model, torch.cat([out["prompt_ids"], c_ids], 1),
            torch.cat([out["prompt_mask"], c_mask], 1), c_ids.size(1),
            batch_size=trainer.args.per_device_train_batch_size)[0]


def log_metrics(trainer: GRPOTrainer, stats: dict[str, float], prefix: str) -> None:
    """Values for TRL's next log line (averaged over its logging interval, like its own)."""
    mode = "train" if trainer.model.training else "eval"
    for k, v in stats.items():
        trainer._metrics[mode][prefix + k].append(float(v))


def save_checkpoint(trainer: Any) -> None:
    """TRL's ``checkpoint-<global_step>`` now (model, optimizer, scheduler, RNG states), as its
    save strategy would write it."""
    trainer._save_checkpoint(trainer.model, trial=None)
