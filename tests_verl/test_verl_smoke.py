"""verl's own trainer, end to end on CPU, as a user launches it: `python -m
crossopd.integrations.verl.smoke` runs each shipped launch, scaled down, through `python -m
verl.trainer.main_ppo` (validate_config, Ray started locally, the default v1 trainer,
TransferQueue, FSDP2, crossopd's CPU platform and rollout), 2 steps, on tiny Llama models with
the bundled tokenizers (a SmolLM2-tokenizer student, a Gemma-3-tokenizer teacher, built by the
test: the bundled SmolLM2 <- Gemma pair, the command's default, takes a minute longer per mode;
docs/scale.md has its run). Afterwards every trained sample is recomputed by the native step
library.

The three runs start together (a module fixture) and each test reads its own: most of a run's
first minute is verl starting Ray and its workers, which overlaps on two cores."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]

KEYS = {"steps_done", "trainer", "teacher_mode", "opd", "seconds", "native"}


def smoke(args: list[str], out: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "crossopd.integrations.verl.smoke",
                             "--steps", "2", "--out", str(out), "--json", *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def tool_student(tiny: dict, out: Path) -> str:
    """The tiny student with Qwen 2.5's chat template (it renders tools), taught to call the
    launch's calc tool in Hermes syntax with verl's schema of it, so its rollouts really call
    it."""
    import copy

    from verl.tools.function_tool import load_function_tools_from_path

    from crossopd.models.hub import load_hf_tokenizer
    from crossopd.step.tool_calls import ToolSyntax

    from tiny_models import taught_tool_student

    (tool,) = load_function_tools_from_path(str(ROOT / "examples" / "verl" / "calc_tools.py"))
    tok = copy.copy(load_hf_tokenizer(tiny["student"]))
    tok.chat_template = load_hf_tokenizer("qwen2.5-coder-1.5b").chat_template
    return taught_tool_student(tiny["student"], tok, ToolSyntax.of, out,
                               tool.tool_schema.model_dump(exclude_unset=True,
                                                           exclude_none=True))


@pytest.fixture(scope="module")
def runs(tiny, tool_teacher, tmp_path_factory):
    """Every smoke run of this module, started together: {name: (output, run directory)}."""
    root = tmp_path_factory.mktemp("smoke")
    data = root / "prompts.jsonl"
    data.write_text("".join(json.dumps({"prompt": "What is 17*23?", "answer": "391"}) + "\n"
                            for _ in range(8)))
    pair = ["--student", tiny["student"], "--teacher", tiny["teacher"]]
    procs = {mode: (smoke(["--teacher-mode", mode, *pair], root / mode), root / mode / mode)
             for mode in ("http", "pool")}
    procs["tools"] = (smoke(["--teacher-mode", "http", "--launch",
                             str(ROOT / "examples" / "verl" / "tools_vllm_teacher.sh"),
                             "--student", tool_student(tiny, root / "tool_student"),
                             "--teacher", tool_teacher, "--data", str(data),
                             "--max-new-tokens", "96", "--max-prompt-tokens", "384"],
                            root / "tools"), root / "tools" / "http")
    out = {}
    for name, (proc, run) in procs.items():
        stdout, stderr = proc.communicate(timeout=1500)
        out[name] = (proc.returncode, stdout, stderr, run)
    return out


def result(runs: dict, name: str) -> dict:
    code, stdout, stderr, run = runs[name]
    log = run / "verl.log"
    assert code == 0, stderr[-3000:] + (log.read_text(errors="replace")[-6000:]
                                        if log.exists() else "")
    return json.loads(stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("mode", ["http", "pool"])
def test_verls_trainer_runs_crossopd_end_to_end(mode, runs):
    """`http`: the one-GPU launch, crossopd's HTTP teacher against a real serve-teacher on
    127.0.0.1, no verl teacher pool (as shipped, verl refused its 0-node pool). `pool`: the
    paper's launch, verl's teacher replicas serving the cross-family teacher. Both on verl's
    default v1 trainer with crossopd's TransferQueue worker (as shipped, the manager fit only
    the legacy trainer), on a data source verl's reward does not know."""
    r = result(runs, mode)
    assert KEYS <= set(r) and r["ok"]
    assert r["steps_done"] == 2 and r["trainer"] == "v1" and r["teacher_mode"] == mode
    opd = r["opd"]
    assert opd["sequences"] == 4 and opd["coverage"] == 1.0 and opd["signal_tokens"] > 0
    assert 0.0 < opd["kl_per_token"] < 20.0 and opd["failed_rollout_groups"] == 0
    assert opd["time/teacher_s"] > 0 and opd["time/align_credit_s"] > 0
    n = r["native"]
    assert n["ok"] and n["mask_equal"] and n["sequences"] == 8
    assert n["max_abs_diff_targets"] == 0.0 and n["max_abs_diff_metrics"] <= 1e-9
    assert n["max_abs_diff_teacher_logprobs"] <= 1e-4


def test_verls_tool_agent_loop_trains_crossopd_on_tool_trajectories(runs):
    """The shipped tool-calling launch (examples/verl/tools_vllm_teacher.sh), scaled down:
    verl's tool agent loop (crossopd_tool_agent) runs the student's calls through verl's
    function tool, crossopd's HTTP teacher scores each assistant turn in its own template
    (tool results as its own turns, calls as JSON objects), 2 steps of verl's trainer. The
    student (``tool_student``) really calls the tool. Every trained trajectory is recomputed
    by the native step library, turn by turn."""
    r = result(runs, "tools")
    assert r["ok"] and r["steps_done"] == 2 and r["trainer"] == "v1"
    opd = r["opd"]
    assert opd["sequences"] == 4 and opd["assistant_turns"] > opd["sequences"]
    assert opd["env_tokens"] > 0 and opd["format_tokens"] > 0 and opd["signal_tokens"] > 0
    n = r["native"]
    assert n["ok"] and n["mask_equal"] and n["trajectories"] == n["sequences"] == 8
    assert n["max_abs_diff_targets"] == 0.0 and n["max_abs_diff_metrics"] <= 1e-9
    assert n["native_env_tokens"] > 0
