"""Statistics, table and plot for ``crossopd bench learn``: per-arm accuracy over teacher pairs
and seeds, two-level bootstrap intervals for the gain ratios and for cross minus SFT with their
half-widths against the power targets, accuracy against tokens.

The bootstrap has two levels: teacher pairs, then student seeds within each pair, with the test
problems resampled too (the arms share all three: seed k of pair j in every arm starts from the
same student, learns from the same teachers and is scored on the same problems). So an interval
covers which teachers were drawn, the seed-to-seed spread and the evaluation noise of a finite
test set."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np

RESAMPLES = 4000
MATCH_TOLERANCE = 0.02  # teachers' validation accuracies may differ by this much for a ratio
# interval half-widths at which the headline readings are told apart: a ratio of 0.9 from one
# of 0.6 (the projection keeps most of the signal, or loses much of it), and a gain over SFT of
# about 0.02 accuracy from none
POWER_TARGETS = {"ratio_cross_oracle": 0.15, "cross_minus_oracle": 0.02, "cross_minus_sft": 0.01}
# the cost of the tokenizer gap, read either way: as a gain ratio or as accuracy points
EITHER = ("ratio_cross_oracle", "cross_minus_oracle")


def bootstrap(correct: dict[str, np.ndarray], stat: Callable[[dict[str, np.ndarray]], float],
              seed: int = 0) -> dict:
    """``correct[arm]``: a (pairs, seeds, problems) 0/1 array of final answers (or (seeds,
    problems): one pair). Two-level bootstrap: each resample draws teacher pairs with
    replacement, then student seeds with replacement within each drawn pair, and test problems
    (shared by every arm, pair and seed); ``stat`` sees each arm's per-(pair, seed) accuracies.
    Returns the statistic on the data, its 95% percentile interval and the interval's
    half-width; resamples where the statistic is undefined (a ratio whose denominator is not
    positive) are dropped and counted."""
    correct = {k: v[None] if v.ndim == 2 else v for k, v in correct.items()}
    rng = np.random.default_rng(seed)
    n_pairs, n_seeds, n_probs = next(iter(correct.values())).shape
    value = stat({k: v.mean(axis=2).ravel() for k, v in correct.items()})
    # problem resamples as weights: per (pair, seed) accuracy on each resample is one product
    picks = rng.integers(0, n_probs, (RESAMPLES, n_probs))
    weights = np.zeros((RESAMPLES, n_probs))
    np.add.at(weights, (np.arange(RESAMPLES)[:, None], picks), 1.0 / n_probs)
    pairs = rng.integers(0, n_pairs, (RESAMPLES, n_pairs))
    seeds = rng.integers(0, n_seeds, (RESAMPLES, n_pairs, n_seeds))
    units = (pairs[:, :, None] * n_seeds + seeds).reshape(RESAMPLES, -1)  # flat (pair, seed)
    draws_by_arm = {}
    for k, v in correct.items():
        acc = v.reshape(n_pairs * n_seeds, n_probs) @ weights.T  # (units, resamples)
        draws_by_arm[k] = np.take_along_axis(acc.T, units, axis=1)  # (resamples, units drawn)
    draws = np.array([stat({k: d[b] for k, d in draws_by_arm.items()})
                      for b in range(RESAMPLES)])
    ok = np.isfinite(draws)
    lo, hi = (np.percentile(draws[ok], [2.5, 97.5]) if ok.any() else (np.nan, np.nan))
    return {"value": _num(value), "ci_low": _num(lo), "ci_high": _num(hi),
            "half_width": _num((hi - lo) / 2), "undefined_resamples": int((~ok).sum())}


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


def by_pair(rs: list[dict]) -> np.ndarray:
    """An arm's final answers as a (pairs, seeds, problems) array; runs without a ``pair`` key
    are one pair."""
    pairs = sorted({r.get("pair", 0) for r in rs})
    rows = [np.stack([np.asarray(r["correct"], dtype=float) for r in rs
                      if r.get("pair", 0) == k]) for k in pairs]
    if len({len(x) for x in rows}) != 1:
        raise ValueError("every teacher pair needs the same number of seeds")
    return np.stack(rows)


def power(result: dict, runs: int | None = None) -> dict:
    """Each headline statistic's interval half-width against its target, and whether every
    statistic that ran met it (``readable``): an interval wider than that cannot tell the
    readings apart that the benchmark exists for. ``runs_for_target`` projects the (pair, seed)
    runs per arm the target would take, were the half-width to shrink as 1/sqrt(runs) (it
    shrinks more slowly while there are few pairs: the teacher draw then dominates). ``runs``:
    the runs per arm behind each statistic, else each statistic's own ``runs``."""
    out: dict[str, dict] = {}
    for key, target in POWER_TARGETS.items():
        hw = result[key].get("half_width")
        n = result[key].get("runs") if runs is None else runs
        out[key] = {"half_width": hw, "target": target,
                    "met": None if hw is None else bool(hw <= target),
                    "runs": n,
                    "runs_for_target": None if not hw or not n else
                    math.ceil(n * (hw / target) ** 2)}
    either = [out[k]["met"] for k in EITHER if out[k]["met"] is not None]
    rest = [d["met"] for k, d in out.items() if k not in EITHER and d["met"] is not None]
    readable = bool(either or rest) and (any(either) or not either) and all(rest)
    return {"statistics": out, "readable": readable}


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
        if "seconds" in rs[0]:
            arms[arm]["seconds_per_run"] = float(np.mean([r["seconds"] for r in rs]))
        if "pair" in rs[0]:  # the teacher draw: each pair's mean over its seeds
            arms[arm]["acc_per_pair"] = by_pair(rs).mean(axis=(1, 2)).tolist()
        if "one_to_one_share" in rs[0]:
            arms[arm]["one_to_one_share"] = float(np.mean([r["one_to_one_share"] for r in rs]))
        if "m_n_masked_tokens" in rs[0]:  # opd_cross_1to1: tokens of m:n chunks, no signal
            arms[arm]["m_n_masked_tokens"] = int(np.mean([r["m_n_masked_tokens"] for r in rs]))
    if "sft" in arms:
        sft_final, untrained = arms["sft"]["acc_mean"], arms["untrained"]["acc_mean"]
        for arm in [a for a in runs if a.startswith("opd_")]:
            # only meaningful when SFT itself improved on the untrained student
            need = tokens_to_reach(runs[arm], sft_final) if sft_final > untrained else None
            arms[arm]["tokens_to_sft_final"] = need
            arms[arm]["tokens_to_sft_final_ratio"] = (
                need / arms["sft"]["student_tokens"] if need is not None else None)
    correct = {arm: by_pair(rs) for arm, rs in runs.items()}

    def stat(fn: Callable, *needed: str) -> dict:
        """``fn``'s interval over the (pair, seed) runs that all of ``needed`` (and the
        untrained student) share: arms may run more seeds (``headline_seeds``)."""
        if missing := [a for a in needed if a not in correct]:
            return {"value": None, "ci_low": None, "ci_high": None,
                    "refused": f"not run: {', '.join(missing)}"}
        used = (*needed, "untrained")
        seeds = min(correct[a].shape[1] for a in used)
        r = bootstrap({a: correct[a][:, :seeds] for a in used}, fn)
        return {**r, "runs": correct[needed[0]].shape[0] * seeds}

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
    result = {
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
        # the tokenizer gap's cost in accuracy points: cross-OPD against the same teacher's
        # exact targets, paired over (pair, seed) and problems
        "cross_minus_oracle": stat(difference(cross, "opd_oracle"), cross, "opd_oracle"),
        # 1:1 chunks only against proportional credit on every chunk: what m:n credit adds
        "one_to_one_minus_cross": stat(difference("opd_cross_1to1", cross), "opd_cross_1to1",
                                       cross),
        "ratio_1to1_oracle": stat(gain_ratio("opd_cross_1to1", "opd_oracle", "untrained"),
                                  "opd_cross_1to1", "opd_oracle"),
        "cross_minus_sft": stat(difference(cross, "sft"), cross, "sft"),
        "same_minus_sft": stat(difference("opd_same", "sft"), "opd_same", "sft"),
        "recovery_from_sft": stat(gain_ratio(cross, "opd_same", "sft"), cross, "opd_same", "sft"),
        "plot": str(plot),
    }
    result["power"] = power(result)
    return result


def _interval(d: dict | None) -> str:
    if not d or d.get("value") is None:
        return f"n/a ({d['refused']})" if d and d.get("refused") else "n/a"
    lo, hi = d["ci_low"], d["ci_high"]
    ci = "" if lo is None else f" [95% CI {lo:.2f}, {hi:.2f}]"
    return f"{d['value']:.3f}{ci}"


def render_learn_table(r: dict) -> str:
    t = r["teachers"]
    lines = [f"preset {r['preset']}: {len(t.get('pairs', [t]))} teacher pair(s) "
             f"({t.get('source', 'built')}), {'matched' if t['matched'] else 'NOT matched'}"
             + ("" if r["one_to_one_share"] is None
                else f"; 1:1 chunk share (cross) {r['one_to_one_share']:.3f}")]
    for pair in t.get("pairs", [t]):
        v = pair.get("validation", pair)
        lines.append(f"  pair {pair.get('pair', 0)} (validation / test): T_x "
                     f"{v['teacher_x']:.3f} / {pair['teacher_x']:.3f}, T_s "
                     f"{v['teacher_s']:.3f} / {pair['teacher_s']:.3f}")
    lines.append(f"{'arm':<24} {'accuracy':>16} {'student tokens':>15} "
                 f"{'tokens to SFT acc':>18}")
    for arm, a in r["arms"].items():
        need = a.get("tokens_to_sft_final")
        lines.append(f"{arm:<24} {a['acc_mean']:>8.3f} ± {a['acc_std']:.3f} "
                     f"{a['student_tokens']:>15} {'' if need is None else need:>18}")
    oracle = r.get("ratio_cross_oracle")
    if oracle is not None:
        lines.append("cross/oracle gain ratio (same teacher, exact targets): "
                     + (oracle.get("refused") or _interval(oracle)))
    for key, label in (("cross_minus_oracle", "cross minus oracle (accuracy points)"),
                       ("one_to_one_minus_cross", "1:1 chunks only minus proportional"),
                       ("ratio_1to1_oracle", "1:1-only/oracle gain ratio")):
        if key in r:
            lines.append(f"{label}: " + (r[key].get("refused") or _interval(r[key])))
    ratio = r["ratio_cross_same"]
    lines.append("cross/same gain ratio: " + (ratio.get("refused") or _interval(ratio)))
    for rule, d in r.get("ratios", {}).items():
        lines.append(f"  {rule}: {_interval(d)}")
    lines.append(f"cross minus SFT: {_interval(r['cross_minus_sft'])}; recovery from SFT "
                 f"((cross - SFT) / (same - SFT)): {_interval(r['recovery_from_sft'])}")
    pw = r.get("power")
    if pw:
        widths = ", ".join(
            f"{k} ±{d['half_width']:.3f} (target ±{d['target']}"
            + ("" if d["met"] else f"; ~{d['runs_for_target']} runs per arm, not "
               f"{d['runs']}, would reach it") + ")"
            for k, d in pw["statistics"].items() if d["half_width"] is not None)
        smoke = " (the quick preset is a smoke test)" if r["preset"] == "quick" else ""
        lines.append(("intervals narrow enough to read: " if pw["readable"] else
                      f"intervals NOT narrow enough to read{smoke}: ")
                     + (widths or "no headline statistic ran"))
    cpu = r.get("machine", {}).get("cpu", "unknown CPU")
    lines.append(f"plot: {r['plot']}; {r['seconds']:.0f} s on {cpu} (bit-for-bit reproducible "
                 f"on this CPU model only)")
    return "\n".join(lines)
