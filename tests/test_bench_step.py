"""`crossopd bench step` on tiny models: real engine runs per row, the JSON contract, phases
that add up, and the model-free own-work timing."""

from __future__ import annotations

import pytest

from crossopd.bench.step import PHASES, bench_step, render_step


def test_bench_step_rows_and_overhead(tiny, tmp_path):
    # the native rows only: the TRL engine runs the same way (a `crossopd train engine=trl`
    # child) and costs a minute more here; its phases are read the same way plus time/step_s
    r = bench_step(quick=True, out_dir=tmp_path, engines=("native",), peers=False,
                   student=tiny["student"], teacher=tiny["teacher"],
                   same_teacher=tiny["same_teacher"])
    assert [(x["engine"], x["pair"]) for x in r["rows"]] == [("native", "cross"),
                                                            ("native", "same")]
    for row in r["rows"]:
        assert set(row["phases"]) == set(PHASES) and row["steps"] == 2
        assert row["student_tokens"] > 0 and row["tok_per_s"] > 0 and row["peak_rss_mb"] > 50
        assert row["seconds"] == pytest.approx(sum(row["phases"].values()))
        assert all(v >= 0 for v in row["phases"].values())
    assert r["cross_overhead_share"] is not None and abs(r["cross_overhead_share"]) < 0.5
    own = r["own_seconds_per_4k_response"]
    assert own["cross"] > 0 and own["same"] > 0
    assert "cross-family overhead" in render_step(r)
