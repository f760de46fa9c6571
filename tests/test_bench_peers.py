"""TRL peer trainers for ``crossopd bench step`` (crossopd.bench.peers): a real, tiny run."""

from __future__ import annotations

import pytest

from crossopd.bench.peers import PeerUnavailable, _result_line, run_peer

KEYS = {"trainer", "mode", "pair", "steps", "student_tokens", "seconds", "tok_per_s",
        "peak_rss_mb", "note"}


def test_result_line_skips_the_trainer_summary() -> None:
    # transformers prints its own train summary as a Python dict repr on stdout
    out = "{'train_runtime': '1.0'}\n{\"trainer\": \"gold\", \"steps\": 1}\nbye\n"
    assert _result_line(out) == {"trainer": "gold", "steps": 1}
    assert _result_line("{'a': 1}\n") is None


def test_distillation_same_pair_runs_in_a_subprocess() -> None:
    pytest.importorskip("trl")
    row = run_peer("distillation", "same", batch_size=2, max_new_tokens=8, steps=1,
                   warmup_steps=0)
    assert KEYS <= set(row)
    assert row["trainer"] == "distillation" and row["pair"] == "same" and row["steps"] == 1
    assert 1 <= row["student_tokens"] <= 2 * 8  # counted, not the nominal budget
    assert row["tok_per_s"] > 0 and row["seconds"] > 0 and row["peak_rss_mb"] > 0
    assert "reverse KL" in row["mode"] and row["note"]


def test_distillation_refuses_the_cross_pair_with_trls_reason() -> None:
    pytest.importorskip("trl")
    with pytest.raises(PeerUnavailable, match="vocab_size"):
        run_peer("distillation", "cross", batch_size=2, max_new_tokens=8, steps=1,
                 warmup_steps=0)


def test_bad_arguments() -> None:
    with pytest.raises(ValueError):
        run_peer("gkd", "same", batch_size=2, max_new_tokens=8, steps=1)
    with pytest.raises(ValueError):
        run_peer("gold", "same", batch_size=0, max_new_tokens=8, steps=1)
