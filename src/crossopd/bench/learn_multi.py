"""``crossopd bench learn --multi-teacher``: does a student learn two skills at once from two
specialist teachers of two tokenizer families, on-policy, and what does mixing them do?

The models (``bench.learn_multi_models``): K shipped sets of two specialists, T_add and T_sub,
each strong on its own sub-task and on its own tokenizer, and one weak student on a third
tokenizer. Arms, at an equal budget of student tokens, on rows of both sub-tasks:

  untrained; opd_add_own, opd_sub_own (a specialist alone, on its own sub-task's rows: each
  must measurably teach its own skill, or the benchmark cannot say anything about two);
  opd_add, opd_sub (one specialist scores every row of both); routed (each row to
  its sub-task's specialist: ``Example.teacher``); mixed (``mix`` 1:1: both specialists score
  every row, advantages averaged); sft_routed (cross-entropy on each specialist's own samples of
  its own sub-task, re-spelled for the student)

The OPD arms train through ``learn_arms.run_opd_seeds`` (the step library's scoring, alignment
and credit; an arm's seeds trained together, each exactly the model it is alone), with common
random numbers: seed s draws the same prompts and sampling seeds in every arm and set. Accuracy
per sub-task, greedy, on held-out problems; every comparison with ``bench.learn_stats``'s
two-level bootstrap (teacher sets, then seeds, with the test problems).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path

import numpy as np

from crossopd.bench.learn import cached_runs, unit_dir, with_settings
from crossopd.bench.learn_arms import run_opd_seeds, run_sft, teacher_samples
from crossopd.bench.learn_multi_models import (
    KINDS,
    SPECIALISTS,
    kind_of,
    load_artifacts,
    locate,
    splits,
)
from crossopd.bench.learn_stats import bootstrap, by_pair, difference
from crossopd.bench.learn_task import correct_answers
from crossopd.bench.machine import machine
from crossopd.files import atomic_write_text

ARMS = ("untrained", "opd_add_own", "opd_sub_own", "opd_add", "opd_sub", "routed", "mixed",
        "sft_routed")
RUNS_VERSION = 1


@dataclass(frozen=True)
class MultiPreset:
    n_train: int = 4000  # per sub-task
    n_val: int = 1000  # per sub-task: where each specialist stops training
    n_test: int = 500  # per sub-task
    width: int = 64
    layers: int = 2
    teacher_target: float = 0.65  # each specialist's validation accuracy on its own sub-task
    teacher_steps: int = 3000  # at most
    teacher_check_every: int = 25
    weak_share: float = 0.05  # the share of the other sub-task in a specialist's data
    # the student's pretraining: ``sub`` is the harder sub-task for its digit-split tokenizer
    # (1,000 steps on equal shares left it at 0.06 on sub, where no teacher taught it), so 2/3
    # of its rows are ``sub``; 900 steps start it at 0.30 on add and 0.13 on sub
    student_steps: int = 900
    student_sub_share: float = 0.67
    budget_tokens: int = 240_000
    opd_batch: int = 32
    # chosen on the validation split (scripts/learn_multi_lr_grid.py): the rate at which the
    # smaller of the two specialists' own-skill gains is largest; at bench learn's 3e-4 the
    # ``add`` specialist alone taught nothing
    opd_lr: float = 1e-4
    sft_lr: float = 3e-4  # the same grid's choice for sft_routed
    evals: int = 4
    seeds: int = 4
    together: int = 0  # OPD students trained together (0: all seeds of an arm and set)
    teacher_sets: int = 3
    max_new_tokens: int = 24


MULTI_PRESETS = {
    "tiny": MultiPreset(n_train=200, n_val=20, n_test=20, width=32, layers=1, teacher_target=0.0,
                        teacher_steps=20, teacher_check_every=10, student_steps=10,
                        budget_tokens=400, opd_batch=8, evals=1, seeds=2, teacher_sets=2),
    # every arm on every shipped set, one seed: a smoke test whose intervals cannot be read
    "quick": MultiPreset(seeds=1),
    "standard": MultiPreset(),
}


def route(prompt: str) -> str:
    """Routing: a row goes to its sub-task's specialist."""
    return f"teacher_{kind_of(prompt)}"


def run_arm(arm: str, models: dict, preset: MultiPreset, seeds: list[int], data: dict
            ) -> list[dict]:
    """One run per seed of ``arm`` on one teacher set; the OPD arms' students together."""
    train = data["add"][0] + data["sub"][0]
    test = data["add"][2] + data["sub"][2]
    if arm == "sft_routed":
        # each specialist's samples of its own sub-task, half the data each
        return [run_sft(models, preset, seed, train, test, samples=[
            s for i, kind in enumerate(KINDS)
            for s in teacher_samples(models, preset, seed + 1000 * i, data[kind][0],
                                     teacher_key=f"teacher_{kind}", n=1000)])
            for seed in seeds]
    opd = partial(run_opd_seeds, models, rule="proportional", preset=preset, seeds=seeds,
                  train_set=train, test_set=test)
    if arm in ("opd_add_own", "opd_sub_own"):  # the specialist on its own sub-task's rows
        kind = arm[4:7]
        return opd(teacher_key=f"teacher_{kind}", train_set=data[kind][0])
    if arm in ("opd_add", "opd_sub"):
        return opd(teacher_key=f"teacher_{arm[4:]}")
    if arm == "routed":
        return opd(teacher_key=SPECIALISTS, route=route)
    if arm == "mixed":
        return opd(teacher_key=SPECIALISTS, mix=dict.fromkeys(SPECIALISTS, 1.0))
    raise ValueError(f"unknown arm {arm!r}; one of {', '.join(ARMS)}")


def timed(arm: str, models: dict, preset: MultiPreset, seeds: list[int], data: dict,
          which: list[int]) -> list[dict]:
    """The runs of ``seeds[i]`` for i in ``which``, ``preset.together`` OPD students at a time;
    ``seconds``: each group's time shared out over its runs."""
    chosen = [seeds[i] for i in which]
    size = len(chosen) if arm == "sft_routed" or preset.together == 0 else preset.together
    out = []
    for lo in range(0, len(chosen), size):
        group = chosen[lo: lo + size]
        t0 = time.perf_counter()
        rs = run_arm(arm, models, preset, group, data)
        out += [{**r, "seconds": (time.perf_counter() - t0) / len(group)} for r in rs]
    return out


def summarise(runs: dict[str, list[dict]], n_test: int) -> dict:
    """Per arm: accuracy on each sub-task and on both; the comparisons the benchmark asks about,
    each with its two-level interval and half-width."""
    parts = {"add": slice(0, n_test), "sub": slice(n_test, None), "union": slice(None)}
    arrays = {arm: by_pair(rs) for arm, rs in runs.items()}  # (sets, seeds, problems)
    arms = {arm: {**{f"acc_{k}": float(a[..., s].mean()) for k, s in parts.items()},
                  "student_tokens": int(np.mean([r["tokens"] for r in runs[arm]])),
                  "seconds_per_run": float(np.mean([r.get("seconds", 0.0) for r in runs[arm]]))}
            for arm, a in arrays.items()}

    def diff(arm: str, ref: str, part: str) -> dict:
        sub = {k: v[..., parts[part]] for k, v in arrays.items() if k in (arm, ref)}
        return bootstrap(sub, difference(arm, ref))

    comparisons = {
        # each specialist alone teaches its own skill: without this, nothing below can be read
        "opd_add_own_minus_untrained_on_add": diff("opd_add_own", "untrained", "add"),
        "opd_sub_own_minus_untrained_on_sub": diff("opd_sub_own", "untrained", "sub"),
        # one specialist for every row, on its own skill and on the other
        "opd_add_minus_untrained_on_add": diff("opd_add", "untrained", "add"),
        "opd_sub_minus_untrained_on_sub": diff("opd_sub", "untrained", "sub"),
        "opd_add_minus_untrained_on_sub": diff("opd_add", "untrained", "sub"),
        "opd_sub_minus_untrained_on_add": diff("opd_sub", "untrained", "add"),
        # routing: both skills at once
        "routed_minus_untrained_on_add": diff("routed", "untrained", "add"),
        "routed_minus_untrained_on_sub": diff("routed", "untrained", "sub"),
        # what routing costs against each specialist alone on its own skill (which spends the
        # whole budget on that skill)
        "routed_minus_opd_add_own_on_add": diff("routed", "opd_add_own", "add"),
        "routed_minus_opd_sub_own_on_sub": diff("routed", "opd_sub_own", "sub"),
        # what routing adds where the other specialist is weak
        "routed_minus_opd_sub_on_add": diff("routed", "opd_sub", "add"),
        "routed_minus_opd_add_on_sub": diff("routed", "opd_add", "sub"),
        "mixed_minus_routed_on_union": diff("mixed", "routed", "union"),
        "routed_minus_sft_routed_on_union": diff("routed", "sft_routed", "union"),
    }

    def above(name: str) -> bool:
        return comparisons[name]["ci_low"] is not None and comparisons[name]["ci_low"] > 0

    verdict = {
        "specialists_teach": above("opd_add_own_minus_untrained_on_add") and
        above("opd_sub_own_minus_untrained_on_sub"),
        "routed_teaches_both": above("routed_minus_untrained_on_add") and
        above("routed_minus_untrained_on_sub")}
    return {"arms": arms, "comparisons": comparisons, "verdict": verdict}


def bench_learn_multi(preset_name: str = "quick", out_dir: str | Path = "runs/bench_learn_multi",
                      progress=print, retrain_teachers: bool = False,
                      settings: list[str] | None = None) -> dict:
    """Runs the preset (``settings``: ``key=value`` overrides of ``MultiPreset`` fields) over
    every teacher set and seed; ``retrain_teachers``: train the sets and the student anew
    (into the cache) instead of loading the shipped ones. Writes
    ``runs.json`` and ``result.json`` to ``out_dir``. Finished runs are kept under
    ``out_dir/units``: a killed run resumes, and more seeds train only the new ones."""
    preset = with_settings(MULTI_PRESETS[preset_name], settings or [])
    t_start = time.perf_counter()
    root, source = locate(preset, preset.teacher_sets, retrain_teachers, progress)
    sets = load_artifacts(root, preset.teacher_sets)
    manifest = json.loads((root / "manifest.json").read_text())
    artifacts = hashlib.sha256(json.dumps(manifest["sha256"], sort_keys=True).encode()
                               ).hexdigest()[:16]
    units = unit_dir(Path(out_dir), preset, artifacts, code=f"multi-{RUNS_VERSION}")
    data = splits(preset)
    test = data["add"][2] + data["sub"][2]
    n = preset.n_test
    base = correct_answers(*sets[0]["student"], test, preset.max_new_tokens)
    teachers = []
    for models in sets:
        acc = {name: correct_answers(*models[name], test, preset.max_new_tokens)
               for name in (*SPECIALISTS, "student")}
        teachers.append({name: {"acc_add": float(c[:n].mean()), "acc_sub": float(c[n:].mean())}
                         for name, c in acc.items()} | {"training": models["training"]})
        progress(f"set {models['pair']} (accuracy add / sub): " + ", ".join(
            f"{name} {teachers[-1][name]['acc_add']:.3f} / {teachers[-1][name]['acc_sub']:.3f}"
            for name in acc))
    seeds = list(range(preset.seeds))
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    reused = 0
    for models in sets:
        k = models["pair"]
        runs["untrained"] += [{"correct": base, "tokens": 0, "pair": k, "seed": s}
                              for s in seeds]
        for arm in ARMS[1:]:
            found, kept = cached_runs([units / f"{arm}-set{k}-seed{s}.json" for s in seeds],
                                      partial(timed, arm, models, preset, seeds, data))
            reused += kept
            runs[arm] += [{**r, "pair": k, "seed": s} for s, r in zip(seeds, found)]
            progress(f"set {k} {arm} (add / sub): " + ", ".join(
                f"{np.mean(r['correct'][:n]):.3f} / {np.mean(r['correct'][n:]):.3f}"
                for r in found))
    result = {"preset": preset_name, "settings": asdict(preset), "teachers": teachers,
              "artifacts": {"source": source, "digest": artifacts},
              **summarise(runs, n), "machine": machine(), "units": str(units),
              "reused_units": reused, "seconds": time.perf_counter() - t_start}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "runs.json", json.dumps(
        {arm: [{**r, "correct": np.asarray(r["correct"]).astype(int).tolist()} for r in rs]
         for arm, rs in runs.items()}))
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    return result


def render_multi_table(r: dict) -> str:
    lines = [f"{'set':<4} " + "  ".join(f"{name} add/sub" for name in (*SPECIALISTS, "student"))]
    for k, t in enumerate(r["teachers"]):
        lines.append(f"{k:<4} " + "  ".join(
            f"{t[name]['acc_add']:.3f}/{t[name]['acc_sub']:.3f}".rjust(len(name) + 8)
            for name in (*SPECIALISTS, "student")))
    lines.append(f"{'arm':<12} {'add':>7} {'sub':>7} {'both':>7} {'student tokens':>15}")
    for arm, a in r["arms"].items():
        lines.append(f"{arm:<12} {a['acc_add']:>7.3f} {a['acc_sub']:>7.3f} "
                     f"{a['acc_union']:>7.3f} {a['student_tokens']:>15}")
    for name, d in r["comparisons"].items():
        v = ("undefined" if d["value"] is None else
             f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}] "
             f"(±{d['half_width']:.3f})")
        lines.append(f"{name:<38} {v}")
    yes = {k: "yes" if v else "no" for k, v in r["verdict"].items()}
    lines.append(f"each specialist teaches its own skill: {yes['specialists_teach']}; "
                 f"routing teaches both at once: {yes['routed_teaches_both']}")
    lines.append(f"{r['seconds']:.0f} s, {r['machine']['cpu']}")
    return "\n".join(lines)
