"""The command line, run in-process (real tokenizers) and once as a real subprocess."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from crossopd.bench import align as bench
from crossopd.cli.main import main


def test_align_json_on_real_cross_family_pair(capsys, get_vocab):
    text = "12345 × 678 = 8369910 你好 👩\u200d💻"
    assert (
        main(
            ["align", "--student", "smollm2", "--teacher", "gemma3-270m", "--text", text, "--json"]
        )
        == 0
    )
    out = json.loads(capsys.readouterr().out)
    assert out["coverage"] == 1.0 and out["bytes_equal"] is True
    assert "".join(c["text"] for c in out["chunks"]) == text
    assert out["num_chunks"] == sum(1 for c in out["chunks"] if c["index"] >= 0)
    kinds = {c["kind"] for c in out["chunks"]}
    assert {"1:1", "m:n"} <= kinds  # digits/words 1:1, byte-split CJK and emoji m:n
    sv, tv = get_vocab("smollm2"), get_vocab("gemma3-270m")
    for c in out["chunks"]:
        assert sv.concat_bytes(c["student_ids"]) == tv.concat_bytes(c["teacher_ids"])
        assert sv.concat_bytes(c["student_ids"]) == c["text"].encode()


def test_json_stdout_is_the_result_alone(capsys, monkeypatch):
    """With --json, stdout carries one object: whatever a library prints to stdout while the
    command runs (DeepSpeed announces its accelerator when first imported) goes to stderr."""
    import crossopd.cli.view as cli_view
    real = cli_view.alignment_json

    def noisy(*a, **k):
        print("[WARNING] Setting accelerator to CPU.")
        return real(*a, **k)

    monkeypatch.setattr(cli_view, "alignment_json", noisy)
    assert main(["align", "--student", "smollm2", "--teacher", "gemma3-270m", "--text", "hi",
                 "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["coverage"] == 1.0
    assert "Setting accelerator to CPU" in err


def test_align_terminal_and_html(tmp_path, capsys):
    page = tmp_path / "view.html"
    f = tmp_path / "resp.bin"
    f.write_bytes(b"ok \xff\xfe then text")  # invalid UTF-8 from a file
    assert (
        main(
            [
                "align",
                "--student",
                "llama3",
                "--teacher",
                "mistral-v3",
                "--file",
                str(f),
                "--html",
                str(page),
                "--no-color",
            ]
        )
        == 0
    )
    out = capsys.readouterr().out
    assert "coverage 1.0000" in out and "||" in out
    html = page.read_text()
    assert "<table>" in html and "\\xff" in html


def test_align_bad_tokenizer_gives_clear_error(capsys):
    assert main(["align", "--student", "./missing", "--teacher", "llama3", "--text", "x"]) == 2
    assert "no tokenizer at" in capsys.readouterr().err


def test_help_runs_as_a_real_process():
    for args in (["--help"], ["align", "--help"], ["bench", "--help"], ["demo", "--help"]):
        r = subprocess.run(
            [sys.executable, "-m", "crossopd", *args],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert r.returncode == 0 and "usage" in r.stdout


def test_bench_align_shape_small():
    """The benchmark pipeline at a tiny size (asserts the shape, not the speed)."""
    res = bench.bench_align(pairs=(("llama3", "mistral-v3"),), sizes=(64,), quick=True)
    (row,) = res["results"]
    assert set(row) >= {"pair", "tokens", "crossopd_tok_per_s", "baseline_tok_per_s", "speedup"}
    assert row["pair"] == "llama3->mistral-v3" and row["tokens"] == 64
    assert row["crossopd_tok_per_s"] > 0 and row["coverage"] == 1.0
    assert row["baseline_tok_per_s"] > 0 and row["speedup"] > 0  # source checkout: baseline found


def test_bench_unknown_target_is_explicit(capsys):
    with pytest.raises(SystemExit) as e:
        main(["bench", "steps"])
    assert e.value.code == 2
    assert "invalid choice: 'steps'" in capsys.readouterr().err


@pytest.mark.parametrize("n", [1, 7, 300])
def test_sample_response_has_exact_length(n):
    from crossopd.core.tokens import ByteVocab

    v = ByteVocab.from_pretrained("cl100k")
    assert bench.sample_response(v, n).size == n


def test_doctor_json_contract(capsys):
    assert main(["doctor", "--student", "smollm2", "--teacher", "gemma3-270m", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    for side in ("student", "teacher"):
        assert {"kind", "vocab_size", "end_of_turn"} <= set(r[side])
    assert r["student"]["kind"] == "byte_level" and r["student"]["vocab_size"] == 49152
    assert r["teacher"]["kind"] == "metaspace" and r["teacher"]["vocab_size"] == 262144
    assert r["student"]["end_of_turn"] == "<|im_end|>"
    assert r["student"]["stop_ids"] == [2]  # <|im_end|>, also SmolLM2's EOS
    assert r["teacher"]["stop_ids"] == [1]  # plain template: a text marker, so Gemma's EOS only
    assert r["samples"] and all({"text", "coverage", "one_to_one_share"} <= set(s)
                                for s in r["samples"])
    assert all(s["coverage"] == 1.0 for s in r["samples"])
    assert "<|im_start|>assistant" in r["student_prompt"]
    assert "<|im_start|>" not in r["teacher_prompt"] and "Question:" in r["teacher_prompt"]
    assert any("no chat template" in w for w in r["warnings"])  # Gemma 3 270M is a base model
    assert any("no token for 21 byte values" in w for w in r["warnings"])  # SmolLM2's vocab


def test_doctor_terminal_report_with_explicit_plain_template(capsys):
    assert main(["doctor", "--student", "smollm2", "--teacher", "gemma3-270m",
                 "--teacher-template", "Q: {prompt}\nA:", "--teacher-stop", "\n\nQ:"]) == 0
    out = capsys.readouterr().out
    assert "end of turn '<|im_end|>'" in out and "end of turn '\\n\\nQ:'" in out
    assert "Q: What is 12 × 7?\\nA:'" in out
    assert "teacher has no chat template" not in out


def test_doctor_score_measures_seam_and_stop(capsys):
    # Gemma 3 270M scores the bundled pair's format: with the seam rendered, the first response
    # token costs about what the rest does (glued onto "Answer:" it cost 7 nats more)
    assert main(["doctor", "--student", "smollm2", "--teacher", "gemma3-270m", "--score",
                 "--device", "cpu", "--teacher-template", "Question: {prompt}\nAnswer:",
                 "--teacher-stop", "\n\nQuestion:", "--json"]) == 0
    r = json.loads(capsys.readouterr().out)
    costs = r["format_costs"]
    assert costs["rest_per_token"] < 0 and costs["stop_chunk"] < 0
    assert costs["first_token"] > costs["rest_per_token"] - 3.0
    assert not any("seam" in w for w in r["warnings"])


def test_format_cost_warnings_name_the_seam_and_the_stop():
    from crossopd.cli.doctor import check_format_costs

    warnings: list[str] = []
    check_format_costs({"first_token": -7.9, "rest_per_token": -0.9, "stop_chunk": -6.0},
                       warnings)
    assert len(warnings) == 2
    assert "seam" in warnings[0] and "7.0 nats" in warnings[0]
    assert "end-of-turn" in warnings[1]
    warnings.clear()
    check_format_costs({"first_token": -2.4, "rest_per_token": -0.9, "stop_chunk": -3.1},
                       warnings)
    assert warnings == []


def test_readme_python_snippet_runs():
    """The README's Python API block runs as written and gives one target per student token."""
    import re
    from pathlib import Path

    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    (code,) = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    scope: dict = {}
    exec(compile(code, "README.md", "exec"), scope)
    assert scope["q"].shape == (len(scope["student_ids"]),)
    assert scope["a"].coverage == 1.0


def test_shipped_configs_validate():
    """`crossopd demo` runs configs/demo.yaml; the commented example validates as shipped apart
    from its placeholder data file."""
    from crossopd.cli.train import demo_config_path
    from crossopd.run.config import load_config

    demo = load_config(demo_config_path())
    assert (demo.student.model, demo.teacher.model, demo.steps) == ("smollm2", "gemma3-270m", 10)
    assert demo.teacher.plain_template == "Question: {prompt}\nAnswer:"
    assert demo.teacher.stop == "\n\nQuestion:" and demo.optim.lr == 1e-4
    # the teacher's worked examples share no name with a prompt the student trains or is scored on
    from crossopd.step.data import load_examples

    asked = " ".join(e.messages[-1]["content"] for e in load_examples(demo.data.path))
    shots = [line.split()[1] for line in demo.teacher.system.split("\n")
             if line.startswith("Question: ")]
    assert len(shots) == 3 and not any(f" {name} " in f" {asked} " for name in shots)
    example = load_config(demo_config_path().with_name("example.yaml"), ["data.path=bundled:arith"])
    assert example.credit_rule == "proportional" and example.loss.clip_high == 0.28
    qwen = load_config(demo_config_path("qwen"))
    assert (qwen.student.model, qwen.teacher.model) == ("smollm2", "qwen2.5-coder-1.5b")
    assert qwen.teacher.plain_template is None and qwen.data.path == demo.data.path


def test_overrides_may_follow_flags(tmp_path, monkeypatch):
    """`crossopd train CONFIG --resume key=value` parses the override (argparse alone would
    refuse it); a stray non-override is still an error."""
    from crossopd.cli import train as train_cli

    seen = {}
    monkeypatch.setattr(train_cli, "cmd_train", lambda args: seen.setdefault("args", args) and 0)
    parser_args = ["train", "run.yaml", "--no-progress", "steps=3", "--resume", "optim.lr=1e-5"]
    main(parser_args)
    args = seen["args"]
    assert args.config == "run.yaml" and args.resume and args.no_progress
    assert args.overrides == ["steps=3", "optim.lr=1e-5"]
    with pytest.raises(SystemExit):
        main(["align", "--student", "smollm2", "--teacher", "smollm2", "--text", "x", "y=1"])


def test_serve_teacher_takes_vllms_flag_name():
    from crossopd.cli.main import build_parser

    for flag in ("--served-model-name", "--name"):
        args = build_parser().parse_args(["serve-teacher", "--model", "smollm2", flag, "t"])
        assert args.name == "t"
