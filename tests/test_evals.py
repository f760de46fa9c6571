"""Answer checking and the held-out before/after summary (what `crossopd demo --json` reports)."""

from __future__ import annotations

import math

import pytest

from crossopd.evaluation.graders import answer_correct
from crossopd.evaluation.summary import heldout_summary


@pytest.mark.parametrize("response,answer,ok", [
    ("The capital of Peru is Lima.", "Lima", True),
    ("Lima", "Lima", True),
    ("the capital is BRASÍLIA, of course", "Brasilia", True),  # case and accents folded
    ("The capital of Argentina is Buenos  Aires.", "Buenos Aires", True),
    ("Limassol is in Cyprus.", "Lima", False),  # whole words only
    ("The capital is Quito. Lima is in Peru.", "Lima", False),  # first sentence only
    ("I am not sure.\nLima", "Lima", False),
    ("The answer is 67.", "67", True),  # numbers keep their own checker
    ("The answer is 68.", "67", False),
])
def test_answer_checker(response, answer, ok):
    assert answer_correct(response, answer) is ok


def _row(acc_per_prompt, kl=0.3, stop=0.5):
    return {"kl_per_byte": kl, "stop_rate": stop, "correct": acc_per_prompt,
            "accuracy": sum(acc_per_prompt) / len(acc_per_prompt)}


def test_heldout_summary_is_paired_over_prompts():
    before, after = [0, 0, 1, 0, 0.5, 0], [1, 0, 1, 0.25, 1, 1]
    s = heldout_summary([_row(before), _row([0] * 6), _row(after, kl=0.2, stop=1.0)])
    assert s["metric"] == "accuracy"
    assert (s["heldout_metric_before"], s["heldout_metric_after"]) == (1.5 / 6, 4.25 / 6)
    assert (s["heldout_kl_after"], s["heldout_stop_rate_after"]) == (0.2, 1.0)
    d = [b - a for a, b in zip(before, after)]
    mean = sum(d) / 6
    se = math.sqrt(sum((x - mean) ** 2 for x in d) / 5 / 6)  # a slow loop of the definition
    assert s["heldout_metric_change_se"] == pytest.approx(se, rel=1e-12)
    # without answers there is no metric, only KL and stop rate
    plain = heldout_summary([{"kl_per_byte": 1.0, "stop_rate": 0.5}] * 2)
    assert "metric" not in plain and plain["heldout_kl_before"] == 1.0
    assert heldout_summary([]) == {"heldout_kl_before": None, "heldout_kl_after": None}
