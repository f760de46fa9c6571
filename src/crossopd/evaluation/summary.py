"""Summaries of evaluations: the before/after of a run's held-out evaluations, and the one
standard error every evaluation reports."""

from __future__ import annotations

import math


def heldout_summary(evals: list[dict]) -> dict:
    """Before/after of the held-out evaluations (first and last row of eval.jsonl): reverse KL
    per byte, stop rate, and the task metric with standard errors over prompts (a prompt's value
    is the mean over its samples). The change's standard error is paired: the spread of the
    per-prompt differences, divided by sqrt(n). With ``eval_benchmark`` also that benchmark's
accuracy before and after, each with its standard error over items. Without evaluations the KL
keys are None."""
    if not evals:
        return {"heldout_kl_before": None, "heldout_kl_after": None}
    first, last = evals[0], evals[-1]
    out = {"heldout_kl_before": first["kl_per_byte"], "heldout_kl_after": last["kl_per_byte"],
           "heldout_stop_rate_before": first["stop_rate"],
           "heldout_stop_rate_after": last["stop_rate"]}
    if "benchmark_accuracy" in first and "benchmark_accuracy" in last:
        out.update(benchmark=last["benchmark"], benchmark_n=last["benchmark_n"],
                   benchmark_accuracy_before=first["benchmark_accuracy"],
                   benchmark_accuracy_after=last["benchmark_accuracy"],
                   benchmark_stderr_before=first["benchmark_stderr"],
                   benchmark_stderr_after=last["benchmark_stderr"])
    if "accuracy" not in first or "accuracy" not in last:
        return out
    out.update(metric="accuracy", heldout_metric_before=first["accuracy"],
               heldout_metric_after=last["accuracy"])
    a, b = first.get("correct"), last.get("correct")
    if a and b and len(a) == len(b):
        pairs = [(x, y) for x, y in zip(a, b) if x is not None and y is not None]
        if len(pairs) > 1:
            out["heldout_metric_change_se"] = standard_error([y - x for x, y in pairs])
            out["heldout_metric_se_before"] = standard_error([x for x, _ in pairs])
            out["heldout_metric_se_after"] = standard_error([y for _, y in pairs])
    return out


def standard_error(values: list[float]) -> float:
    n = len(values)
    mean = sum(values) / n
    return math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n)
