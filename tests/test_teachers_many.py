"""Several teachers of different families: routing by a data column, mixing with weights, the
per-teacher metrics in both engines, and every bad input as one line before any model loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from crossopd.run.config import ConfigError, load_config
from crossopd.step.data import DataError, load_examples

from conftest import PLAIN


def _teachers(tiny: dict) -> list[str]:
    """Gemma-tokenizer teacher with the plain format, SmolLM2-tokenizer teacher with ChatML."""
    return [f"teachers.gemma.model={tiny['teacher']}",
            *(f"teachers.gemma.{k}={v}" for k, v in PLAIN.items()),
            f"teachers.smol.model={tiny['same_teacher']}"]


def _routed_data(tmp_path: Path, n: int = 12) -> Path:
    rows = [{"prompt": e.messages[0]["content"], "answer": e.answer,
             "teacher": "gemma" if i % 3 else "smol"}
            for i, e in enumerate(load_examples("bundled:arith")[:n])]
    path = tmp_path / "routed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _overrides(tiny: dict, out: Path, *extra: str) -> list[str]:
    return [f"student.model={tiny['student']}", *_teachers(tiny), "device=cpu",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "batch_size=2",
            "steps=2", "eval_prompts=2", "checkpoint_every=0", "data.heldout_size=3",
            "optim.lr=1e-3", f"output_dir={out}", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


PER_TEACHER = ("sequences", "signal_tokens", "coverage", "one_to_one_share", "kl_per_token",
               "stop_rate", "overflowed_sequences")


@pytest.mark.parametrize("engine", ["native", "trl"])
def test_routed_by_a_teacher_column_in_both_engines(tiny, tmp_path, engine):
    """Each row goes to the teacher its `teacher` column names; each teacher's sequences are
    the rows routed to it, and the whole-step counts are their sums."""
    from crossopd.run.load import load_splits
    from crossopd.run.train import train

    data = _routed_data(tmp_path)
    cfg = load_config(None, _overrides(tiny, tmp_path / "run", f"engine={engine}",
                                       f"data.path={data}"))
    train(cfg, progress=False)
    rows = _rows(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        for name in ("gemma", "smol"):
            assert {f"teachers/{name}/{k}" for k in PER_TEACHER} <= set(r), (engine, name)
        assert r["teachers/gemma/sequences"] + r["teachers/smol/sequences"] == r["sequences"]
        if r["teachers/smol/sequences"]:  # the same tokenizer: all 1:1
            assert r["teachers/smol/one_to_one_share"] == 1.0
    if engine == "native":  # the native engine's data order is a pure function of the step
        from crossopd.engines.native import step_examples

        examples, _ = load_splits(cfg)
        for r in rows:
            batch = step_examples(examples, r["step"] - 1, cfg.batch_size, cfg.seed)
            smol = sum(e.teacher == "smol" for e in batch) * cfg.rollout.samples_per_prompt
            assert r["teachers/smol/sequences"] == smol
    evals = _rows(tmp_path / "run" / "eval.jsonl")
    assert all("teachers/gemma/kl_per_byte" in e or "teachers/smol/kl_per_byte" in e
               for e in evals)


def test_mixed_targets_are_the_weighted_sum_of_each_teachers(tiny, tmp_path):
    """teacher_mix: every teacher scores every rollout; the targets are the weighted sum of the
    teachers' own targets (computed here by hand from each teacher alone), weights
    renormalised where a teacher has no signal."""
    from crossopd.run.load import build_sides
    from crossopd.step.rollout import sample_rollouts
    from crossopd.step.score import score_rollouts
    from crossopd.step.settings import StepSettings

    cfg = load_config(None, _overrides(tiny, tmp_path / "run",
                                       "teacher_mix={gemma: 3, smol: 1}"))
    student, teachers = build_sides(cfg)
    examples = load_examples("bundled:arith")[:4]
    torch.manual_seed(0)
    exs, prompts, responses = sample_rollouts(student, examples,
                                              StepSettings.build(max_new_tokens=8))
    mixed = score_rollouts(student, teachers, exs, prompts, responses,
                           StepSettings.build(mix=cfg.teacher_mix))
    alone = {name: score_rollouts(student, {name: teachers[name]}, exs, prompts, responses,
                                  StepSettings.build(), old_logps=mixed.old_logps)
             for name in teachers}
    checked = 0
    for i, q in enumerate(mixed.targets):
        g, s = alone["gemma"].targets[i].numpy(), alone["smol"].targets[i].numpy()
        for j in range(len(q)):
            parts = [(w, x) for w, x in ((3.0, g[j]), (1.0, s[j])) if not np.isnan(x)]
            want = sum(w * x for w, x in parts) / sum(w for w, _ in parts) if parts else np.nan
            np.testing.assert_allclose(q[j].item(), want, rtol=0, atol=1e-12)
            checked += 1
    assert checked > 0
    st = mixed.stats
    assert st["teachers/gemma/sequences"] == st["teachers/smol/sequences"] == len(exs)
    assert "mix_partial_tokens" in st


def test_mix_targets_renormalise_and_count():
    from crossopd.step.teaching import mix_targets

    nan = np.nan
    q, partial = mix_targets([np.array([-1.0, -2.0, nan, nan]), np.array([-3.0, nan, -4.0, nan])],
                             [1.0, 3.0])
    np.testing.assert_allclose(q[:3], [(-1 * 1 - 3 * 3) / 4, -2.0, -4.0])
    assert np.isnan(q[3]) and partial == 2


def test_mixed_run_completes_with_per_teacher_metrics(tiny, tmp_path, capsys):
    from crossopd.run.train import train

    cfg = load_config(None, _overrides(tiny, tmp_path / "run",
                                       "teacher_mix={gemma: 1, smol: 1}", "steps=1"))
    result = train(cfg, progress=False)
    (row,) = _rows(tmp_path / "run" / "metrics.jsonl")
    assert row["teachers/gemma/sequences"] == row["teachers/smol/sequences"] == row["sequences"]
    assert row["signal_tokens"] > 0 and result["heldout_kl_after"] is not None
    from crossopd.run.report import teacher_names

    assert teacher_names([row]) == ["gemma", "smol"]  # a line per teacher in the plots
    # `crossopd eval` of the trained student reads the run's teachers: the KL to each
    from crossopd.cli.main import main

    capsys.readouterr()
    assert main(["eval", str(tmp_path / "run" / "final"), "--json", "device=cpu"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert {"teachers/gemma/kl_per_byte", "teachers/smol/kl_per_byte"} <= set(r)


def test_one_teacher_under_teachers_gives_the_numbers_of_teacher(tiny, tmp_path):
    """`teachers: {teacher: ...}` is the single-teacher run, number for number."""
    from crossopd.run.train import train

    base = [f"student.model={tiny['student']}", "device=cpu", "rollout.max_new_tokens=8",
            "batch_size=2", "steps=2", "eval_prompts=2", "checkpoint_every=0",
            "data.heldout_size=3"]
    one = [f"teacher.model={tiny['teacher']}", *(f"teacher.{k}={v}" for k, v in PLAIN.items())]
    many = [f"teachers.teacher.model={tiny['teacher']}",
            *(f"teachers.teacher.{k}={v}" for k, v in PLAIN.items())]
    rows = {}
    for name, keys in (("one", one), ("many", many)):
        train(load_config(None, [*base, *keys, f"output_dir={tmp_path / name}"]), progress=False)
        rows[name] = [{k: v for k, v in r.items() if not k.startswith("time/")}
                      for r in _rows(tmp_path / name / "metrics.jsonl")]
    assert rows["one"] == rows["many"]


@pytest.mark.parametrize("extra,message", [
    (["teacher_mix={gemma: -1, smol: 1}"], r"teacher_mix.gemma must be a number >= 0, got -1"),
    (["teacher_mix={gemma: lots}"], r"teacher_mix.gemma must be a number >= 0, got 'lots'"),
    (["teacher_mix={gemma: 1, phi: 1}"], r"teacher_mix names 'phi'.*teachers: gemma, smol"),
    (["teacher_mix={gemma: 1}", "data.default_teacher=smol"], r"teacher_mix .* conflict"),
    (["data.default_teacher=phi"], r"data.default_teacher 'phi' is not a teacher.*gemma, smol"),
    (["teacher.model=smollm2"], r"teacher: \(one teacher\) or teachers:"),
])
def test_bad_teacher_config_is_one_line(tiny, tmp_path, extra, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, _overrides(tiny, tmp_path, *extra))


def test_two_teachers_serving_the_same_model_on_one_url_is_refused(tiny, tmp_path):
    same = ["teachers.a.urls=[http://127.0.0.1:9/v1]", "teachers.a.served_name=t",
            f"teachers.a.tokenizer={tiny['teacher']}", "teachers.b.urls=[http://127.0.0.1:9]",
            "teachers.b.served_name=t", f"teachers.b.tokenizer={tiny['teacher']}"]
    with pytest.raises(ConfigError, match="teachers.a and teachers.b are the same model"):
        load_config(None, [f"student.model={tiny['student']}", *same])


def test_rows_naming_an_unknown_teacher_or_routing_under_a_mix_fail_before_models(tiny,
                                                                                  tmp_path):
    from crossopd.run.load import load_splits

    data = tmp_path / "bad.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+1?", "teacher": t}) + "\n"
                            for i, t in enumerate(["gemma", "smol", "gemma", "phi", "smol"])))
    cfg = load_config(None, _overrides(tiny, tmp_path, f"data.path={data}"))
    with pytest.raises(DataError, match=r"bad.jsonl row 3: no teacher named 'phi'; teachers: "
                                        r"gemma, smol"):
        load_splits(cfg)
    mixed = load_config(None, _overrides(tiny, tmp_path, f"data.path={_routed_data(tmp_path)}",
                                         "teacher_mix={gemma: 1, smol: 1}"))
    with pytest.raises(DataError, match=r"row 0: names teacher .* teacher_mix"):
        load_splits(mixed)


def test_default_teacher_takes_rows_without_one(tiny, tmp_path):
    from crossopd.run.load import load_splits

    cfg = load_config(None, _overrides(tiny, tmp_path, "data.default_teacher=smol"))
    train, held = load_splits(cfg)
    assert {e.teacher for e in train + held} == {"smol"}


def test_doctor_reports_each_pair(capsys):
    from crossopd.cli.main import main

    assert main(["doctor", "--student", "smollm2", "--teacher", "gemma3-270m", "--teacher",
                 "smollm2", "--teacher-template", "Question: {prompt}\\nAnswer:",
                 "--teacher-template", "", "--teacher-stop", "\\n\\nQuestion:",
                 "--teacher-stop", "", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    assert [p["teacher_name"] for p in r["pairs"]] == ["gemma3-270m", "smollm2"]
    assert r["pairs"][1]["mean_one_to_one_share"] == 1.0  # the student's own tokenizer
    assert r["teacher"] == r["pairs"][0]["teacher"]  # the single-pair keys: the first pair
