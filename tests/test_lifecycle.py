"""The run lifecycle, written once: both engines write the same files and keys, count what got no
signal the same way, stop on a lost teacher with a checkpoint and a --resume line, and run a
user's own credit rule; the TRL integration's Python API and its private-API shim."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from crossopd.run.config import load_config

from conftest import PLAIN, free_port, wait_ready

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
       "HF_HUB_OFFLINE": "1"}


def _overrides(tiny: dict, out: Path, *extra: str) -> list[str]:
    return [f"student.model={tiny['student']}", f"teacher.model={tiny['teacher']}",
            *(f"teacher.{k}={v}" for k, v in PLAIN.items()), "device=cpu",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "batch_size=2",
            "data.heldout_size=4", "eval_prompts=2", "checkpoint_every=1", "optim.lr=1e-3",
            f"output_dir={out}", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def test_both_engines_write_the_same_files_and_keys(tiny, tmp_path):
    """steps=2 with update_epochs=2: two OPD steps (rows 1 and 2) in both engines, each two
    optimizer steps; the same metrics.jsonl and eval.jsonl keys, the same result keys."""
    from crossopd.run.train import train

    results, metrics, evals = {}, {}, {}
    for engine in ("native", "trl"):
        out = tmp_path / engine
        cfg = load_config(None, _overrides(tiny, out, f"engine={engine}", "steps=2",
                                           "update_epochs=2"))
        results[engine] = train(cfg, progress=False)
        metrics[engine], evals[engine] = _rows(out / "metrics.jsonl"), _rows(out / "eval.jsonl")
        assert [r["step"] for r in metrics[engine]] == [1, 2], engine
        assert [e["step"] for e in evals[engine]] == [0, 2], engine
        for name in ("config.json", "report.html", "final/config.json",
                     "final/tokenizer_config.json"):
            assert (out / name).exists(), (engine, name)
    assert set(results["native"]) == set(results["trl"])
    assert results["native"]["engine"] == "native" and results["trl"]["engine"] == "trl"
    assert set(metrics["native"][0]) == set(metrics["trl"][0])
    assert set(evals["native"][0]) == set(evals["trl"][0])
    for engine in ("native", "trl"):
        row = metrics[engine][-1]
        assert row["world_size"] == 1 and row["signal_tokens"] > 0, engine
        assert row["response_tokens"] > 0 and row["clip_frac"] is not None, engine
    # TRL counts optimizer steps: two OPD steps of two epochs are its checkpoint-4
    assert (tmp_path / "trl" / "checkpoint-4" / "digests.json").exists()


def test_trl_engine_counts_overflowed_sequences(tiny, tmp_path):
    """A long prompt overflows the teacher's context and a short one does not: the TRL engine
    reports the overflow per step and in the result, as the native engine does."""
    from crossopd.run.train import train

    data, held = tmp_path / "train.jsonl", tmp_path / "held.jsonl"
    long = "Add the numbers. " + " ".join(str(i) for i in range(60))
    data.write_text("".join(json.dumps({"prompt": p}) + "\n" for p in ("1+1?", long)))
    held.write_text(json.dumps({"prompt": "2+2?"}) + "\n")
    cfg = load_config(None, _overrides(tiny, tmp_path / "run", "engine=trl", "steps=1",
                                       f"data.path={data}", f"data.heldout_path={held}",
                                       "eval_prompts=0", "teacher.max_length=48"))
    result = train(cfg, progress=False)
    (row,) = _rows(tmp_path / "run" / "metrics.jsonl")
    assert row["overflowed_sequences"] == 2 and row["signal_tokens"] > 0
    assert result["overflowed_sequences"] == 2


def test_user_credit_rule_by_import_path_in_a_run(tiny, tmp_path):
    """``credit_rule: module:function`` reaches the step: a one-step run trains with it."""
    from crossopd.run.train import train

    sys.path.insert(0, str(Path(__file__).parent))  # tests/user_rules.py, as a user's module
    try:
        cfg = load_config(None, _overrides(tiny, tmp_path / "run", "steps=1", "eval_prompts=0",
                                           "credit_rule=user_rules:half_and_half"))
        train(cfg, progress=False)
    finally:
        sys.path.remove(str(Path(__file__).parent))
    (row,) = _rows(tmp_path / "run" / "metrics.jsonl")
    assert row["signal_tokens"] > 0 and row["loss"] != 0.0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["credit_rule"] == \
        "user_rules:half_and_half"


def _serve(model: str, port: int) -> subprocess.Popen:
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", model, "--port",
         str(port), "--device", "cpu", "--name", "tiny-teacher"], env=ENV,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    wait_ready(proc, f"http://127.0.0.1:{port}/health", 120)
    return proc


def test_trl_run_whose_teacher_goes_away_saves_and_says_resume(tiny, tmp_path):
    """The TRL engine under the lifecycle's patience rule: the teacher server dies after step 1,
    the run waits teacher.patience_s, saves TRL's checkpoint of step 1 and exits with the
    --resume line; with the teacher back, --resume finishes every step."""
    port = free_port()
    out = tmp_path / "run"
    cfg = {"engine": "trl", "student": {"model": tiny["student"]},
           "teacher": {"urls": [f"http://127.0.0.1:{port}/v1"], "served_name": "tiny-teacher",
                       "tokenizer": tiny["teacher"], "patience_s": 3, "retries": 1, **PLAIN},
           "data": {"path": "bundled:arith"}, "device": "cpu", "steps": 3, "batch_size": 2,
           "rollout": {"max_new_tokens": 8, "samples_per_prompt": 2}, "eval_prompts": 0,
           "checkpoint_every": 0, "output_dir": str(out)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    cmd = [sys.executable, "-m", "crossopd", "train", str(path), "--no-progress"]
    server = _serve(tiny["teacher"], port)
    try:
        run = subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
        deadline = time.time() + 300
        while not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text():
            assert run.poll() is None and time.time() < deadline, run.communicate()[1][-2000:]
            time.sleep(0.1)
    finally:
        server.kill()
        server.wait(timeout=30)
    _, err = run.communicate(timeout=300)
    assert run.returncode != 0
    last = err.strip().splitlines()[-1]
    assert "--resume" in last and "steps 1..1 are saved" in last, err[-2000:]
    assert (out / "checkpoint-1" / "trainer_state.json").exists()
    assert (out / "checkpoint-1" / "digests.json").exists()

    server = _serve(tiny["teacher"], port)
    try:
        r = subprocess.run([*cmd, "--resume"], env=ENV, capture_output=True, text=True,
                           timeout=300)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert r.returncode == 0, r.stderr[-2000:]
    assert [row["step"] for row in _rows(out / "metrics.jsonl")] == [1, 2, 3]


def test_opd_trainer_from_python_like_a_gold_trainer(tiny, tmp_path):
    """What a TRL user writes: a loaded model, a teacher path, an OPDConfig and a
    datasets.Dataset; two steps, crossopd's statistics in TRL's logs."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from crossopd.integrations.trl import OPDConfig, OPDTrainer

    model = AutoModelForCausalLM.from_pretrained(tiny["student"])
    tokenizer = AutoTokenizer.from_pretrained(tiny["student"])
    dataset = Dataset.from_list([{"prompt": [{"role": "user", "content": f"What is {i} + 2?"}]}
                                 for i in range(8)])
    args = OPDConfig(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=4,
                     num_generations=2, max_completion_length=8, use_cpu=True,
                     report_to="none", logging_steps=1, save_strategy="no",
                     teacher_plain_template=PLAIN["plain_template"],
                     teacher_stop=PLAIN["stop"])
    trainer = OPDTrainer(model=model, teacher=tiny["teacher"], args=args,
                         train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    assert trainer.state.global_step == 2
    logged = [h for h in trainer.state.log_history if "opd/coverage" in h]
    assert len(logged) == 2 and all(h["opd/signal_tokens"] > 0 for h in logged)
    assert 0 < logged[-1]["opd/coverage"] <= 1


def test_opd_config_fields_have_help_and_opd_defaults():
    from crossopd.integrations.trl import OPDConfig

    args = OPDConfig(output_dir="unused", use_cpu=True, report_to="none")
    assert (args.beta, args.loss_type, args.epsilon_high, args.delta) == (0.0, "dapo", 0.28, 10.0)
    import dataclasses

    ours = [f for f in dataclasses.fields(OPDConfig)
            if f.name.startswith(("credit_", "adv_", "special_", "teacher_", "opd_"))]
    assert len(ours) >= 10 and all(f.metadata.get("help") for f in ours)


def test_trl_private_api_shim_fails_loudly_on_changed_signatures():
    """Every private TRL method crossopd calls is checked by name and parameters: the installed
    TRL passes, a TRL whose signature moved fails with the version and the supported range."""
    from trl import GRPOTrainer

    from crossopd.integrations.trl_private import (
        SIGNATURES,
        TRLPrivateAPIError,
        check_private_api,
    )

    check_private_api()
    # the methods the step runs through, and the two the tool loop's trajectories are read from
    assert set(SIGNATURES) == {"_generate_and_score_completions",
                               "_get_per_token_logps_and_entropies", "_save_checkpoint",
                               "_generate", "_tool_call_loop"}

    class Moved(GRPOTrainer):
        def _get_per_token_logps_and_entropies(self, model, batch, logits_to_keep):
            raise AssertionError("never called")

    with pytest.raises(TRLPrivateAPIError, match=r"TRL .*_get_per_token_logps.*trl>=1.16"):
        check_private_api(Moved)

    class Gone(GRPOTrainer):
        _save_checkpoint = None

    with pytest.raises(TRLPrivateAPIError, match="_save_checkpoint is gone"):
        check_private_api(Gone)


def test_lora_all_linear_passes_through_to_peft(tiny):
    """PEFT's documented shortcut is a string; a list ['all-linear'] would name a module."""
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    from crossopd.engines.trl import lora_config

    cfg = load_config(None, ["engine=trl", f"teacher.model={tiny['teacher']}",
                             "student.lora={r: 4, target_modules: all-linear}"])
    lora = lora_config(cfg)
    assert lora.target_modules == "all-linear"
    peft = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny["student"]), lora)
    assert peft.get_nb_trainable_parameters()[0] > 0


def test_unknown_engine_names_the_registered_ones():
    from crossopd.run.config import ConfigError
    from crossopd.run.registry import ENGINES

    with pytest.raises(ConfigError, match="engine 'vllm'.*native.*trl"):
        load_config(None, ["teacher.model=smollm2", "engine=vllm"])
    assert set(ENGINES) >= {"native", "trl"}
