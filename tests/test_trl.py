"""Engine `trl`: crossopd's OPD step inside TRL's GRPOTrainer, against the native engine, in real
processes (torchrun, 2 ranks, gloo) and against a real HTTP teacher."""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crossopd.run.config import ConfigError, load_config
from crossopd.step.data import load_examples

from conftest import PLAIN

try:
    import trl  # noqa: F401
except ImportError:  # the extra is part of `make install`; say what is missing, never pass
    pytest.fail("the trl extra is not installed: pip install -e '.[trl]' (or run `make install`)",
                pytrace=False)

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


def _errors(r: subprocess.CompletedProcess) -> str:
    """The lines that say what went wrong (torchrun's own report is long and says little)."""
    lines = r.stderr.splitlines()
    return "\n".join([x for x in lines if "error" in x.lower()][:20] + lines[-20:])


def _kill_tree(pid: int) -> None:
    """SIGKILL a process and every descendant (a crash of the whole job, as on a lost node)."""
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        kids = subprocess.run(["pgrep", "-P", str(p)], capture_output=True, text=True).stdout
        todo += [int(k) for k in kids.split()]
    for p in pids:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _trl_config(tiny: dict, out: Path, *extra: str):
    return load_config(None, [
        "engine=trl", f"student.model={tiny['student']}", f"teacher.model={tiny['teacher']}",
        f"teacher.plain_template={PLAIN['plain_template']}", f"teacher.stop={PLAIN['stop']}",
        "device=cpu", "rollout.samples_per_prompt=2", "rollout.max_new_tokens=12",
        "batch_size=2", "steps=1", "eval_prompts=0", "checkpoint_every=0",
        f"output_dir={out}", *extra])


def test_trl_engine_matches_native_on_the_same_rollouts(tiny, tmp_path):
    """Same models, same sampled ids: the native step library recomputes the rollout log-probs,
    the credit and the advantages itself and gets TRL's; one SGD update gives the same weights."""
    from crossopd.engines.trl import opd_args
    from crossopd.integrations.trl import OPDTrainer, as_dataset, examples_of
    from crossopd.models.hub import load_hf_model
    from crossopd.run.config import step_settings
    from crossopd.run.load import build_sides
    from crossopd.step.score import score_rollouts
    from crossopd.step.update import update

    cfg = _trl_config(tiny, tmp_path, "optim.lr=0.5", "trl={optim: sgd}")
    torch.manual_seed(0)
    student, teachers = build_sides(cfg)
    start = copy.deepcopy(student.model.state_dict())
    trainer = OPDTrainer(model=student.model, args=opd_args(cfg, 1),
                         train_dataset=as_dataset(load_examples("bundled:arith")[:8]),
                         processing_class=student.tokenizer, teachers=teachers,
                         student=student)
    seen: dict = {}
    score_batch = trainer.score_batch

    def capture(out, inputs, rollout_s):
        out = score_batch(out, inputs, rollout_s)
        seen.update(inputs=inputs, out={k: v.detach().clone() for k, v in out.items()})
        return out

    trainer.score_batch = capture
    trainer.train()

    out = seen["out"]
    lengths = out["completion_mask"].sum(1).tolist()
    responses = [row[:n].numpy() for row, n in zip(out["completion_ids"], lengths)]
    prompts = [p[m.bool()].tolist() for p, m in zip(out["prompt_ids"], out["prompt_mask"])]
    examples = examples_of(seen["inputs"])
    native = load_hf_model(tiny["student"])
    native.load_state_dict(start)
    sn = dataclasses.replace(student, model=native)
    settings = step_settings(cfg)
    # the same settings both ways: the trainer's own, from its OPDConfig
    assert trainer.settings.credit == settings.credit
    assert trainer.settings.loss == settings.loss
    scored = score_rollouts(sn, teachers, examples, prompts, responses,
                            settings)  # old log-probs: native
    assert scored.stats["signal_tokens"] > 0
    for i, (adv, valid) in enumerate(zip(scored.advantages, scored.signal)):
        n = len(adv)
        np.testing.assert_allclose(out["advantages"][i, :n].numpy(), adv.numpy(), atol=1e-4)
        assert out["tool_mask"][i, :n].bool().tolist() == valid.tolist()
        assert not out["advantages"][i, n:].any()

    opt = torch.optim.SGD(native.parameters(), lr=cfg.optim.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    update(sn, scored, opt, sched, settings, grad_clip=cfg.optim.grad_clip)
    trained = dict(trainer.model.named_parameters())
    moved = 0.0
    for name, p in native.named_parameters():
        np.testing.assert_allclose(trained[name].detach().numpy(), p.detach().numpy(),
                                   atol=2e-5, err_msg=name)
        moved = max(moved, float((p.detach() - start[name]).abs().max()))
    assert moved > 1e-3  # the comparison is of a real update, not of two untouched models


def test_torchrun_two_processes_lora_killed_and_resumed(tiny, tmp_path):
    """`torchrun --nproc_per_node 2 -m crossopd train` with LoRA on the tiny SmolLM2-tokenizer
    student <- the tiny Gemma-tokenizer teacher, SIGKILLed (every process) after its first
    checkpoint; `--resume` finishes the run: every step logged once with world size 2, the
    merged student and its adapter saved. (On the bundled SmolLM2 <- Gemma 3 270M pair the same
    run took 95 s instead of about half that.)"""
    out = tmp_path / "run"
    cfg = {"engine": "trl", "student": {"model": tiny["student"], "lora": {"r": 8}},
           "teacher": {"model": tiny["teacher"], **PLAIN}, "data": {"path": "bundled:arith"},
           "rollout": {"max_new_tokens": 8, "samples_per_prompt": 2}, "steps": 3,
           "batch_size": 2, "eval_prompts": 2, "checkpoint_every": 1, "device": "cpu",
           "output_dir": str(out), "optim": {"lr": 1e-4}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                "-m", "crossopd", "train", str(path), "--no-progress"]
    proc = subprocess.Popen(torchrun, env=ENV, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 600
        while not (out / "checkpoint-1" / "trainer_state.json").exists():
            assert proc.poll() is None and time.time() < deadline, "no checkpoint-1 was written"
            time.sleep(0.2)
    finally:
        _kill_tree(proc.pid)  # torchrun's workers live in their own process groups
        proc.wait(timeout=60)
    time.sleep(1)
    assert not (out / "final").exists()  # killed before the end

    r = subprocess.run([*torchrun, "--resume"], env=ENV, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, _errors(r)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2, 3]
    assert all(row["world_size"] == 2 and row["signal_tokens"] > 0 for row in rows)
    assert (out / "final" / "adapter" / "adapter_config.json").exists()
    from transformers import AutoModelForCausalLM, AutoTokenizer

    AutoTokenizer.from_pretrained(out / "final")
    AutoModelForCausalLM.from_pretrained(out / "final")  # merged: loads without peft


def test_trl_engine_against_a_real_http_teacher(tiny, tmp_path):
    """One TRL-engine step scored by `crossopd serve-teacher` on 127.0.0.1."""
    from conftest import free_port, wait_ready

    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", tiny["teacher"],
         "--port", str(port), "--device", "cpu", "--name", "tiny-teacher"], env=ENV,
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/health", 120)
        cfg = {"engine": "trl", "student": {"model": tiny["student"]},
               "teacher": {"urls": [f"http://127.0.0.1:{port}/v1"], "served_name": "tiny-teacher",
                           "tokenizer": tiny["teacher"], **PLAIN},
               "data": {"path": "bundled:arith"}, "device": "cpu", "steps": 1, "batch_size": 2,
               "rollout": {"max_new_tokens": 8, "samples_per_prompt": 2}, "eval_prompts": 0,
               "output_dir": str(tmp_path / "http")}
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(cfg))
        r = subprocess.run([sys.executable, "-m", "crossopd", "train", str(path), "--json"],
                           env=ENV, capture_output=True, text=True, timeout=300)
        assert r.returncode == 0, _errors(r)
        assert json.loads(r.stdout.strip().splitlines()[-1])["engine"] == "trl"
        (row,) = [json.loads(x) for x in (tmp_path / "http" / "metrics.jsonl").read_text()
                  .splitlines()]
        assert row["coverage"] == 1.0 and row["signal_tokens"] > 0 and np.isfinite(row["loss"])
    finally:
        server.kill()
        server.wait(timeout=30)


def _tiny_run(tiny: dict, out: Path, **extra) -> Path:
    cfg = {"engine": "trl", "student": {"model": tiny["student"]},
           "teacher": {"model": tiny["teacher"], **PLAIN}, "data": {"path": "bundled:arith"},
           "rollout": {"max_new_tokens": 8, "samples_per_prompt": 2}, "steps": 2,
           "batch_size": 2, "eval_prompts": 2, "device": "cpu", "output_dir": str(out / "run"),
           "optim": {"lr": 1e-2}, **extra}
    path = out / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


SHARDED_CPU = Path(__file__).parents[1] / "examples" / "accelerate_sharded_cpu.yaml"


def test_sharded_two_process_run_saves_the_whole_trained_student(tiny, tmp_path):
    """`accelerate launch --config_file examples/accelerate_sharded_cpu.yaml` (DeepSpeed ZeRO-3)
    on 2 CPU processes, 2 steps, held-out evaluation on the sharded weights: it exits 0, and
    final/ loads with AutoModelForCausalLM holding the trained weights, the same as those
    DeepSpeed's zero_to_fp32 rebuilds offline from the last checkpoint's optimizer partitions.
    (As first shipped, final/ held empty tensors: rank 0 saved its own partition.)"""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    path = _tiny_run(tiny, tmp_path, checkpoint_every=2)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(SHARDED_CPU), "--num_processes", "2", "-m", "crossopd", "train", str(path),
              "--no-progress"]
    r = subprocess.run(launch, env=ENV, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, _errors(r)
    assert "terminate called" not in r.stderr
    out = tmp_path / "run"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["world_size"] for row in rows] == [2, 2]
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    saved = dict(final.state_dict())
    reference = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2"))
    start = load_file(str(Path(tiny["student"]) / "model.safetensors"))
    assert set(start) <= set(reference)
    moved = 0.0
    for name, initial in start.items():
        assert saved[name].shape == initial.shape, name
        torch.testing.assert_close(saved[name], reference[name].to(saved[name].dtype),
                                   rtol=0, atol=1e-6, msg=name)
        moved = max(moved, float((saved[name] - initial).abs().max()))
    assert moved > 1e-3  # trained weights, not the initial ones


def test_an_fsdp_launch_accelerate_runs_unsharded_is_said():
    """accelerate shards with FSDP only on accelerators; on the CPU it silently runs plain data
    parallel (measured: DistributedType.MULTI_CPU under an FSDP config): the run says so."""
    from types import SimpleNamespace

    from accelerate.utils import DistributedType

    from crossopd.engines.trl import fsdp_fallback_note

    cpu = SimpleNamespace(distributed_type=DistributedType.MULTI_CPU)
    note = fsdp_fallback_note(cpu, {"ACCELERATE_USE_FSDP": "true"})
    assert note and "runs FSDP only on accelerators: this run is MULTI_CPU" in note
    assert fsdp_fallback_note(cpu, {}) is None
    fsdp = SimpleNamespace(distributed_type=DistributedType.FSDP)
    assert fsdp_fallback_note(fsdp, {"ACCELERATE_USE_FSDP": "true"}) is None


def test_zero3_without_gathering_on_save_is_refused_before_training(tiny, tmp_path):
    """ZeRO-3 whose config does not gather the weights on save would write a final/ of empty
    tensors after the whole run: refused at start, in one line."""
    path = _tiny_run(tiny, tmp_path)
    config = yaml.safe_load(SHARDED_CPU.read_text())
    config["deepspeed_config"]["zero3_save_16bit_model"] = False
    (tmp_path / "zero3.yaml").write_text(yaml.safe_dump(config))
    r = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                        str(tmp_path / "zero3.yaml"), "-m", "crossopd", "train", str(path),
                        "--no-progress"], env=ENV, capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "set zero3_save_16bit_model: true" in r.stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_one_processs_teacher_failure_stops_every_process_with_the_checkpoint(tiny, tmp_path):
    """Two teachers, one per prompt, 2 processes each scoring one prompt (2 samples): when one
    process's teacher gives up (HTTP 503 past its patience) at step 2, both processes stop within
    seconds, save checkpoint-1 together and point at --resume. As first shipped, the other
    process waited in a collective until gloo's timeout (30 min)."""
    import shutil

    from conftest import free_port

    port = free_port()
    server = subprocess.Popen([sys.executable, str(Path(__file__).parent / "fault_server.py"),
                               "ok_first:2", str(port)], stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdout.readline().strip() == "ready"
        data = tmp_path / "two.jsonl"
        data.write_text("".join(json.dumps(
            {"messages": [{"role": "user", "content": f"What is {k} + {k}?"}],
             "teacher": name}) + "\n" for k, name in ((2, "inproc"), (3, "flaky"))))
        path = _tiny_run(tiny, tmp_path, steps=3, eval_prompts=0, checkpoint_every=1,
                         data={"path": str(data), "default_teacher": "inproc",
                               "heldout_path": "bundled:arith"},
                         teachers={"inproc": {"model": tiny["teacher"], **PLAIN},
                                   "flaky": {"urls": [f"http://127.0.0.1:{port}/v1"],
                                             "tokenizer": tiny["teacher"], "patience_s": 2,
                                             **PLAIN}})
        cfg = yaml.safe_load(path.read_text())
        del cfg["teacher"]
        path.write_text(yaml.safe_dump(cfg))
        shutil.rmtree(tmp_path / "run", ignore_errors=True)
        t0 = time.time()
        r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node",
                            "2", "-m", "crossopd", "train", str(path), "--no-progress"],
                           env=ENV, capture_output=True, text=True, timeout=600)
        seconds = time.time() - t0
    finally:
        server.kill()
        server.wait(timeout=30)
    assert r.returncode != 0 and seconds < 300, (seconds, _errors(r))
    assert "run the same command with --resume" in r.stderr, _errors(r)
    assert (tmp_path / "run" / "checkpoint-1" / "trainer_state.json").exists()
    assert "terminate called" not in r.stderr


def test_tool_trajectories_that_cannot_be_read_are_refused_in_one_line():
    """TRL's tool rollouts are scored as trajectories; the shapes crossopd cannot read as
    assistant turns and environment messages stop the step with what is wrong."""
    import numpy as np

    from crossopd.integrations.trl import OPDConfig, OPDTrainer
    from crossopd.step.bridge import TemplateError
    from crossopd.step.trajectory import env_groups, trajectory_from_mask

    call = {"role": "assistant", "content": "x"}
    result = {"role": "tool", "name": "calc", "content": "4"}
    assert env_groups([call, result, call]) == [[result], []]
    with pytest.raises(TemplateError, match="starts with a 'tool' message"):
        env_groups([result, call])
    ids = np.arange(6)
    with pytest.raises(TemplateError, match="its first token is an environment token"):
        trajectory_from_mask(ids, np.array([0, 1, 1, 0, 1, 1], bool), [[result]], [], None, None)
    with pytest.raises(TemplateError, match="every turn but the last must be followed"):
        trajectory_from_mask(ids, np.array([1, 1, 0, 0, 1, 1], bool), [[], []], [], None, None)
    with pytest.raises(ValueError, match="a dict environment_factory"):
        OPDTrainer(model="x", teacher="y", args=OPDConfig(output_dir="unused", use_cpu=True,
                                                          report_to="none"),
                   environment_factory={"a": object})


@pytest.mark.parametrize("overrides,message", [
    (["rollout.backend=vllm"], "rollout.backend: vllm needs engine: trl"),
    (["student.lora={r: 8}"], "student.lora needs engine: trl"),
    (["engine=verl"], "engine 'verl'"),
])
def test_engine_config_errors_name_the_fix(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["teacher.model=smollm2", *overrides])


def test_trl_engine_batch_errors_before_any_model_loads(tmp_path):
    from crossopd.engines.trl import opd_args

    one = load_config(None, ["teacher.model=smollm2", "engine=trl"])
    with pytest.raises(ConfigError, match="samples_per_prompt >= 2"):
        opd_args(one, 1)
    odd = load_config(None, ["teacher.model=smollm2", "engine=trl", "batch_size=3",
                             "rollout.samples_per_prompt=2"])
    with pytest.raises(ConfigError, match="divide evenly over 4 processes"):
        opd_args(odd, 4)


@pytest.mark.parametrize("name,world", [("paper_qwen3_8b_teacher_llama31_8b_student.yaml", 6),
                                        ("single_gpu_qwen25_05b_from_smollm2_17b.yaml", 1)])
def test_gpu_examples_validate_into_grpo_configs(name, world, tmp_path):
    """The shipped GPU configs load, validate and map onto a GRPOConfig for their GPU count
    (no model is downloaded; the data file is the user's, so a bundled one stands in)."""
    from crossopd.engines.trl import opd_args

    path = Path(__file__).parents[1] / "examples" / name
    cfg = load_config(path, ["data.path=bundled:arith", f"output_dir={tmp_path}"])
    args = opd_args(cfg, world)
    assert cfg.engine == "trl" and cfg.rollout.backend == "vllm" and args.use_vllm
    assert (args.epsilon, args.epsilon_high, args.delta, args.beta) == (0.2, 0.28, 10.0, 0.0)
    assert args.loss_type == "dapo" and args.learning_rate == cfg.optim.lr
    completions = args.per_device_train_batch_size * world * args.gradient_accumulation_steps
    assert completions == cfg.batch_size * cfg.rollout.samples_per_prompt
