"""verl's own trainer, end to end on CPU, as a user launches it: `python -m
crossopd.integrations.verl.smoke` runs each shipped launch, scaled down, through `python -m
verl.trainer.main_ppo` (validate_config, Ray started locally, the default v1 trainer,
TransferQueue, FSDP2, crossopd's CPU platform and rollout), 2 steps, on tiny Llama models with
the bundled tokenizers (a SmolLM2-tokenizer student, a Gemma-3-tokenizer teacher, built by the
test: the bundled SmolLM2 <- Gemma pair, the command's default, takes a minute longer per mode;
docs/scale.md has its run). Afterwards every trained sample is recomputed by the native step
library."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

KEYS = {"steps_done", "trainer", "teacher_mode", "opd", "seconds", "native"}


@pytest.mark.parametrize("mode", ["http", "pool"])
def test_verls_trainer_runs_crossopd_end_to_end(mode, tiny, tmp_path):
    """`http`: the one-GPU launch, crossopd's HTTP teacher against a real serve-teacher on
    127.0.0.1, no verl teacher pool (as shipped, verl refused its 0-node pool). `pool`: the
    paper's launch, verl's teacher replicas serving the cross-family teacher. Both on verl's
    default v1 trainer with crossopd's TransferQueue worker (as shipped, the manager fit only
    the legacy trainer), on a data source verl's reward does not know."""
    out = subprocess.run([sys.executable, "-m", "crossopd.integrations.verl.smoke",
                          "--teacher-mode", mode, "--steps", "2", "--out", str(tmp_path),
                          "--student", tiny["student"], "--teacher", tiny["teacher"], "--json"],
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:] + (tmp_path / mode / "verl.log").read_text(
        errors="replace")[-6000:]
    r = json.loads(out.stdout.strip().splitlines()[-1])
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
