"""The OPD recipe end to end on tiny models built here (different tokenizers), resume after
SIGKILL, same-tokenizer equivalence, and config/data errors before any model loads."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from crossopd.run.config import ConfigError, load_config
from crossopd.step.data import DataError, load_examples
from crossopd.step.settings import StepSettings

from conftest import PLAIN


def _config(tiny: dict, out: Path, **extra) -> dict:
    cfg = {
        "student": {"model": tiny["student"]},
        "teacher": {"model": tiny["teacher"], **PLAIN},
        "data": {"path": "bundled:arith", "heldout_size": 4},
        "rollout": {"max_new_tokens": 8},
        "steps": 2, "batch_size": 2, "eval_prompts": 2, "checkpoint_every": 1,
        "keep_checkpoints": 2, "output_dir": str(out), "device": "cpu",
        "optim": {"lr": 1e-3},
    }
    for k, v in extra.items():
        cfg[k] = {**cfg.get(k, {}), **v} if isinstance(v, dict) else v
    return cfg


def test_end_to_end_tiny_cross_family(tiny, tmp_path, capsys):
    from crossopd.run.train import train

    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(_config(tiny, tmp_path / "run", steps=3, eval_samples=2)))
    cfg = load_config(path)
    result = train(cfg, progress=False)
    out = tmp_path / "run"
    printed = capsys.readouterr()  # per-step lines go to stderr: `--json` keeps stdout clean
    assert "step 3/3:" in printed.err and "step 3/3:" not in printed.out
    # the before/after summary `crossopd demo --json` reports, per prompt over its 2 samples
    assert result["metric"] == "accuracy" and result["heldout_metric_change_se"] >= 0
    assert {"heldout_metric_before", "heldout_metric_after", "heldout_stop_rate_before",
            "heldout_stop_rate_after"} <= set(result)
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert 0 <= r["coverage"] <= 1 and np.isfinite(r["loss"]) and r["response_tokens"] > 0
        assert {"kl_per_token", "kl_per_byte", "adv_mean", "one_to_one_share", "stop_chunks",
                "overflowed_sequences", "lr", "grad_norm", "time/rollout_tok_per_s",
                "time/teacher_tok_per_s", "time/align_credit_tok_per_s",
                "time/update_tok_per_s"} <= set(r)
    ckpts = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert ckpts == ["step_0000002", "step_0000003"]  # keep_checkpoints=2
    assert (out / "report.html").exists() and (out / "kl.png").stat().st_size > 1000
    assert result["heldout_kl_before"] is not None and result["heldout_kl_after"] is not None
    evals = [json.loads(x) for x in (out / "eval.jsonl").read_text().splitlines()]
    assert [e["step"] for e in evals] == [0, 3] and "accuracy" in evals[0]
    # one value per held-out prompt: the share of its 2 samples that were right
    assert len(evals[0]["correct"]) == 2 and set(evals[0]["correct"]) <= {0.0, 0.5, 1.0}
    assert evals[0]["response_tokens"] > 0 and evals[0]["stop_rate"] in {0, .25, .5, .75, 1}
    # samples before and after, in eval.jsonl and the report
    assert len(evals[-1]["samples"]) == 2 and {"prompt", "response", "answer"} <= \
        set(evals[-1]["samples"][0])
    assert evals[-1]["samples"][0]["prompt"] in (out / "report.html").read_text()

    # the trained student is a complete HF model directory, and so is every checkpoint
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert result["final"] == str(out / "final")
    for d in (out / "final", out / "checkpoints" / "step_0000003"):
        tok = AutoTokenizer.from_pretrained(d)
        assert tok.chat_template and AutoModelForCausalLM.from_pretrained(d) is not None
    final = AutoModelForCausalLM.from_pretrained(out / "final")
    assert 2 in final.generation_config.eos_token_id  # generate() stops at <|im_end|> too

    # `crossopd eval` on it reads the run's config (teacher, data, sampling)
    from crossopd.cli.main import main

    capsys.readouterr()
    assert main(["eval", str(out / "final"), "--json", "device=cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert r["student"] == str(out / "final") and r["prompts"] == 2
    assert {"kl_per_byte", "stop_rate", "accuracy", "coverage"} <= set(r)
    assert len(r["samples"]) == 2


def test_teacher_context_overflow_is_loud_and_fatal_when_total(tiny, tmp_path):
    from crossopd.run.train import train

    cfg = load_config(None, [f"student.model={tiny['student']}",
                             f"teacher.model={tiny['teacher']}",
                             *(f"teacher.{k}={v}" for k, v in PLAIN.items()), "device=cpu",
                             "teacher.max_length=8", "data.heldout_size=4", "eval_prompts=2",
                             "rollout.max_new_tokens=4", f"output_dir={tmp_path}"])
    with pytest.raises(ValueError, match="2 of 2 sequences overflowed.*teacher.max_length"):
        train(cfg, progress=False)


def _run_cli(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.Popen([sys.executable, "-m", "crossopd", *args], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, **kw)


def _strip_timing(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if not k.startswith("time/")} for r in rows]


def test_resume_after_sigkill_is_exact(tiny, tmp_path):
    from safetensors.torch import load_file

    def write(name: str) -> Path:
        p = tmp_path / f"{name}.yaml"
        p.write_text(yaml.safe_dump(_config(tiny, tmp_path / name, steps=6,
                                            keep_checkpoints=10)))
        return p

    full = _run_cli(["train", str(write("full")), "--no-progress"])
    assert full.wait(timeout=600) == 0, full.stdout.read()

    killed = _run_cli(["train", str(write("killed")), "--no-progress"])
    marker = tmp_path / "killed" / "checkpoints" / "step_0000003" / "trainer_state.pt"
    deadline = time.time() + 600
    while not marker.exists() and killed.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert killed.poll() is None, "the run finished before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait(timeout=60)
    resumed = _run_cli(["train", str(tmp_path / "killed.yaml"), "--resume", "--no-progress"])
    assert resumed.wait(timeout=600) == 0, resumed.stdout.read()

    a = load_file(str(tmp_path / "full" / "checkpoints" / "step_0000006" / "model.safetensors"))
    b = load_file(str(tmp_path / "killed" / "checkpoints" / "step_0000006" /
                      "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    for name in ("metrics.jsonl", "eval.jsonl"):
        ra = [json.loads(x) for x in (tmp_path / "full" / name).read_text().splitlines()]
        rb = [json.loads(x) for x in (tmp_path / "killed" / name).read_text().splitlines()]
        assert _strip_timing(ra) == _strip_timing(rb)


def test_same_tokenizer_reduces_to_per_token_opd(tiny, tmp_path):
    """Identical tokenizers: every chunk 1:1 and the target is the teacher's log-prob of the
    sampled token, i.e. the advantages of direct per-token OPD."""
    from crossopd.run.config import step_settings
    from crossopd.run.load import build_sides
    from crossopd.step.rollout import rollout_and_score

    cfg = load_config(None, [f"student.model={tiny['student']}",
                             f"teacher.model={tiny['same_teacher']}", "device=cpu",
                             "rollout.max_new_tokens=12", f"output_dir={tmp_path}"])
    student, teachers = build_sides(cfg)
    examples = load_examples("bundled:arith")[:4]
    torch.manual_seed(0)
    s = rollout_and_score(student, teachers, examples, step_settings(cfg))
    # direct OPD: the teacher scores the student's own sequence (same template, same ids)
    direct = teachers["teacher"].scorer.score(s.sequences, s.spans)
    for q, d in zip(s.targets, direct):
        assert not torch.isnan(q).any()
        np.testing.assert_allclose(q.numpy(), d, rtol=0, atol=1e-5)
    assert s.stats["one_to_one_share"] == 1.0 and s.stats["coverage"] == 1.0


@pytest.mark.parametrize("overrides,message", [
    (["optim.lrr=1"], "unknown key.*optim.lrr"),
    (["steps=0"], "steps must be at least 1"),
    (["teacher.urls=http://x:1", "teacher.model=smollm2"], "exactly one of teacher.model"),
    ([], "exactly one of teacher.model"),
    (["teacher.urls=http://x:1"], "needs teacher.tokenizer"),
    (["data.path=./missing.jsonl"], "does not exist"),
    (["credit_rule=first"], "credit_rule"),
    (["teacher.plain_template=Q: {prompt}"], "needs teacher.stop"),
    (["optim.lr=fast"], "optim.lr must be a number"),
    (["steps"], "key=value"),
])
def test_bad_config_is_rejected_before_models_load(overrides, message):
    names_teacher = any(o.startswith(("teacher.model", "teacher.urls")) for o in overrides)
    base = [] if names_teacher or not overrides else ["teacher.model=smollm2"]
    with pytest.raises(ConfigError, match=message):
        load_config(None, base + overrides)


def test_bad_config_file(tmp_path):
    p = tmp_path / "bad.yaml"
    p.write_text("steps: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config(p)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_bad_data_is_rejected(tmp_path):
    p = tmp_path / "d.jsonl"
    p.write_text('{"question": "hi"}\n')
    with pytest.raises(DataError, match="needs a 'messages' or 'prompt' column"):
        load_examples(str(p))
    p.write_text('{"prompt": "fine"}\n{"prompt": "  "}\n')
    with pytest.raises(DataError, match="row 1: empty prompt"):
        load_examples(str(p))
    p.write_bytes(b"\x00\xff not json")
    with pytest.raises(DataError, match="cannot read"):
        load_examples(str(p))
    csv = tmp_path / "d.csv"
    csv.write_text("prompt\nhi\n")
    with pytest.raises(DataError, match=".jsonl, .json or .parquet"):
        load_examples(str(csv))


def test_messages_column_and_answers(tmp_path):
    p = tmp_path / "m.jsonl"
    p.write_text(json.dumps({"messages": [{"role": "system", "content": "s"},
                                          {"role": "user", "content": "2+2?"}],
                             "answer": 4}) + "\n")
    (ex,) = load_examples(str(p))
    assert ex.messages[-1] == {"role": "user", "content": "2+2?"} and ex.answer == "4"


def test_cli_train_reports_config_errors(capsys):
    from crossopd.cli.main import main

    assert main(["train", "steps=-1", "teacher.model=smollm2"]) == 2
    assert "steps must be at least 1" in capsys.readouterr().err


def test_training_against_a_real_http_teacher(tiny, tmp_path):
    """One step with the teacher behind `crossopd serve-teacher` on 127.0.0.1."""
    from crossopd.run.train import train

    from conftest import free_port, wait_ready

    port = free_port()
    server = _run_cli(["serve-teacher", "--model", tiny["teacher"], "--port", str(port),
                       "--device", "cpu", "--name", "tiny-teacher"])
    try:
        wait_ready(server, f"http://127.0.0.1:{port}/health", 120)
        cfg = _config(tiny, tmp_path / "http", steps=1, eval_prompts=0)
        cfg["teacher"] = {"urls": [f"http://127.0.0.1:{port}"], "served_name": "tiny-teacher",
                          "tokenizer": tiny["teacher"], **PLAIN}
        path = tmp_path / "http.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train(load_config(path), progress=False)
        (row,) = [json.loads(x) for x in (tmp_path / "http" / "metrics.jsonl").read_text()
                  .splitlines()]
        assert row["coverage"] == 1.0 and row["signal_tokens"] > 0 and np.isfinite(row["loss"])
    finally:
        server.kill()
        server.wait(timeout=30)


def test_first_update_is_exactly_on_policy_with_dropout_models(tmp_path):
    """A student with dropout: the update scores rollouts in eval mode, so ratio == 1 and
    nothing is clipped on the first epoch."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from crossopd.step.update import update

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2, resid_pdrop=0.5, embd_pdrop=0.5,
                                       attn_pdrop=0.5)).eval()
    seqs = [[1, 2, 3, 4, 5, 6], [7, 8, 9, 10]]
    spans = [(2, 6), (1, 4)]
    from crossopd.models.scoring import score_sequences

    with torch.no_grad():
        old = [o.double() for o in score_sequences(model, seqs, spans)]
    targets = [o - 3.0 for o in old]  # large positive advantages would be clipped if ratio != 1
    s = _scored(seqs, spans, old, targets)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0)
    out = update(_student(model), s, opt, sched, StepSettings.build())
    assert out["clip_frac"] == 0.0
    assert out["loss"] == pytest.approx(3.0, abs=1e-6)  # -A * ratio with A = -3 and ratio = 1


def test_bf16_student_moves_its_weights_like_fp32(tiny, tmp_path):
    """student.dtype: bfloat16 trains float32 master weights under bf16 autocast: at lr 1e-5
    AdamW's steps (~1e-5 per weight) are far below bf16's rounding step (~1e-3 near 0.1), so
    updating bf16 weights in place would lose most of them."""
    import copy

    from crossopd.run.load import build_sides
    from crossopd.run.train import train

    moved = {}
    for dtype in ("float32", "bfloat16"):
        cfg = load_config(None, [f"student.model={tiny['student']}",
                                 f"teacher.model={tiny['teacher']}",
                                 f"teacher.plain_template={PLAIN['plain_template']}",
                                 f"teacher.stop={PLAIN['stop']}", f"student.dtype={dtype}",
                                 "steps=1", "batch_size=2", "eval_prompts=0", "device=cpu",
                                 "rollout.max_new_tokens=8", "optim.lr=1e-5",
                                 f"output_dir={tmp_path / dtype}"])
        torch.manual_seed(0)
        student, teachers = build_sides(cfg)
        before = copy.deepcopy({k: v.float() for k, v in student.model.state_dict().items()})
        train(cfg, progress=False, sides=(student, teachers))
        assert next(student.model.parameters()).dtype == torch.float32  # master weights
        after = {k: v.float() for k, v in student.model.state_dict().items()}
        moved[dtype] = torch.cat([(after[k] - before[k]).flatten() for k in before])
    changed = (moved["bfloat16"] != 0).float().mean()
    assert changed > 0.9 * (moved["float32"] != 0).float().mean()
    cos = torch.nn.functional.cosine_similarity(moved["bfloat16"], moved["float32"], dim=0)
    assert cos > 0.5  # the same direction as the float32 run, up to bf16 compute noise


def test_evaluation_does_not_change_training_rollouts(tiny, tmp_path):
    """Evaluation samples from its own RNG stream (every device's generator forked, so on CUDA
    its reseeding cannot leak either): a run evaluating after every step trains on exactly the
    rollouts of a run that never evaluates."""
    from crossopd.run.train import train

    rows = {}
    for name, every in (("never", 0), ("every", 1)):
        cfg = _config(tiny, tmp_path / name, steps=3, eval_every=every, eval_prompts=2,
                      checkpoint_every=0)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        train(load_config(path), progress=False)
        rows[name] = _strip_timing([json.loads(x) for x in (tmp_path / name / "metrics.jsonl")
                                    .read_text().splitlines()])
    assert rows["never"] == rows["every"]
    assert len((tmp_path / "every" / "eval.jsonl").read_text().splitlines()) == 4


def _scored(seqs, spans, old, targets):
    """A ``Scored`` for the update alone: sequences, rollout log-probs and targets."""
    from crossopd.step.loss import advantages
    from crossopd.step.score import Scored

    advs = [advantages(q, o) for q, o in zip(targets, old)]
    return Scored(examples=[], sequences=seqs, spans=spans, old_logps=old, teacher_names=[],
                  requests=[], alignments=[], teacher_logps=[], targets=targets,
                  advantages=[a for a, _ in advs], signal=[v for _, v in advs], stats={})


def _student(model):
    """What ``update`` reads of a student side."""
    from types import SimpleNamespace

    return SimpleNamespace(model=model, pad_id=0, autocast=nullcontext)


@pytest.mark.parametrize("epochs", [1, 3])
def test_schedule_counts_optimizer_steps_with_or_without_signal(epochs):
    """The LR schedule counts optimizer steps: ``update_epochs`` per OPD step, also on a step
    where no token has a signal (all overflowed, say), which takes no optimizer step; so after
    N steps the schedule is at N x epochs whatever the rollouts were."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from crossopd.step.update import update

    model = GPT2LMHeadModel(GPT2Config(vocab_size=50, n_positions=32, n_embd=16, n_layer=1,
                                       n_head=2)).eval()
    seqs, spans = [[1, 2, 3, 4]], [(1, 4)]
    old = [torch.full((3,), -2.0, dtype=torch.float64)]
    empty = _scored(seqs, spans, old, [torch.full((3,), float("nan"), dtype=torch.float64)])
    full = _scored(seqs, spans, old, [torch.full((3,), -1.0, dtype=torch.float64)])
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / 10))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    out = update(_student(model), empty, opt, sched, StepSettings.build(), epochs=epochs)
    assert out["loss"] == 0.0 and sched.last_epoch == epochs
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    update(_student(model), full, opt, sched, StepSettings.build(), epochs=epochs)
    assert sched.last_epoch == 2 * epochs
    assert not all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


@pytest.mark.parametrize("policy", ["penalize", "mask", "stop"])
def test_special_token_mid_response_follows_the_policy(tiny, policy):
    """SmolLM2's <|endoftext|> (id 0) is not its end-of-turn: sampled mid-response it is penalized
    (advantage -special_penalty), masked, or ends the turn like the end-of-turn; always counted."""
    from crossopd.run.config import step_settings
    from crossopd.run.load import build_sides
    from crossopd.step.data import Example
    from crossopd.step.score import score_rollouts

    cfg = load_config(None, [f"student.model={tiny['student']}", f"teacher.model={tiny['teacher']}",
                             *(f"teacher.{k}={v}" for k, v in PLAIN.items()), "device=cpu",
                             f"rollout.special_tokens={policy}", "rollout.special_penalty=3"])
    student, teachers = build_sides(cfg)
    endoftext = student.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert (endoftext in student.fmt.stop_ids) == (policy == "stop")
    ex = Example([{"role": "user", "content": "What is 2 + 3?"}])
    body = student.vocab.encode_bytes(b"5, then")
    response = np.array(body + [endoftext] + student.vocab.encode_bytes(b" more"),
                        dtype=np.int64)
    k = len(body)  # index of the special token
    s = score_rollouts(student, teachers, [ex], [student.fmt.prompt_ids(ex.messages)],
                       [response], replace(step_settings(cfg), max_batch_tokens=4096))
    adv, valid = s.advantages[0], s.signal[0]
    if policy == "penalize":
        assert valid[k] and adv[k].item() == pytest.approx(-3.0)
        assert s.stats["penalized_special_tokens"] == 1 and s.stats["masked_special_tokens"] == 0
    else:  # "stop" here scores a response sampled past the stop, as another engine might
        assert not valid[k]
        assert s.stats["penalized_special_tokens"] == 0 and s.stats["masked_special_tokens"] == 1
    assert valid[:k].all() and s.stats["kl_per_token"] < 50  # the penalty is not a KL
    # the KL statistics count teacher-scored tokens only, never a penalized or masked special
    assert s.stats["signal_tokens"] == int(valid.sum()) - int(policy == "penalize")
    if policy == "stop":  # a sample that ends on it gets a stop chunk, as at the end-of-turn
        s = score_rollouts(student, teachers, [ex], [student.fmt.prompt_ids(ex.messages)],
                           [response[: k + 1]],
                           StepSettings.build(max_batch_tokens=4096, special_tokens="mask"))
        assert s.stats["stop_chunks"] == 1 and s.stats["masked_special_tokens"] == 0
