"""A run survives its teacher: serve-teacher killed during step 2 and restarted 5 s later (plus
its start-up), the run waits (teacher.patience_s), finishes every step, and its metrics equal an
undisturbed run's; past the patience it saves the last completed step, exits non-zero saying
--resume, and the resumed run is exact."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import PLAIN, free_port


def _serve(model: str, port: int, *extra: str) -> subprocess.Popen:
    """serve-teacher scoring one request per forward pass (scores independent of batching),
    logging one line per request."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", model, "--port",
         str(port), "--device", "cpu", "--max-batch-requests", "1", "--log-level", "debug",
         *extra],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    for line in proc.stdout:
        if f":{port}/v1" in line:
            break
    deadline = time.time() + 60
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("serve-teacher did not start")


ENV = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}


def _train_cmd(tiny: dict, out: Path, port: int, *extra: str) -> list[str]:
    args = [f"student.model={tiny['student']}", f"teacher.urls=[http://127.0.0.1:{port}]",
            f"teacher.tokenizer={tiny['teacher']}",
            *(f"teacher.{k}={v}" for k, v in PLAIN.items()), "teacher.retries=1",
            "device=cpu", "steps=3", "batch_size=2", "rollout.max_new_tokens=24",
            "eval_prompts=0", "data.heldout_size=4", "optim.lr=1e-3", f"output_dir={out}",
            *extra]
    return [sys.executable, "-m", "crossopd", "train", *args, "--no-progress"]


def _train(tiny: dict, out: Path, port: int, *extra: str) -> subprocess.Popen:
    return subprocess.Popen(_train_cmd(tiny, out, port, *extra), env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(out: Path) -> list[dict]:
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def _kill_after_requests(server: subprocess.Popen, n: int) -> None:
    seen = 0
    for line in server.stdout:
        seen += "scored" in line
        if seen >= n:
            server.kill()
            server.wait(timeout=30)
            return
    raise AssertionError("the server stopped before it scored step 1")


@pytest.fixture(scope="module")
def undisturbed(tiny, tmp_path_factory):
    ref = tmp_path_factory.mktemp("undisturbed")
    port = free_port()
    server = _serve(tiny["teacher"], port)
    try:
        run = _train(tiny, ref, port)
        out, err = run.communicate(timeout=600)
        assert run.returncode == 0, err[-2000:]
    finally:
        server.kill()
        server.wait(timeout=30)
    return _rows(ref)


def test_teacher_restart_mid_run_is_waited_for(tiny, tmp_path, undisturbed):
    port = free_port()
    server = _serve(tiny["teacher"], port)
    run = _train(tiny, tmp_path / "run", port, "teacher.patience_s=120")
    _kill_after_requests(server, 2)  # step 1 is two requests: the kill lands in step 2
    time.sleep(5)
    server = _serve(tiny["teacher"], port)
    try:
        out, err = run.communicate(timeout=600)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert run.returncode == 0, err[-2000:]
    assert "teacher unavailable for" in err and "teacher.patience_s" in err  # it did wait
    assert _rows(tmp_path / "run") == undisturbed  # no step skipped, repeated or changed


def test_patience_exceeded_saves_and_resume_is_exact(tiny, tmp_path, undisturbed):
    port = free_port()
    server = _serve(tiny["teacher"], port)
    out_dir = tmp_path / "run"
    run = _train(tiny, out_dir, port, "teacher.patience_s=3")
    _kill_after_requests(server, 2)
    out, err = run.communicate(timeout=600)
    assert run.returncode != 0
    errors = [line for line in err.splitlines() if line.startswith("crossopd train: error")]
    assert len(errors) == 1, err[-3000:]  # one line, no traceback
    assert "teacher.patience_s" in errors[0] and "--resume" in errors[0]
    assert "Traceback" not in err
    saved = sorted(p.name for p in (out_dir / "checkpoints").iterdir())
    completed = int(saved[-1].split("_")[1])
    # the server logs a request just before its answer leaves: the kill can still cut step 1
    rows = _rows(out_dir) if (out_dir / "metrics.jsonl").exists() else []
    assert completed in (0, 1) and len(rows) == completed
    server = _serve(tiny["teacher"], port)
    try:
        resumed = subprocess.run(_train_cmd(tiny, out_dir, port, "teacher.patience_s=3") +
                                 ["--resume"], env=ENV, capture_output=True, text=True,
                                 timeout=600)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert _rows(out_dir) == undisturbed


def test_teacher_started_after_the_trainer_is_waited_for(tiny, tmp_path):
    """``vllm serve ... &`` then training at once: the trainer's preflight waits for the
    teacher (status lines on stderr) instead of exiting on "connection refused"."""
    port = free_port()
    out = tmp_path / "run"
    run = _train(tiny, out, port, "teacher.served_name=tiny-teacher", "steps=1",
                 "rollout.max_new_tokens=8", "teacher.patience_s=120")
    time.sleep(5)
    server = _serve(tiny["teacher"], port, "--name", "tiny-teacher")
    try:
        _, err = run.communicate(timeout=600)
    finally:
        server.kill()
        server.wait(timeout=30)
    assert run.returncode == 0, err[-2000:]
    assert f"crossopd: waiting for teacher http://127.0.0.1:{port} (connection refused), 0 s " \
           "of 120 s (teacher.patience_s)" in err
    assert len(_rows(out)) == 1
