"""``crossopd eval --benchmark``: the shipped benchmarks graded on their own references
(--gold), the graders on answers that must and must not match, local files, the bad inputs
(one line naming what exists), a real model on GSM8K, and eval_benchmark in a training run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.cli.main import main
from crossopd.evaluation.benchmark_runs import summarise
from crossopd.evaluation.benchmarks import SHIPPED, bench_data, gpqa_options, load_benchmark
from crossopd.evaluation.graders import choice_letter, last_boxed, math_correct

EXPECTED_N = {"gsm8k": 1319, "math500": 500, "aime25": 30, "gpqa_diamond": 198}


def _run(capsys, *argv: str) -> tuple[int, dict | None, str]:
    rc = main(["eval", *argv])
    out = capsys.readouterr()
    return rc, json.loads(out.out) if out.out.strip().startswith("{") else None, out.err


@pytest.mark.parametrize("name", sorted(EXPECTED_N))
def test_gold_grades_every_reference_correct(name, tmp_path, capsys):
    path = tmp_path / "gold.jsonl"
    rc, r, _ = _run(capsys, "--benchmark", name, "--gold", "--json", "--out", str(path))
    assert rc == 0 and r["failed"] == []
    assert (r["benchmark"], r["n"], r["accuracy"], r["samples_per_item"]) == \
        (name, EXPECTED_N[name], 1.0, 1)
    assert {"stderr", "pass_at_k", "samples_path"} <= set(r)
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(records) == EXPECTED_N[name] and len({x["id"] for x in records}) == len(records)


def test_gpqa_questions_are_not_written_out(tmp_path, capsys):
    path = tmp_path / "gpqa.jsonl"
    _run(capsys, "--benchmark", "gpqa_diamond", "--gold", "--json", "--out", str(path))
    with open(bench_data("gpqa", "gpqa_diamond.csv"), encoding="utf-8", newline="") as f:
        questions = [r["Question"].strip() for r in csv.DictReader(f)]
    text = path.read_text(encoding="utf-8")
    assert '"question"' not in text and not any(q[:80] in text for q in questions)


def test_gpqa_options_fixed_per_item_and_letters_spread():
    bench = load_benchmark("gpqa_diamond")
    again = load_benchmark("gpqa_diamond")
    assert [i.question for i in bench.items] == [i.question for i in again.items]
    letters = [i.reference for i in bench.items]
    assert set(letters) == set("ABCD") and max(letters.count(x) for x in "ABCD") < 80
    opts, letter = gpqa_options("rec1", "right", ["w1", "w2", "w3"])
    assert sorted(opts) == ["right", "w1", "w2", "w3"] and opts["ABCD".index(letter)] == "right"


def test_math500_reference_is_the_solutions_last_box():
    first = load_benchmark("math500", limit=1).items[0]
    assert first.reference == "\\left( 3, \\frac{\\pi}{2} \\right)"


@pytest.mark.parametrize(("response", "reference", "ok"), [
    ("so \\boxed{\\frac{1}{2}}", "0.5", True),
    ("the answer is \\boxed{18}.", "18", True),
    ("the answer is \\boxed{17}.", "18", False),
    ("I think 18, no wait: \\boxed{19}", "18", False),
    ("nothing here", "18", False),
    ("\\boxed{\\left( 3, \\frac{\\pi}{2} \\right)}", "\\left( 3, \\frac{\\pi}{2} \\right)", True),
    ("\\boxed{(3, \\pi)}", "\\left( 3, \\frac{\\pi}{2} \\right)", False),
])
def test_math_grader(response, reference, ok):
    assert math_correct(response, reference) is ok


@pytest.mark.parametrize(("response", "letter"), [
    ("Reasoning...\nAnswer: C", "C"), ("the answer is (b)", "B"), ("**Answer:** D", "D"),
    ("Answer: A\nOn reflection, Answer: B", "B"), ("\\boxed{C}", "C"), ("(A)", "A"),
    ("I cannot tell", None), ("Answer: E", None),
])
def test_choice_letter(response, letter):
    assert choice_letter(response) == letter


@given(st.text(alphabet="ab1+ {}\\x", max_size=30).filter(
    lambda s: s.count("{") == s.count("}") and "\\boxed" not in s and "\\fbox" not in s
    and all(s[:i].count("{") >= s[:i].count("}") for i in range(len(s) + 1))),
    st.text(alphabet="ab {}", max_size=10))
@settings(max_examples=200, deadline=None)
def test_last_boxed_returns_the_balanced_content(inner, tail):
    assert last_boxed(f"x \\boxed{{0}} y \\boxed{{{inner}}}{tail.replace('{', '')}") == inner


def test_summary_accuracy_stderr_and_pass_at_k():
    records = [{"correct": c} for c in ([True, False], [False, False], [True, True])]
    bench = load_benchmark("aime25", limit=3)
    r = summarise(bench, records, None, None)
    assert r["accuracy"] == pytest.approx(0.5) and r["pass_at_k"] == pytest.approx(2 / 3)
    assert r["stderr"] == pytest.approx(0.5 / 3 ** 0.5)  # per-item 0.5, 0, 1


def _write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_local_files_with_mapped_columns(tmp_path, capsys):
    rows = [{"problem": "2+2?", "solution": "It is 4.\n#### 4"},
            {"problem": "half?", "solution": "So \\boxed{\\frac12}"}]
    jsonl = _write_jsonl(tmp_path / "mine.jsonl", rows)
    import pyarrow as pa
    import pyarrow.parquet as pq

    parquet = tmp_path / "mine.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    for path in (jsonl, parquet):
        rc, r, _ = _run(capsys, "--benchmark", str(path), "--gold", "--json", "--question-field",
                        "problem", "--answer-field", "solution", "--out", str(tmp_path / "o"))
        assert rc == 0 and (r["n"], r["accuracy"]) == (2, 1.0)
    # a reference the grader cannot read back (an unbalanced brace) is listed and fails
    _write_jsonl(tmp_path / "bad.jsonl", [{"question": "q", "answer": "4"},
                                          {"id": "broken", "question": "q", "answer": "}"}])
    rc, r, _ = _run(capsys, "--benchmark", str(tmp_path / "bad.jsonl"), "--gold", "--json",
                    "--out", str(tmp_path / "o"))
    assert rc == 1 and r["failed"] == ["broken"] and r["accuracy"] == 0.5


@pytest.mark.parametrize(("argv", "names"), [
    (["--benchmark", "gsm9k", "--gold"], ["unknown benchmark 'gsm9k'", "gsm8k", "math500",
                                          "aime25", "gpqa_diamond"]),
    (["--benchmark", "NOCOLS", "--gold"], ["no column 'question'", "prompt, label"]),
    (["--benchmark", "gsm8k", "--gold", "--limit", "0"], ["--limit must be at least 1"]),
    (["--benchmark", "missing.jsonl", "--gold"], ["missing.jsonl does not exist"]),
    (["--benchmark", "gsm8k"], ["give a MODEL or --gold"]),
])
def test_bad_inputs_give_one_line_naming_what_exists(argv, names, tmp_path, capsys,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    _write_jsonl(tmp_path / "nocols.jsonl", [{"prompt": "p", "label": "1"}])
    argv = [str(tmp_path / "nocols.jsonl") if a == "NOCOLS" else a for a in argv]
    rc, _, err = _run(capsys, *argv)
    assert rc == 2 and len(err.strip().splitlines()) == 1, err
    for name in names:
        assert name in err


def test_eval_benchmark_config_is_checked_before_models_load():
    from crossopd.run.config import ConfigError, load_config

    with pytest.raises(ConfigError, match="eval_benchmark: unknown benchmark 'gsm9k'.*gsm8k"):
        load_config(None, ["teacher.model=gemma3-270m", "eval_benchmark=gsm9k"])
    with pytest.raises(ConfigError, match="eval_benchmark_limit must be at least 0"):
        load_config(None, ["teacher.model=gemma3-270m", "eval_benchmark=gsm8k",
                           "eval_benchmark_limit=-1"])
    assert set(SHIPPED) == set(EXPECTED_N)


def test_smollm2_on_gsm8k_subset(tmp_path, capsys):
    """A real model on CPU: 8 items, 2 samples each (short responses keep the test quick)."""
    path = tmp_path / "smol.jsonl"
    rc, r, err = _run(capsys, "smollm2", "--benchmark", "gsm8k", "--limit", "8", "--samples",
                      "2", "--max-new-tokens", "24", "--json", "--out", str(path))
    assert rc == 0, err
    assert {"benchmark", "n", "samples_per_item", "accuracy", "stderr", "pass_at_k",
            "samples_path"} <= set(r)
    assert (r["benchmark"], r["n"], r["samples_per_item"]) == ("gsm8k", 8, 2)
    assert 0 <= r["accuracy"] <= r["pass_at_k"] <= 1 and r["stderr"] is not None
    assert "generating" in err  # the progress bar
    records = [json.loads(x) for x in path.read_text().splitlines()]
    assert len(records) == 8 and all(len(x["responses"]) == 2 and len(x["correct"]) == 2
                                     for x in records)
    assert any(x["responses"][0].strip() for x in records)
