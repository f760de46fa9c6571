"""Statistics, table and plot for ``crossopd bench learn``: per-arm accuracy over seeds, paired
bootstrap intervals for the gain ratios and for cross minus SFT, accuracy against tokens.

The bootstrap resamples seeds and test problems together (the arms share both: seed k of every
arm starts from the same student and is scored on the same problems), so an interval covers the
seed-to-seed spread and the evaluation noise of a finite test set."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESAMPLES = 4000
MATCH_TOLERANCE = 0.02  # teachers' validation accuracies may differ by this much for a ratio


def bootstrap(correct: dict[str, np.ndarray], stat: Callable[[dict[str, np.ndarray]], float],
              seed: int = 0) -> dict:
    """``correct[arm]``: a (seeds, problems) 0/1 array of final answers. Returns the statistic
    on the data and its 95% percentile interval; resamples where the statistic is undefined (a
    ratio whose denominator is not positive) are dropped and counted."""
    rng = np.random.default_rng(seed)
    n_seeds, n_probs = next(iter(correct.values())).shape
    value = stat({k: v.mean(axis=1) for k, v in correct.items()})
    draws = np.empty(RESAMPLES)
    for b in range(RESAMPLES):
        s = rng.integers(0, n_seeds, n_seeds)
        p = rng.integers(0, n_probs, n_probs)
        draws[b] = stat({k: v[np.ix_(s, p)].mean(axis=1) for k, v in correct.items()})
    ok = np.isfinite(draws)
    lo, hi = (np.percentile(draws[ok], [2.5, 97.5]) if ok.any() else (np.nan, np.nan))
    return {"value": _num(value), "ci_low": _num(lo), "ci_high": _num(hi),
            "undefined_resamples": int((~ok).sum())}


def _num(x: float) -> float | None:
    return float(x) if np.isfinite(x) else None


def gain_ratio(arm: str, ref: str, base: str) -> Callable[[dict[str, np.ndarray]], float]:
    """(arm - base) / (ref - base) on seed-mean accuracies; NaN unless ref gained on base."""
    def stat(acc: dict[str, np.ndarray]) -> float:
        den = acc[ref].mean() - acc[base].mean()
        return (acc[arm].mean() - acc[base].mean()) / den if den > 0 else np.nan
    return stat


def difference(arm: str, ref: str) -> Callable[[dict[str, np.ndarray]], float]:
    return lambda acc: float(acc[arm].mean() - acc[ref].mean())


def tokens_to_reach(runs: list[dict], level: float) -> int | None:
    """Student tokens at the first checkpoint where the seed-mean curve reaches ``level``."""
    curves = np.array([[acc for _, acc in r["curve"]] for r in runs])
    toks = np.array([[t for t, _ in r["curve"]] for r in runs]).mean(axis=0)
    hit = np.flatnonzero(curves.mean(axis=0) >= level)
    return int(toks[hit[0]]) if hit.size else None


def save_runs(runs: dict[str, list[dict]], path: Path) -> None:
    """Every arm's per-seed curve and final answers, so the statistics can be re-derived."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({arm: [{**r, "correct": np.asarray(r["correct"]).astype(int)
                                       .tolist()} for r in rs] for arm, rs in runs.items()}))


def plot_curves(runs: dict[str, list[dict]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 3.8), dpi=110)
    for arm, rs in runs.items():
        if arm == "untrained":
            ax.axhline(rs[0]["acc"], color="gray", linestyle=":", label="untrained")
            continue
        toks = np.array([[t for t, _ in r["curve"]] for r in rs]).mean(axis=0)
        accs = np.array([[a for _, a in r["curve"]] for r in rs])
        ax.errorbar(toks, accs.mean(axis=0), yerr=accs.std(axis=0), marker="o", markersize=3,
                    capsize=2, label=arm)
    ax.set_xlabel("student tokens trained on")
    ax.set_ylabel("held-out accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def summarise(runs: dict[str, list[dict]], teachers: dict, out_dir: str | Path) -> dict:
    """Per-arm accuracy, the gain ratios and differences with paired bootstrap intervals, tokens
    to reach SFT's final accuracy, and the plot. A statistic whose arms did not run (an
    ``arms=...`` override) keeps its keys, with ``value`` None and ``refused`` naming them."""
    arms: dict[str, dict] = {}
    for arm, rs in runs.items():
        accs = [r["acc"] for r in rs]
        arms[arm] = {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                     "acc_per_seed": accs,
                     "student_tokens": int(np.mean([r["tokens"] for r in rs]))}
        if "one_to_one_share" in rs[0]:
            arms[arm]["one_to_one_share"] = float(np.mean([r["one_to_one_share"] for r in rs]))
    if "sft" in arms:
        sft_final, untrained = arms["sft"]["acc_mean"], arms["untrained"]["acc_mean"]
        for arm in [a for a in runs if a.startswith("opd_")]:
            # only meaningful when SFT itself improved on the untrained student
            need = tokens_to_reach(runs[arm], sft_final) if sft_final > untrained else None
            arms[arm]["tokens_to_sft_final"] = need
            arms[arm]["tokens_to_sft_final_ratio"] = (
                need / arms["sft"]["student_tokens"] if need is not None else None)
    correct = {arm: np.stack([r["correct"] for r in rs]).astype(float)
               for arm, rs in runs.items()}

    def stat(fn: Callable, *needed: str) -> dict:
        if missing := [a for a in needed if a not in correct]:
            return {"value": None, "ci_low": None, "ci_high": None,
                    "refused": f"not run: {', '.join(missing)}"}
        return bootstrap(correct, fn)

    rules = [a.removeprefix("opd_cross_") for a in runs if a.startswith("opd_cross_")]
    ratios = {rule: stat(gain_ratio(f"opd_cross_{rule}", "opd_same", "untrained"),
                         f"opd_cross_{rule}", "opd_same") for rule in rules}
    if not teachers["matched"]:  # every cross/same ratio would compare teachers
        why = (f"teachers differ by {teachers['difference']:.3f} on the validation split (more "
               f"than {MATCH_TOLERANCE}): the ratio would compare teachers")
        ratios = {rule: {**r, "value": None, "ci_low": None, "ci_high": None, "refused": why}
                  for rule, r in ratios.items()}
    cross = "opd_cross_proportional"
    ratio = ratios.get("proportional") or stat(gain_ratio(cross, "opd_same", "untrained"),
                                               cross, "opd_same")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "learn_curve.png"
    plot_curves(runs, plot)
    return {
        "teachers": teachers,
        "arms": arms,
        "one_to_one_share": arms.get(cross, {}).get("one_to_one_share"),
        # the headline once the oracle arm runs: the same teacher's knowledge, exactly projected,
        # against cross-OPD's chunk credit: what DPCA plus credit cost
        "ratio_cross_oracle": stat(gain_ratio(cross, "opd_oracle", "untrained"), cross,
                                   "opd_oracle"),
        "ratio_cross_same": ratio,
        "cross_same_gain_ratio": ratio["value"],  # the v1 key
        "ratios": ratios,
        "cross_minus_sft": stat(difference(cross, "sft"), cross, "sft"),
        "same_minus_sft": stat(difference("opd_same", "sft"), "opd_same", "sft"),
        "recovery_from_sft": stat(gain_ratio(cross, "opd_same", "sft"), cross, "opd_same", "sft"),
        "plot": str(plot),
    }


def _interval(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return f"n/a ({d['refused']})" if d and d.get("refused") else "n/a"
    lo, hi = d["ci_low"], d["ci_high"]
    ci = "" if lo is None else f" [95% CI {lo:.2f}, {hi:.2f}]"
    return f"{d['value']:.3f}{ci}"


def render_learn_table(r: dict) -> str:
    t = r["teachers"]
    v = t.get("validation", t)
    lines = [f"preset {r['preset']}: teachers (validation / test) T_x {v['teacher_x']:.3f} / "
             f"{t['teacher_x']:.3f}, T_s {v['teacher_s']:.3f} / {t['teacher_s']:.3f} "
             f"({'matched' if t['matched'] else 'NOT matched'})"
             + ("" if r["one_to_one_share"] is None
                else f"; 1:1 chunk share (cross) {r['one_to_one_share']:.3f}"),
             f"{'arm':<24} {'accuracy':>16} {'student tokens':>15} {'tokens to SFT acc':>18}"]
    for arm, a in r["arms"].items():
        need = a.get("tokens_to_sft_final")
        lines.append(f"{arm:<24} {a['acc_mean']:>8.3f} ± {a['acc_std']:.3f} "
                     f"{a['student_tokens']:>15} {'' if need is None else need:>18}")
    oracle = r.get("ratio_cross_oracle")
    if oracle is not None:
        lines.append("cross/oracle gain ratio (same teacher, exact targets): "
                     + (oracle.get("refused") or _interval(oracle)))
    ratio = r["ratio_cross_same"]
    lines.append("cross/same gain ratio: " + (ratio.get("refused") or _interval(ratio)))
    for rule, d in r.get("ratios", {}).items():
        lines.append(f"  {rule}: {_interval(d)}")
    lines.append(f"cross minus SFT: {_interval(r['cross_minus_sft'])}; recovery from SFT "
                 f"((cross - SFT) / (same - SFT)): {_interval(r['recovery_from_sft'])}")
    lines.append(f"plot: {r['plot']}; {r['seconds']:.0f} s")
    return "\n".join(lines)
