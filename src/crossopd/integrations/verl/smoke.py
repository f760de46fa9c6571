"""``python -m crossopd.integrations.verl.smoke [--data FILE] [--steps N] [--teacher-mode
pool|http|builtin] [--json]`` (in ``.venv-verl``): a shipped verl launch, scaled down, through
verl's own entry point (``python -m verl.trainer.main_ppo``: ``validate_config``, Ray started
locally, verl's default v1 trainer, TransferQueue, FSDP) on the CPU, with small real models.
The laptop check of a launch before it goes to a cluster.

- ``http``: ``examples/verl/one_gpu_vllm_teacher.sh``; crossopd's HTTP teacher scores, against a
  ``crossopd serve-teacher`` this command starts on 127.0.0.1 (the launch's ``vllm serve``).
- ``pool``: ``examples/verl/paper_qwen3_8b_teacher_llama31_8b_student.sh``; verl's teacher pool
  (its replicas on crossopd's CPU rollout) serves the cross-family teacher.
- ``builtin``: verl's own same-tokenizer OPD (its agent loop, the student as its own teacher,
  its ``k3`` loss) on the same models and data: the baseline of the cost measurement.

Scaled down by overrides on the script's own: the models, the data, batch 4, 2 steps, the CPU
platform and rollout (``VERL_PLATFORM=cpu``, ``rollout.name=hf``) and one Ray "GPU" slot per
pool. Afterwards every trained sample's ids, rollout log-probs and teacher log-probs (recorded by
the worker) are run through crossopd's native step library: its targets, signal mask and counts
must be the run's.

Prints ``steps_done``, ``trainer``, ``teacher_mode``, ``opd`` (the last step's crossopd metrics
from verl's tracker), ``native`` (the comparison), ``step_seconds`` (verl's ``timing_s/step``
per step) and ``seconds``; exits 1 when the run or a check fails.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from crossopd.integrations.verl.launch import merge, script_overrides

ROOT = Path(__file__).resolve().parents[4]
EXAMPLES = ROOT / "examples" / "verl"
SCRIPTS = {"http": "one_gpu_vllm_teacher.sh",
           "pool": "paper_qwen3_8b_teacher_llama31_8b_student.sh",
           "builtin": "paper_qwen3_8b_teacher_llama31_8b_student.sh"}
# a base model reads a plain prompt format (the bundled Gemma; the demo's format)
PLAIN = {"plain_template": "Question: {prompt}\nAnswer:", "stop": "\n\nQuestion:"}


def write_data(rows: list[dict], path: Path, source: str) -> None:
    import pandas as pd

    pd.DataFrame([{"prompt": r["messages"], "data_source": source,
                   "reward_model": {"ground_truth": r.get("answer") or ""},
                   "extra_info": {"index": i}} for i, r in enumerate(rows)]).to_parquet(path)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def overrides(script: Path, mode: str, student: str, teacher: str, fmt: dict[str, str],
              data: tuple[Path, Path], out: Path, steps: int, batch: int, max_new: int,
              url: str | None) -> list[str]:
    """The launch ``script`` of ``mode`` with the scaled-down changes."""
    change: dict[str, Any] = {
        "data.train_files": data[0], "data.val_files": data[1], "data.train_batch_size": batch,
        "data.max_prompt_length": 64, "data.max_response_length": max_new,
        "data.dataloader_num_workers": 0,
        "actor_rollout_ref.model.path": student,
        "actor_rollout_ref.model.use_remove_padding": False,
        "+actor_rollout_ref.model.override_config.attn_implementation": "eager",
        "actor_rollout_ref.actor.optim.lr": 1e-3,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": -1,
        "actor_rollout_ref.actor.ppo_mini_batch_size": batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": max(1, batch // 2),
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size": 1,
        # torch's FSDP1 needs an accelerator for its device handle; FSDP2 shards on the CPU
        "actor_rollout_ref.actor.strategy": "fsdp2",
        "actor_rollout_ref.actor.fsdp_config.param_offload": False,
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload": False,
        "actor_rollout_ref.actor.fsdp_config.model_dtype": "fp32",
        # float32 compute and no torch.compile: what a CPU runs well (bf16 matmuls and inductor
        # compiles are slow here), the objective unchanged
        "+actor_rollout_ref.actor.fsdp_config.mixed_precision": "{param_dtype: fp32, "
                                                               "reduce_dtype: fp32, "
                                                               "buffer_dtype: fp32}",
        "actor_rollout_ref.actor.use_torch_compile": False,
        "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
        "actor_rollout_ref.rollout.name": "hf",
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": batch,
        "actor_rollout_ref.rollout.agent.num_workers": 1,
        "actor_rollout_ref.rollout.val_kwargs.n": 1,
        "actor_rollout_ref.rollout.val_kwargs.do_sample": False,
        "reward.num_workers": 1,
        "trainer.device": "cpu", "trainer.nnodes": 1, "trainer.n_gpus_per_node": 1,
        "trainer.total_training_steps": steps, "trainer.logger": ["console", "file"],
        "trainer.val_before_train": False, "trainer.test_freq": -1, "trainer.save_freq": -1,
        "trainer.project_name": "crossopd_smoke", "trainer.experiment_name": mode,
        "trainer.default_local_dir": out / "checkpoints",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
        "ray_kwargs.ray_init.num_cpus": 16,
        "+ray_kwargs.ray_init.num_gpus": 2,
        "+crossopd.record_dir": out / "samples",
    }
    if mode == "http":
        change.update({"+crossopd.teacher.urls": [url], "+crossopd.teacher.served_name": "teacher",
                       "+crossopd.teacher.tokenizer": teacher,
                       "+crossopd.teacher.patience_s": 120})
    else:
        change.update({
            "distillation.nnodes": 1, "distillation.n_gpus_per_node": 1,
            "distillation.teacher_models.teacher_model.model_path":
                student if mode == "builtin" else teacher,
            "distillation.teacher_models.teacher_model.inference.name": "hf",
            "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size": 1,
            "distillation.teacher_models.teacher_model.inference.max_model_len": 512,
        })
    base = script_overrides(script)
    if mode == "builtin":  # verl's own OPD: its agent loop and sampler, its k3 loss
        base = [o for o in base if not o.lstrip("+").startswith(
            ("crossopd.", "actor_rollout_ref.rollout.agent.agent_loop_manager_class",
             "trainer.v1.sampler"))]
        change.pop("+crossopd.record_dir")
        change.update({"distillation.distillation_loss.loss_mode": "k3",
                       "distillation.distillation_loss.use_policy_gradient": True,
                       "distillation.distillation_loss.loss_max_clamp": 10.0,
                       "algorithm.adv_estimator": "grpo"})
    else:  # quoted: a plain template holds braces, spaces and newlines
        change.update({f"+crossopd.teacher.{k}": f"'{v}'" for k, v in fmt.items()})
    return merge(base, change)


def serve_teacher(teacher: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crossopd", "serve-teacher", "--model", teacher, "--port",
           str(port), "--served-model-name", "teacher", "--device", "cpu",
           "--max-batch-requests", "1"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_verl(args: list[str], out: Path, timeout: float) -> subprocess.CompletedProcess:
    from crossopd.integrations.verl.cpu_platform import ray_env

    env = {**os.environ, **ray_env(), "VERL_FILE_LOGGER_PATH": str(out / "metrics.jsonl"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
           "PYTHONUNBUFFERED": "1"}
    with (out / "verl.log").open("w") as log:
        return subprocess.run([sys.executable, "-m", "verl.trainer.main_ppo", *args], env=env,
                              stdout=log, stderr=subprocess.STDOUT, timeout=timeout, cwd=out)


def teacher_format(teacher: str, args: argparse.Namespace) -> dict[str, str]:
    """The teacher's prompt format keys: none for a chat model, ``PLAIN`` (or the given one)
    for a base model without a chat template."""
    from crossopd.hub import load_hf_tokenizer

    if args.teacher_plain_template:
        return {"plain_template": args.teacher_plain_template, "stop": args.teacher_stop}
    return {} if getattr(load_hf_tokenizer(teacher), "chat_template", None) else dict(PLAIN)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m crossopd.integrations.verl.smoke",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default="bundled:counts",
                   help="JSONL/JSON/Parquet with `messages` or `prompt` rows (default: the "
                        "bundled prompts)")
    p.add_argument("--steps", type=int, default=2, help="training steps (default 2)")
    p.add_argument("--teacher-mode", choices=("pool", "http", "builtin"), default="http")
    p.add_argument("--student", default="smollm2",
                   help="HF directory, hub id or bundled name of a model verl trains (default: "
                        "SmolLM2-135M-Instruct)")
    p.add_argument("--teacher", default="gemma3-270m",
                   help="HF directory, hub id or bundled name of another tokenizer family "
                        "(default: Gemma 3 270M)")
    p.add_argument("--teacher-plain-template", help="the teacher's plain prompt format, with "
                   "{prompt} (default for a teacher without a chat template: the demo's)")
    p.add_argument("--teacher-stop", help="what ends the teacher's answer in that format")
    p.add_argument("--launch", help="the launch script to scale down (default: the shipped "
                   "one of the teacher mode, examples/verl/)")
    p.add_argument("--batch", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=24)
    p.add_argument("--out", default="runs/verl_smoke", help="run directory")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the verl run")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    from crossopd.hub import model_source, quiet_hf
    from crossopd.prompts import load_examples

    quiet_hf()
    script = Path(args.launch) if args.launch else EXAMPLES / SCRIPTS[args.teacher_mode]
    if not script.is_file():
        p.error(f"no launch script {script}: the shipped launches are in the repository's "
                "examples/verl/; pass --launch FILE")
    out = Path(args.out).resolve() / args.teacher_mode
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    rows = [{"messages": e.messages, "answer": e.answer} for e in load_examples(args.data)]
    data = (out / "train.parquet", out / "val.parquet")
    # a data source verl's default reward does not know (crossopd needs no task reward); verl's
    # own OPD computes one, so its baseline gets a source verl scores
    source = "openai/gsm8k" if args.teacher_mode == "builtin" else "crossopd_smoke"
    write_data(rows, data[0], source)
    write_data(rows[:2], data[1], source)
    student, teacher = model_source(args.student), model_source(args.teacher)
    fmt = teacher_format(teacher, args)
    server, url = None, None
    if args.teacher_mode == "http":
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        server = serve_teacher(teacher, port, out / "teacher.log")
    try:
        cmd = overrides(script, args.teacher_mode, student, teacher, fmt, data, out, args.steps,
                        args.batch, args.max_new_tokens, url)
        (out / "overrides.txt").write_text("\n".join(cmd) + "\n")
        proc = run_verl(cmd, out, args.timeout)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    result = summarise(out, args.teacher_mode, proc.returncode)
    if proc.returncode == 0 and args.teacher_mode != "builtin":
        from crossopd.config import TeacherConfig
        from crossopd.integrations.verl.native import compare

        result["native"] = compare(out, student, TeacherConfig(model=teacher, **fmt),
                                   result["opd"])
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = proc.returncode == 0 and result["steps_done"] >= args.steps and (
        args.teacher_mode == "builtin" or result.get("native", {}).get("ok", False))
    if args.json:
        print(json.dumps(result))
    else:
        for k, v in result.items():
            print(f"{k:<14} {v}")
    if not result["ok"]:
        print(f"verl smoke failed: see {out / 'verl.log'}", file=sys.stderr)
    return 0 if result["ok"] else 1


def summarise(out: Path, mode: str, returncode: int) -> dict:
    path = out / "metrics.jsonl"
    rows = [json.loads(x) for x in path.read_text().splitlines()] if path.exists() else []
    steps = [r for r in rows if "training/global_step" in r["data"]]
    last = steps[-1]["data"] if steps else {}
    return {"returncode": returncode, "steps_done": len(steps), "trainer": "v1",
            "teacher_mode": mode,
            "opd": {k[4:]: v for k, v in last.items() if k.startswith("opd/")},
            "step_seconds": [r["data"].get("timing_s/step") for r in steps],
            "log": str(out / "verl.log")}


if __name__ == "__main__":
    sys.exit(main())
