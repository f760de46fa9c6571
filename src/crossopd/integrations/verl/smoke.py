"""``python -m crossopd.integrations.verl.smoke [--data FILE] [--steps N] [--teacher-mode
pool|http|builtin] [--json]`` (in ``.venv-verl``): a shipped verl launch, scaled down, through
verl's own entry point (``python -m verl.trainer.main_ppo``: ``validate_config``, Ray started
locally, verl's default v1 trainer, TransferQueue, FSDP) on the CPU, with small real models.
The laptop check of a launch before it goes to a cluster.

- ``http``: ``examples/verl/one_gpu_vllm_teacher.sh``; crossopd's HTTP teacher scores, against a
  ``crossopd serve-teacher`` this command starts on 127.0.0.1 (the launch's ``vllm serve``).
- ``pool``: ``examples/verl/paper_qwen3_8b_teacher_llama31_8b_student.sh``; verl's teacher pool
  (its replicas on crossopd's CPU rollout) serves the cross-family teacher.
- ``--launch examples/verl/tools_vllm_teacher.sh`` (mode ``http``): tool calling in verl's tool
  agent loop (crossopd's ``crossopd_tool_agent``), each sample a trajectory scored turn by turn.
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from crossopd.integrations.verl.launch import merge, script_overrides

ROOT = Path(__file__).resolve().parents[4]
EXAMPLES = ROOT / "examples" / "verl"
SCRIPTS = {"http": "one_gpu_vllm_teacher.sh",
           "pool": "paper_qwen3_8b_teacher_llama31_8b_student.sh",
           "builtin": "paper_qwen3_8b_teacher_llama31_8b_student.sh"}
TOOL_FILE = "actor_rollout_ref.rollout.multi_turn.function_tool_path"
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


@dataclass(frozen=True)
class Launch:
    """What the smoke run changes in a shipped launch."""

    mode: str  # http | pool | builtin
    student: str
    teacher: str
    fmt: dict[str, str]  # the teacher's plain format (a base model), else empty
    data: tuple[Path, Path]
    out: Path
    steps: int = 2
    batch: int = 4
    max_new: int = 24
    max_prompt: int = 64
    url: str | None = None  # crossopd's HTTP teacher (mode http)
    served_name: str = "teacher"
    device: str = "cpu"


# on the CPU: crossopd's platform and rollout, FSDP2 (torch's FSDP1 needs an accelerator for its
# device handle), float32 compute and no torch.compile (bf16 matmuls and inductor compiles are
# slow on a CPU; the objective is unchanged), eager attention (no flash-attn), and one Ray "GPU"
# slot for each pool
CPU: dict[str, Any] = {
    "+actor_rollout_ref.model.override_config.attn_implementation": "eager",
    "actor_rollout_ref.actor.strategy": "fsdp2",
    "actor_rollout_ref.actor.fsdp_config.model_dtype": "fp32",
    "+actor_rollout_ref.actor.fsdp_config.mixed_precision":
        "{param_dtype: fp32, reduce_dtype: fp32, buffer_dtype: fp32}",
    "actor_rollout_ref.actor.use_torch_compile": False,
    "actor_rollout_ref.actor.fsdp_config.use_torch_compile": False,
    "actor_rollout_ref.rollout.name": "hf",
    "distillation.teacher_models.teacher_model.inference.name": "hf",
    "trainer.device": "cpu",
    "ray_kwargs.ray_init.num_cpus": 16,
    "+ray_kwargs.ray_init.num_gpus": 2,
}
# on a GPU: the launch's own vLLM rollout and bf16; SDPA attention (flash-attn is not among
# verl's requirements)
GPU: dict[str, Any] = {
    "+actor_rollout_ref.model.override_config.attn_implementation": "sdpa",
    "actor_rollout_ref.rollout.gpu_memory_utilization": 0.3,
    "trainer.device": "cuda",
}


def overrides(script: Path, launch: Launch) -> list[str]:
    """The launch ``script`` with the smoke run's changes, key by key."""
    mode = launch.mode
    change: dict[str, Any] = {
        "data.train_files": launch.data[0], "data.val_files": launch.data[1],
        "data.train_batch_size": launch.batch, "data.max_prompt_length": launch.max_prompt,
        "data.max_response_length": launch.max_new, "data.dataloader_num_workers": 0,
        "actor_rollout_ref.model.path": launch.student,
        "actor_rollout_ref.model.use_remove_padding": False,
        "actor_rollout_ref.actor.optim.lr": 1e-3,
        "actor_rollout_ref.actor.optim.lr_warmup_steps": -1,
        "actor_rollout_ref.actor.ppo_mini_batch_size": launch.batch,
        "actor_rollout_ref.actor.ppo_micro_batch_size_per_gpu": max(1, launch.batch // 2),
        "actor_rollout_ref.actor.ulysses_sequence_parallel_size": 1,
        "actor_rollout_ref.actor.fsdp_config.param_offload": False,
        "actor_rollout_ref.actor.fsdp_config.optimizer_offload": False,
        "actor_rollout_ref.rollout.tensor_model_parallel_size": 1,
        "actor_rollout_ref.rollout.log_prob_micro_batch_size_per_gpu": launch.batch,
        "actor_rollout_ref.rollout.agent.num_workers": 1,
        "actor_rollout_ref.rollout.val_kwargs.n": 1,
        "actor_rollout_ref.rollout.val_kwargs.do_sample": False,
        "reward.num_workers": 1,
        "trainer.nnodes": 1, "trainer.n_gpus_per_node": 1,
        "trainer.total_training_steps": launch.steps, "trainer.logger": ["console", "file"],
        "trainer.val_before_train": False, "trainer.test_freq": -1, "trainer.save_freq": -1,
        "trainer.project_name": "crossopd_smoke", "trainer.experiment_name": mode,
        "trainer.default_local_dir": launch.out / "checkpoints",
        "transfer_queue.backend.SimpleStorage.num_data_storage_units": 1,
        "+crossopd.record_dir": launch.out / "samples",
    }
    if mode == "http":
        change.update({"+crossopd.teacher.urls": [launch.url],
                       "+crossopd.teacher.served_name": launch.served_name,
                       "+crossopd.teacher.tokenizer": launch.teacher,
                       "+crossopd.teacher.patience_s": 120})
    else:
        change.update({
            "distillation.nnodes": 1, "distillation.n_gpus_per_node": 1,
            "distillation.teacher_models.teacher_model.model_path":
                launch.student if mode == "builtin" else launch.teacher,
            "distillation.teacher_models.teacher_model.inference.tensor_model_parallel_size": 1,
            "distillation.teacher_models.teacher_model.inference.max_model_len": 512,
        })
    device = CPU if launch.device == "cpu" else GPU
    change.update({k: v for k, v in device.items()
                   if mode != "http" or not k.startswith("distillation.")})
    base = script_overrides(script)
    for item in base:  # verl runs in the run directory: a launch's relative tool file is the
        key, value = item.split("=", 1)  # repository's (examples/verl/calc_tools.py)
        if key.lstrip("+~") == TOOL_FILE and not Path(value).is_absolute():
            change[TOOL_FILE] = ROOT / value
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
        change.update({f"+crossopd.teacher.{k}": f"'{v}'" for k, v in launch.fmt.items()})
    return merge(base, change)


def serve_teacher(teacher: str, port: int, log: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crossopd", "serve-teacher", "--model", teacher, "--port",
           str(port), "--served-model-name", "teacher", "--device", "cpu",
           "--max-batch-requests", "1"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def run_verl(args: list[str], out: Path, timeout: float, device: str = "cpu") -> int:
    """``python -m verl.trainer.main_ppo ARGS`` (with the CPU platform on ``cpu``); its output
    goes to ``out/verl.log``, each line prefixed with the seconds since the launch."""
    from crossopd.integrations.verl.cpu_platform import ray_env

    platform = ray_env() if device == "cpu" else {}
    env = {**os.environ, **platform, "VERL_FILE_LOGGER_PATH": str(out / "metrics.jsonl"),
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "RAY_DEDUP_LOGS": "0",
           "PYTHONUNBUFFERED": "1"}
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "verl.trainer.main_ppo", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=out,
                            errors="replace")
    with (out / "verl.log").open("w") as log:
        for line in proc.stdout:  # type: ignore[union-attr]
            log.write(f"{time.monotonic() - t0:7.1f} {line}")
            if time.monotonic() - t0 > timeout:
                proc.kill()
                log.write(f"crossopd smoke: stopped after {timeout:.0f} s (--timeout)\n")
                break
    return proc.wait()


def teacher_format(teacher: str, args: argparse.Namespace) -> dict[str, str]:
    """The teacher's prompt format keys: none for a chat model, ``PLAIN`` (or the given one)
    for a base model without a chat template."""
    from crossopd.models.hub import load_hf_tokenizer

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
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                   help="cpu: crossopd's CPU platform and rollout; cuda: the launch's own vLLM "
                        "rollout on one GPU (mode pool needs a second GPU for verl's teacher pool)")
    p.add_argument("--teacher-url", help="mode http: an already running teacher server "
                   "(vllm serve, crossopd serve-teacher) instead of the serve-teacher this "
                   "command starts")
    p.add_argument("--served-name", default="teacher",
                   help="with --teacher-url: the model name it serves (default: teacher)")
    p.add_argument("--batch", type=int, default=4, help="prompts per step (default 4)")
    p.add_argument("--max-new-tokens", type=int, default=24,
                   help="verl's data.max_response_length (a tool trajectory's whole response)")
    p.add_argument("--max-prompt-tokens", type=int, default=64,
                   help="verl's data.max_prompt_length (tool definitions in a chat template's "
                        "system prompt take a few hundred)")
    p.add_argument("--out", default="runs/verl_smoke", help="run directory")
    p.add_argument("--timeout", type=float, default=900.0, help="seconds for the verl run")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    from crossopd.models.hub import model_source, quiet_hf
    from crossopd.step.data import load_examples

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
    if args.device == "cuda" and args.teacher_mode != "http":
        import torch

        if torch.cuda.device_count() < 2:
            p.error("--device cuda --teacher-mode pool/builtin: verl's teacher pool takes a GPU "
                    f"of its own beside the trainer's, and this machine has "
                    f"{torch.cuda.device_count()}")
    server, url = None, args.teacher_url
    if args.teacher_mode == "http" and url is None:
        port = free_port()
        url = f"http://127.0.0.1:{port}/v1"
        server = serve_teacher(teacher, port, out / "teacher.log")
    launch = Launch(args.teacher_mode, student, teacher, fmt, data, out, args.steps, args.batch,
                    args.max_new_tokens, args.max_prompt_tokens, url,
                    args.served_name if args.teacher_url else "teacher", args.device)
    try:
        cmd = overrides(script, launch)
        (out / "overrides.txt").write_text("\n".join(cmd) + "\n")
        returncode = run_verl(cmd, out, args.timeout, args.device)
    finally:
        if server is not None:
            server.terminate()
            server.wait(timeout=30)
    result = summarise(out, args.teacher_mode, returncode)
    if returncode == 0 and args.teacher_mode != "builtin":
        from crossopd.integrations.verl.native import compare
        from crossopd.run.config import TeacherConfig

        result["native"] = compare(out, student, TeacherConfig(model=teacher, **fmt),
                                   result["opd"])
    result["seconds"] = time.perf_counter() - t0
    result["ok"] = returncode == 0 and result["steps_done"] >= args.steps and (
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
