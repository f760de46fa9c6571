"""``python -m crossopd.integrations.verl.check [--data FILE] [--json]`` (in ``.venv-verl``): the
verl plugin against crossopd's native step library, on CPU, with verl's real classes.

1. Student rollouts on the bundled pair (SmolLM2-135M learns from Gemma 3 270M, the demo's
   plain teacher format), on the bundled prompts or on the ``messages``/``prompt`` rows of FILE.
2. Each rollout through ``CrossOPDAgentLoopWorker._agent_loop_postprocess`` (verl's padding and
   ``_postprocess`` batching included) and, on the same ids and rollout log-probs, through
   ``crossopd.opd.score_rollouts``: the targets and the signal mask must agree.
3. The registered ``crossopd`` loss, through verl's ``distillation_loss`` on the batch the worker
   built (log-probs moved off the rollout's, so the clip is exercised), against
   ``crossopd.loss.policy_loss``.

Prints ``sequences``, ``coverage``, ``max_abs_diff_targets``, ``mask_equal``,
``max_abs_diff_loss``, ``plugin_loaded``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

PLAIN = {"plain_template": "Question: {prompt}\nAnswer:", "stop": "\n\nQuestion:"}
TARGET_TOLERANCE = 1e-6


def plugin_loaded() -> bool:
    """``crossopd`` is in verl's registry after ``import verl`` alone (the entry point)."""
    import verl  # noqa: F401
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY

    return "crossopd" in DISTILLATION_LOSS_REGISTRY


def rollouts(examples: list, max_new_tokens: int, seed: int) -> tuple:
    """Native rollouts and their native scoring on the bundled pair."""
    from crossopd.config import RolloutConfig
    from crossopd.hub import load_hf_model, load_hf_tokenizer
    from crossopd.opd import sample_rollouts, score_rollouts
    from crossopd.scoring import score_sequences
    from crossopd.sides import StudentSide

    s_tok = load_hf_tokenizer("smollm2")
    student = StudentSide.from_model(load_hf_model("smollm2", device="cpu"), s_tok)
    step = build_step(s_tok)
    rollout = RolloutConfig(max_new_tokens=max_new_tokens)
    torch.manual_seed(seed)
    exs, prompts, responses = sample_rollouts(student, examples, rollout)
    seqs = [list(p) + r.tolist() for p, r in zip(prompts, responses)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, responses)]
    with torch.no_grad():
        old = [o.double() for o in score_sequences(student.model, seqs, spans)]
    native = score_rollouts(student, step.teachers, exs, prompts, responses,
                            old_logps=old, credit_rule=step.settings.credit_rule,
                            special_penalty=step.settings.special_token_penalty())
    return s_tok, step, exs, prompts, responses, old, native


def build_step(s_tok: Any) -> Any:
    from omegaconf import OmegaConf

    from crossopd.integrations.verl.worker import teacher_step

    # max_batch_tokens=1: the teacher scores every sequence in a forward pass of its own, in
    # the native step (which batches a step's requests) as in the worker (one sample at a
    # time), so float32 batching noise is not mistaken for a difference in the targets
    config = OmegaConf.create({"crossopd": {"teacher": {"model": "gemma3-270m", **PLAIN},
                                            "max_batch_tokens": 1}})
    return teacher_step(config, s_tok)


def worker_batch(s_tok: Any, step: Any, exs: list, prompts: list, responses: list,
                 old: list) -> Any:
    """The rollouts through the verl worker's postprocessing, batched by verl."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.hub import load_hf_tokenizer
    from crossopd.integrations.verl.worker import CrossOPDAgentLoopWorker

    # verl loads the student's tokenizer with a pad token (its EOS when it has none)
    s_tok = load_hf_tokenizer(s_tok.name_or_path)
    if s_tok.pad_token_id is None:
        s_tok.pad_token = s_tok.eos_token
    # a worker without its Ray servers: the attributes postprocessing reads
    worker = object.__new__(CrossOPDAgentLoopWorker)
    worker.opd, worker.tokenizer, worker.processor = step, s_tok, None
    worker.rollout_config = SimpleNamespace(prompt_length=max(map(len, prompts)),
                                            response_length=max(map(len, responses)))
    worker.reward_loop_worker_handles, worker.mm_processor_kwargs = None, {}
    worker.distillation_enabled = False

    async def one(ex: Any, p: list, r: np.ndarray, o: torch.Tensor) -> Any:
        out = AgentLoopOutput(prompt_ids=list(p), response_ids=r.tolist(),
                              response_mask=[1] * len(r), response_logprobs=o.tolist(),
                              num_turns=2, metrics=AgentLoopMetrics())
        raw = np.empty(len(ex.messages), dtype=object)
        raw[:] = ex.messages
        return await worker._agent_loop_postprocess(out, validate=False, raw_prompt=raw)

    async def every() -> list:
        return [await one(*x) for x in zip(exs, prompts, responses, old)]

    return worker._postprocess(asyncio.run(every()))


def compare_targets(batch: Any, native: Any) -> tuple[float, bool]:
    width = batch.batch["prompts"].shape[1]
    diff, equal = 0.0, True
    for i, (q, signal) in enumerate(zip(native.targets, native.signal)):
        n = len(q)
        mask = batch.batch["response_mask"][i, :n].bool()
        equal &= bool(torch.equal(mask, signal)) and not batch.batch["response_mask"][i, n:].any()
        ours = batch.batch["teacher_logprobs"][i, width - 1: width - 1 + n, 0].double()
        if signal.any():
            diff = max(diff, float((ours[signal] - q[signal]).abs().max()))
    return diff, equal


def loss_parity(batch: Any, old: list, seed: int) -> float:
    """verl's distillation loss with ``loss_mode=crossopd`` on the worker's batch against
    crossopd's ``policy_loss`` on the same numbers."""
    from tensordict import TensorDict
    from verl.trainer.distillation.losses import distillation_loss
    from verl.utils.tensordict_utils import assign_non_tensor
    from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

    from crossopd.loss import LossConfig, advantages, policy_loss

    b = batch.batch
    width, resp = b["prompts"].shape[1], b["responses"].shape[1]
    gen = torch.Generator().manual_seed(seed)
    current = [o + 0.3 * torch.randn(len(o), generator=gen, dtype=torch.float64) for o in old]
    old_pad = torch.zeros(len(old), resp, dtype=torch.float64)
    values, teacher = [], []
    for i, (o, lp) in enumerate(zip(old, current)):
        keep = b["attention_mask"][i].bool()
        # verl's unpadded model output: row t is the log-prob of token t + 1
        row = torch.zeros(int(keep.sum()), dtype=torch.float64)
        n_prompt = int(keep[:width].sum())
        row[n_prompt - 1: n_prompt - 1 + len(lp)] = lp
        values.append(row)
        teacher.append(b["teacher_logprobs"][i][keep])
        old_pad[i, : len(o)] = o
    mask = b["response_mask"].bool()
    # the unpadded teacher rows are not batch-shaped: a TensorDict without batch dimensions
    data = TensorDict({"prompts": b["prompts"], "responses": b["responses"],
                       "attention_mask": b["attention_mask"], "response_mask": mask,
                       "old_log_probs": old_pad, "teacher_logprobs": torch.cat(teacher)},
                      batch_size=[])
    assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()),
                      global_batch_size=len(old))
    actor = ActorConfig(strategy="fsdp", ppo_mini_batch_size=len(old), rollout_n=1,
                        ppo_micro_batch_size_per_gpu=len(old), clip_ratio_c=10.0,
                        loss_agg_mode="token-mean")
    dist = DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode="crossopd", use_policy_gradient=False, loss_max_clamp=None,
        clip_ratio_low=0.2, clip_ratio_high=0.28))
    got, _ = distillation_loss(actor, dist, {"log_probs": torch.cat(values)}, data)
    q = [b["teacher_logprobs"][i, width - 1: width - 1 + len(o), 0].double()
         for i, o in enumerate(old)]
    q = [torch.where(mask[i, : len(o)], qi, torch.tensor(float("nan"), dtype=torch.float64))
         for i, (qi, o) in enumerate(zip(q, old))]
    adv_valid = [advantages(qi, o) for qi, o in zip(q, old)]
    want, _ = policy_loss(torch.cat(current), torch.cat(old),
                          torch.cat([a for a, _ in adv_valid]),
                          torch.cat([v for _, v in adv_valid]), LossConfig(0.2, 0.28, 10.0))
    return abs(float(got) - float(want))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crossopd.integrations.verl.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="JSONL/JSON/Parquet with `messages` or `prompt` rows "
                   "(default: the bundled prompts)")
    p.add_argument("--limit", type=int, default=8, help="rollouts to check (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    from crossopd.hub import quiet_hf
    from crossopd.prompts import load_examples

    quiet_hf()
    loaded = plugin_loaded()
    examples = load_examples(args.data or "bundled:counts")[: args.limit]
    s_tok, step, exs, prompts, responses, old, native = rollouts(
        examples, args.max_new_tokens, args.seed)
    batch = worker_batch(s_tok, step, exs, prompts, responses, old)
    diff, equal = compare_targets(batch, native)
    result = {"sequences": len(exs), "coverage": native.stats["coverage"],
              "signal_tokens": native.stats["signal_tokens"],
              "max_abs_diff_targets": diff, "mask_equal": equal,
              "max_abs_diff_loss": loss_parity(batch, old, args.seed),
              "plugin_loaded": loaded}
    ok = loaded and equal and diff <= TARGET_TOLERANCE and result["max_abs_diff_loss"] <= 1e-9
    result["ok"] = ok
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<22} {v}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
