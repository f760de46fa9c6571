"""``python -m crossopd.integrations.verl.check [--data FILE] [--json]`` (in ``.venv-verl``): the
verl plugin's pieces against crossopd's native step library, on CPU, with verl's real classes
and no Ray (``smoke`` runs the whole trainer).

1. Student rollouts on the bundled pair (SmolLM2-135M learns from Gemma 3 270M, the demo's
   plain teacher format), on the bundled prompts or on the ``messages``/``prompt`` rows of FILE,
   scored natively (``crossopd.step.score.score_rollouts``).
2. Each rollout as verl's ``AgentLoopOutput`` through the worker's teacher step
   (``TeacherStep.run``) in both modes: ``pool`` writes the targets into the teacher fields,
   ``advantage`` returns the per-token advantage; both trim the response mask. Targets,
   advantages and the signal mask must be the native step's.
3. Both losses through verl's own code on those samples (log-probs moved off the rollout's, so
   the clip is exercised): the ``crossopd`` distillation loss through verl's
   ``distillation_loss``, and the advantage through verl's ``compute_advantage`` (the
   ``crossopd`` estimator) into verl's ``ppo_loss`` (the ``crossopd`` policy loss); each against
   ``crossopd.step.loss.policy_loss``.

Prints ``sequences``, ``coverage``, ``max_abs_diff_targets``, ``max_abs_diff_advantages``,
``mask_equal``, ``max_abs_diff_loss`` (the distillation loss), ``max_abs_diff_policy_loss``,
``plugin_loaded``; exits 1 when a check fails.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from dataclasses import replace
from typing import Any

import torch

PLAIN = {"plain_template": "Question: {prompt}\nAnswer:", "stop": "\n\nQuestion:"}
TARGET_TOLERANCE = 1e-6
LOSS_TOLERANCE = 1e-9
# the advantage travels as verl's token-level reward, a float32 tensor: |A| <= 10 rounds by up
# to 6e-7 per token (the native step keeps float64)
POLICY_LOSS_TOLERANCE = 1e-6


def plugin_loaded() -> bool:
    """crossopd is in every verl registry it extends after ``import verl`` alone."""
    import verl  # noqa: F401
    from verl.plugin.platform import PlatformRegistry
    from verl.trainer.distillation.losses import DISTILLATION_LOSS_REGISTRY
    from verl.trainer.ppo.core_algos import ADV_ESTIMATOR_REGISTRY, POLICY_LOSS_REGISTRY
    from verl.workers.rollout.replica import RolloutReplicaRegistry

    return ("crossopd" in DISTILLATION_LOSS_REGISTRY and "crossopd" in POLICY_LOSS_REGISTRY
            and "crossopd" in ADV_ESTIMATOR_REGISTRY and PlatformRegistry.get("cpu") is not None
            and "hf" in RolloutReplicaRegistry._registry)


def student_of(model: str, tool_format: str | None) -> Any:
    from crossopd.models.hub import load_hf_model, load_hf_tokenizer
    from crossopd.step.sides import StudentSide

    tok = load_hf_tokenizer(model)
    return replace(StudentSide.from_model(load_hf_model(model, device="cpu"), tok),
                   tool_format=tool_format)


def rollout_logps(student: Any, prompts: list, responses: list) -> list[torch.Tensor]:
    from crossopd.models.scoring import score_sequences
    from crossopd.step.score import response_ids

    ids = [response_ids(r) for r in responses]
    seqs = [list(p) + r.tolist() for p, r in zip(prompts, ids)]
    spans = [(len(p), len(p) + len(r)) for p, r in zip(prompts, ids)]
    with torch.no_grad():
        return [o.double() for o in score_sequences(student.model, seqs, spans)]


def rollouts(student: Any, step: Any, examples: list, max_new_tokens: int, seed: int
             ) -> tuple:
    """Native rollouts of ``student`` on ``examples``."""
    from crossopd.step.rollout import sample_rollouts

    torch.manual_seed(seed)
    return sample_rollouts(student, examples, replace(step.step, max_new_tokens=max_new_tokens))


def trajectories(student: Any, path: str) -> tuple:
    """The complete trajectories of ``path`` on the student's side: each assistant turn
    spelled in the student's tokens, each environment turn rendered by its template."""
    from crossopd.step.data import Example, load_trajectories
    from crossopd.step.trajectory import trajectory_from_messages

    syntax = student.tool_syntax()
    exs, prompts, trajs = [], [], []
    for row in load_trajectories(path):
        prompt, ids, traj = trajectory_from_messages(row.messages, student.fmt, student.vocab,
                                                     syntax, row.tools)
        exs.append(Example(prompt, tools=row.tools))
        prompts.append(ids)
        trajs.append(traj)
    return exs, prompts, trajs


def build_step(s_tok: Any, teacher: str = "gemma3-270m", tool_format: str | None = "hermes"
               ) -> Any:
    from omegaconf import OmegaConf

    from crossopd.integrations.verl.teacher_step import teacher_step
    from crossopd.models.hub import load_hf_tokenizer

    # a base model reads the demo's plain prompt format
    fmt = {} if getattr(load_hf_tokenizer(teacher), "chat_template", None) else PLAIN
    # max_batch_tokens=1: the teacher scores every sequence in a forward pass of its own, in
    # the native step (which batches a step's requests) as in the worker (one sample at a
    # time), so float32 batching noise is not mistaken for a difference in the targets;
    # multi_turn.format: verl's tool parser (its default, hermes), the student's call syntax
    config = OmegaConf.create({
        "crossopd": {"teacher": {"model": teacher, "tool_format": tool_format, **fmt},
                     "max_batch_tokens": 1},
        "actor_rollout_ref": {"rollout": {"multi_turn": {"format": tool_format}}}})
    return teacher_step(config, s_tok)


def worker_outputs(step: Any, mode: str, exs: list, prompts: list, responses: list,
                   old: list) -> list[tuple[Any, torch.Tensor | None]]:
    """Each rollout through the worker's teacher step in ``mode``: (verl's output, advantage).
    A trajectory comes as crossopd's tool agent loop hands it over: its student tokens in
    ``response_mask``, its conversation in ``extra_fields``."""
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.integrations.verl.targets import CONVERSATION
    from crossopd.step.trajectory import Trajectory

    step = replace(step, signal=mode)

    async def one(ex: Any, p: list, r: Any, o: torch.Tensor) -> tuple:
        if isinstance(r, Trajectory):
            extra = {CONVERSATION: {"messages": [dict(m) for m in r.messages],
                                    "tools": ex.tools}}
            ids, mask, turns = r.ids, r.student_mask.astype(int).tolist(), len(r.messages) + 1
        else:
            extra, ids, mask, turns = {}, r, [1] * len(r), 2
        out = AgentLoopOutput(prompt_ids=list(p), response_ids=ids.tolist(),
                              response_mask=mask, response_logprobs=o.tolist(),
                              num_turns=turns, metrics=AgentLoopMetrics(), extra_fields=extra)
        return out, await step.run(out, {"raw_prompt": ex.messages})

    async def every() -> list:
        return [await one(*x) for x in zip(exs, prompts, responses, old)]

    return asyncio.run(every())


def compare_worker(pool: list, advantage: list, native: Any) -> tuple[float, float, bool]:
    d_targets, d_adv, equal = 0.0, 0.0, True
    for (out, _), (out_a, adv), q, a, signal in zip(pool, advantage, native.targets,
                                                   native.advantages, native.signal):
        n = len(q)
        for mask in (out.response_mask, out_a.response_mask):
            equal &= bool(torch.equal(torch.tensor(mask, dtype=torch.bool), signal))
        prompt_len = len(out.prompt_ids)
        ours = out.extra_fields["teacher_logprobs"][prompt_len - 1: prompt_len - 1 + n, 0]
        if signal.any():
            d_targets = max(d_targets, float((ours.double()[signal] - q[signal]).abs().max()))
        # the worker's advantage is float32 (verl's reward tensor): compared in float32
        d_adv = max(d_adv, float((adv - a.float()).abs().max()))
    return d_targets, d_adv, equal


def perturbed(old: list, seed: int) -> list[torch.Tensor]:
    """Current log-probs moved off the rollout's, so PPO's clip and dual clip act."""
    gen = torch.Generator().manual_seed(seed)
    return [o + 0.3 * torch.randn(len(o), generator=gen, dtype=torch.float64) for o in old]


def padded(rows: list[torch.Tensor], fill: float = 0.0) -> torch.Tensor:
    return torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=fill)


def actor_config(n: int) -> Any:
    from verl.workers.config import ActorConfig
    from verl.workers.config.actor import PolicyLossConfig

    return ActorConfig(strategy="fsdp", ppo_mini_batch_size=n, rollout_n=1,
                       ppo_micro_batch_size_per_gpu=n, clip_ratio_low=0.2, clip_ratio_high=0.28,
                       clip_ratio_c=10.0, loss_agg_mode="token-mean",
                       policy_loss=PolicyLossConfig(loss_mode="crossopd"))


def native_loss(current: list, old: list, targets: list) -> float:
    from crossopd.step.loss import LossConfig, advantages, policy_loss

    adv_valid = [advantages(q, o) for q, o in zip(targets, old)]
    loss, _ = policy_loss(torch.cat(current), torch.cat(old), torch.cat([a for a, _ in adv_valid]),
                          torch.cat([v for _, v in adv_valid]), LossConfig(0.2, 0.28, 10.0))
    return float(loss)


def distillation_loss_parity(pool: list, old: list, current: list) -> float:
    """verl's distillation loss with ``loss_mode=crossopd`` on the pool-mode samples against
    crossopd's ``policy_loss`` on the same numbers."""
    from tensordict import TensorDict
    from verl.trainer.distillation.losses import distillation_loss
    from verl.utils.tensordict_utils import assign_non_tensor
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    outs = [o for o, _ in pool]
    prompts = [torch.tensor(o.prompt_ids) for o in outs]
    width = max(len(p) for p in prompts)
    left = torch.stack([torch.cat([torch.zeros(width - len(p), dtype=p.dtype), p])
                        for p in prompts])
    responses = padded([torch.tensor(o.response_ids) for o in outs])
    mask = padded([torch.tensor(o.response_mask, dtype=torch.bool) for o in outs], False)
    in_prompt = torch.arange(width) >= width - torch.tensor([len(p) for p in prompts])[:, None]
    attention = torch.cat([in_prompt, padded([torch.ones(len(o.response_ids), dtype=torch.bool)
                                              for o in outs], False)], 1).long()
    # verl's unpadded model output: row t of a sample is the log-prob of its token t + 1
    values = [torch.cat([torch.zeros(len(o.prompt_ids) - 1, dtype=torch.float64), c,
                         torch.zeros(1, dtype=torch.float64)]) for o, c in zip(outs, current)]
    teacher = [o.extra_fields["teacher_logprobs"] for o in outs]
    data = TensorDict({"prompts": left, "responses": responses, "attention_mask": attention,
                       "response_mask": mask, "old_log_probs": padded(old),
                       "teacher_logprobs": torch.cat(teacher)}, batch_size=[])
    assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()),
                      global_batch_size=len(outs))
    dist = DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode="crossopd", use_policy_gradient=False, loss_max_clamp=None,
        clip_ratio_low=0.2, clip_ratio_high=0.28))
    got, _ = distillation_loss(actor_config(len(outs)), dist, {"log_probs": torch.cat(values)},
                               data)
    targets = [torch.where(torch.tensor(o.response_mask, dtype=torch.bool),
                           o.extra_fields["teacher_logprobs"][len(o.prompt_ids) - 1:
                                                              len(o.prompt_ids) - 1 +
                                                              len(c), 0].double(),
                           torch.tensor(float("nan"), dtype=torch.float64))
               for o, c in zip(outs, old)]
    return abs(float(got) - native_loss(current, old, targets))


def policy_loss_parity(advantage: list, old: list, current: list, native: Any) -> float:
    """The worker's advantage (the token-level reward) through verl's ``compute_advantage``
    with the ``crossopd`` estimator, then verl's ``ppo_loss`` with the ``crossopd`` policy loss,
    against crossopd's ``policy_loss``."""
    from tensordict import TensorDict
    from verl.protocol import DataProto
    from verl.trainer.ppo.ray_trainer import compute_advantage
    from verl.utils.tensordict_utils import assign_non_tensor
    from verl.workers.utils.losses import ppo_loss

    outs = [o for o, _ in advantage]
    mask = padded([torch.tensor(o.response_mask, dtype=torch.float32) for o in outs])
    rewards = padded([a for _, a in advantage])
    batch = DataProto.from_dict({"token_level_rewards": rewards, "response_mask": mask})
    adv = compute_advantage(batch, adv_estimator="crossopd").batch["advantages"]
    # verl's unpadded model output over a one-token prompt: row t is the log-prob of token t + 1
    lengths = padded([torch.ones(len(o.response_ids), dtype=torch.long) for o in outs])
    data = TensorDict({"prompts": torch.zeros(len(outs), 1, dtype=torch.long),
                       "responses": padded([torch.tensor(o.response_ids) for o in outs]),
                       "attention_mask": torch.cat([torch.ones(len(outs), 1,
                                                               dtype=torch.long), lengths], 1),
                       "response_mask": mask.bool(), "old_log_probs": padded(old),
                       "advantages": adv.double()}, batch_size=[len(outs)])
    assign_non_tensor(data, dp_size=1, batch_num_tokens=int(mask.sum()),
                      global_batch_size=len(outs))
    values = torch.cat([torch.cat([c, torch.zeros(1, dtype=torch.float64)]) for c in current])
    got, _ = ppo_loss(actor_config(len(outs)), {"log_probs": values}, data)
    return abs(float(got) - native_loss(current, old, native.targets))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crossopd.integrations.verl.check",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", help="JSONL/JSON/Parquet with `messages` or `prompt` rows "
                   "(default: the bundled prompts), or a JSONL/JSON file of complete "
                   "trajectories (rows whose messages hold assistant and tool turns)")
    p.add_argument("--student", default="smollm2",
                   help="HF directory, hub id or bundled name (default: SmolLM2-135M-Instruct)")
    p.add_argument("--teacher", default="gemma3-270m",
                   help="HF directory, hub id or bundled name of another family (default: Gemma "
                        "3 270M in the demo's plain format; trajectories need a teacher whose "
                        "chat template renders tool turns)")
    p.add_argument("--tool-format", default="hermes",
                   help="how a side whose template has no tool-call syntax writes a call "
                        "(verl's multi_turn.format; default hermes)")
    p.add_argument("--limit", type=int, default=8, help="rollouts to check (default 8)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    from crossopd.models.hub import quiet_hf
    from crossopd.step.data import is_trajectory_file, load_examples
    from crossopd.step.score import score_rollouts

    quiet_hf()
    loaded = plugin_loaded()
    student = student_of(args.student, args.tool_format)
    step = build_step(student.tokenizer, args.teacher, args.tool_format)
    if args.data and is_trajectory_file(args.data):
        exs, prompts, responses = trajectories(student, args.data)
        exs, prompts, responses = (x[: args.limit] for x in (exs, prompts, responses))
    else:
        examples = load_examples(args.data or "bundled:counts")[: args.limit]
        exs, prompts, responses = rollouts(student, step, examples, args.max_new_tokens,
                                           args.seed)
    old = rollout_logps(student, prompts, responses)
    native = score_rollouts(student, step.teachers, exs, prompts, responses, step.step,
                            old_logps=old)
    pool = worker_outputs(step, "pool", exs, prompts, responses, old)
    advantage = worker_outputs(step, "advantage", exs, prompts, responses, old)
    d_targets, d_adv, equal = compare_worker(pool, advantage, native)
    current = perturbed(old, args.seed)
    result = {"sequences": len(exs), "coverage": native.stats["coverage"],
              "signal_tokens": native.stats["signal_tokens"],
              "assistant_turns": native.stats["assistant_turns"],
              "env_tokens": native.stats["env_tokens"],
              "format_tokens": native.stats["format_tokens"],
              "max_abs_diff_targets": d_targets, "max_abs_diff_advantages": d_adv,
              "mask_equal": equal,
              "max_abs_diff_stats": stats_difference(pool, native),
              "max_abs_diff_loss": distillation_loss_parity(pool, old, current),
              "max_abs_diff_policy_loss": policy_loss_parity(advantage, old, current, native),
              "plugin_loaded": loaded}
    result["ok"] = (loaded and equal and d_targets <= TARGET_TOLERANCE
                    and d_adv <= TARGET_TOLERANCE and result["max_abs_diff_stats"] <= 1e-9
                    and result["max_abs_diff_loss"] <= LOSS_TOLERANCE
                    and result["max_abs_diff_policy_loss"] <= POLICY_LOSS_TOLERANCE)
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<26} {v}")
    return 0 if result["ok"] else 1


def stats_difference(pool: list, native: Any) -> float:
    """The worker's per-sample counts, summed as verl's sampler sums them, against the native
    step's statistics of the same rollouts (seconds aside)."""
    from crossopd.integrations.verl.teacher_step import STATS_FIELD, opd_metrics
    from crossopd.step.stats import TIMING_PREFIX

    mine = opd_metrics([out.extra_fields[STATS_FIELD] for out, _ in pool])
    return max(abs(mine[f"opd/{k}"] - v) for k, v in native.stats.items()
               if f"opd/{k}" in mine and not k.startswith(TIMING_PREFIX))


if __name__ == "__main__":
    sys.exit(main())
