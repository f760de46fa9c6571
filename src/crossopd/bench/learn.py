"""``crossopd bench learn``: does the tokenizer gap cost learning? A controlled comparison at
small scale.

Everything runs on CPU: a synthetic multi-step addition task with an exact checker, two
tokenizers (the teacher's byte-level BPE merges digit runs; the student's SentencePiece-style BPE
with byte fallback splits every digit, so boundaries differ often), small GPT-2 models (teacher
T_x on the teacher tokenizer, teacher T_s on the student tokenizer as the same-tokenizer
reference, a weakly pretrained student), and arms trained on an equal budget of student tokens:

  untrained, sft (cross-entropy on T_x samples), opd_cross_{proportional,uniform,last} (OPD from
  T_x through DPCA and each credit rule), opd_cross_chunk (our ablation: chunk-level REINFORCE),
  opd_oracle (OPD on T_x's exact byte-marginal log-prob of each student token: T_x's knowledge
  without the projection), opd_same (OPD from T_s, 1:1 chunks), uld (the ULD baseline)

The headline is cross/oracle: one teacher, so it measures what DPCA plus credit cost. Teachers
come in K pairs (``bench.learn_teachers``: shipped with their digests, or trained into the
cache), each pair matched in strength on a validation split; every arm runs on every pair and
seed, and the intervals resample both (``bench.learn_stats``). Before training, a training-free
diagnosis (``bench.oracle``) compares each credit rule with the oracle target, and an identity
control checks that a cross arm whose tokenizers agree is same-tokenizer OPD exactly.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np

from crossopd import __version__
from crossopd.bench.learn_arms import run_opd_seeds, run_sft, run_uld
from crossopd.bench.learn_stats import MATCH_TOLERANCE, save_runs, summarise
from crossopd.bench.learn_task import accuracy, correct_answers, make_split
from crossopd.bench.learn_teachers import load_artifacts, locate
from crossopd.bench.machine import machine
from crossopd.bench.oracle import diagnose, identity_check
from crossopd.core.credit import BUILTIN_RULES
from crossopd.files import atomic_write_text

CROSS_RULES = tuple(BUILTIN_RULES)  # proportional, uniform, last, chunk
# opd_oracle: the cross-family teacher's exact byte-marginal targets (its knowledge without the
# chunk credit guess); opd_same: a separately trained same-tokenizer teacher
# opd_cross_1to1: proportional credit on the 1:1 chunks only (m:n chunks get no signal, counted):
# what the m:n chunks' credit adds, or costs
ARMS = ("untrained", "sft", *(f"opd_cross_{r}" for r in CROSS_RULES), "opd_cross_1to1",
        "opd_oracle", "opd_same", "uld")


# ------------------------------------------------------------------------------ presets
HEADLINE_ARMS = ("opd_cross_proportional", "opd_oracle")  # the arms of cross - oracle


@dataclass(frozen=True)
class Preset:
    digits: int = 2
    n_train: int = 4000
    # teachers stop on the validation split, arms are scored on the test split: large, so the
    # teachers' match on one carries to the other (greedy decoding of 1000 problems takes ~1 s)
    n_val: int = 2000
    n_test: int = 1000
    width: int = 64
    layers: int = 2
    teacher_target: float = 0.65  # validation accuracy at which a teacher stops training
    teacher_steps: int = 3000  # at most
    teacher_check_every: int = 25
    student_steps: int = 800
    budget_tokens: int = 80_000  # student tokens each training arm may train on
    opd_batch: int = 32
    # chosen per arm on the validation split (scripts/learn_lr_grid.py; docs/benchmarks.md);
    # OPD at 1e-3 collapsed, same-tokenizer included, in the v1 calibration
    opd_lr: float = 3e-4
    sft_lr: float = 3e-4
    uld_lr: float = 1e-3  # not in the grid
    evals: int = 4  # accuracy checkpoints along each arm
    seeds: int = 5  # student seeds per teacher pair
    # seeds per pair of the two arms of the cross - oracle statistic (opd_cross_proportional,
    # opd_oracle), where more than ``seeds`` buys its power; 0: ``seeds``. Every comparison is
    # bootstrapped over the seeds its arms share
    headline_seeds: int = 0
    # OPD students trained together (bench.stacked: one forward, backward and sampler call for
    # all of them; each exactly the model it is alone): 0 = every seed of an arm and pair
    together: int = 0
    teacher_pairs: int = 3  # independently trained (T_x, T_s) pairs: the teacher draw
    max_new_tokens: int = 24
    diagnosis_rollouts: int = 64
    arms: tuple[str, ...] = ARMS  # "untrained" always runs: every gain is measured from it


PRESETS = {
    "tiny": Preset(n_train=300, n_val=20, n_test=20, width=32, layers=1, teacher_target=0.0,
                   teacher_steps=30, teacher_check_every=10, student_steps=10,
                   budget_tokens=600, opd_batch=8, evals=2, seeds=2, teacher_pairs=2,
                   diagnosis_rollouts=8),
    # a smoke test of every arm on every shipped pair, one seed each: its output says that its
    # intervals are too wide to read
    "quick": Preset(seeds=1),
    # the preset the docs quote: three times quick's budget (SFT has levelled off there, OPD
    # has not), every pair x 4 seeds, and x 12 for cross and oracle, whose paired difference
    # needs ~36 runs per arm for its ±0.02 target (~57 min on 2 cores); every arm but the two
    # the claim is not about (chunk, our ablation, and ULD); the same model settings as
    # quick's, so both load the shipped pairs
    "standard": Preset(budget_tokens=240_000, evals=6, seeds=4, headline_seeds=12,
                       arms=tuple(a for a in ARMS if a not in ("opd_cross_chunk", "uld"))),
    "full": Preset(n_train=20_000, width=96, layers=3,
                   teacher_target=0.8, teacher_steps=8000, student_steps=1200,
                   budget_tokens=400_000, evals=8, seeds=8),
}


def with_settings(preset: Any, settings: list[str]) -> Any:
    """``key=value`` overrides on a preset, this module's or another dataclass of numbers
    (``crossopd bench learn --quick budget_tokens=240000 opd_lr=3e-4
    arms=sft,opd_cross_proportional,opd_same``)."""
    fields = {f.name for f in dataclasses.fields(preset)}
    changes: dict[str, Any] = {}
    for item in settings:
        key, sep, value = item.partition("=")
        if not sep or key not in fields:
            raise ValueError(f"{item!r}: expected KEY=VALUE with KEY one of "
                             f"{', '.join(sorted(fields))}")
        if key == "arms":
            wanted = {a.strip() for a in value.split(",") if a.strip()}
            if unknown := wanted - set(ARMS):
                raise ValueError(f"arms: unknown arm(s) {', '.join(sorted(unknown))}; "
                                 f"choose from {', '.join(ARMS)}")
            changes[key] = tuple(a for a in ARMS if a in wanted or a == "untrained")
            continue
        kind = type(getattr(preset, key))
        try:
            number = float(value)
            if kind is int and number != int(number):
                raise ValueError
            changes[key] = kind(number)
        except ValueError:
            want = "an integer" if kind is int else "a number"
            raise ValueError(f"{key}={value}: expected {want}") from None
        if key in ("seeds", "teacher_pairs", "teacher_sets", "evals", "budget_tokens") and \
                changes[key] < 1:
            raise ValueError(f"{key}={value}: must be at least 1")
        if key in ("together", "headline_seeds") and changes[key] < 0:
            raise ValueError(f"{key}={value}: 0 (see bench.learn.Preset) or more")
    return dataclasses.replace(preset, **changes)


def splits(preset: Preset) -> tuple[list, list, list]:
    """(train, validation, test) problems, disjoint."""
    train = make_split(preset.n_train, 1, digits=preset.digits)
    seen = {p for p, _, _ in train}
    test = make_split(preset.n_test, 2, exclude=seen, digits=preset.digits)
    val = make_split(preset.n_val, 3, exclude=seen | {p for p, _, _ in test},
                     digits=preset.digits)
    return train, val, test


def load_models(preset: Preset, retrain: bool = False,
                progress=print) -> tuple[list[dict[str, Any]], str, str]:
    """One models dict per teacher pair (``bench.learn_teachers``), where they came from
    (``shipped`` inside the package, ``cache`` or ``trained``) and their identity (a digest of
    their manifest's file digests)."""
    root, source = locate(preset, preset.teacher_pairs, splits(preset), retrain, progress)
    pairs = load_artifacts(root, preset.teacher_pairs)
    files = (root / "manifest.json").read_text()
    digests = json.dumps(json.loads(files)["sha256"], sort_keys=True)
    return pairs, source, hashlib.sha256(digests.encode()).hexdigest()[:16]


# bump when an arm's training or scoring code changes: kept runs of the old code then no longer
# load (the crossopd version is in the key too)
RUNS_VERSION = 2  # 2: OPD arms on bench.stacked (its sampler in place of generate)


def unit_dir(out_dir: Path, preset: Any, artifacts: str, code: str | int = RUNS_VERSION
             ) -> Path:
    """Where each finished (arm, pair, seed) run of a preset (a dataclass) is kept, keyed on
    everything it depends on but the number of seeds, pairs and arms: a killed run resumes, and
    a rerun with more seeds trains only the new ones. ``code``: the version of the arms' code."""
    fields = {k: v for k, v in asdict(preset).items()
              if k not in ("seeds", "headline_seeds", "teacher_pairs", "teacher_sets", "arms",
                           "diagnosis_rollouts", "together")}
    key = json.dumps({**fields, "artifacts": artifacts, "code": code,
                      "crossopd": __version__}, sort_keys=True)
    return out_dir / "units" / hashlib.sha1(key.encode()).hexdigest()[:12]


def cached_runs(paths: list[Path], run: Callable[[list[int]], list[dict]]
                ) -> tuple[list[dict], int]:
    """(one run per path, how many were read back): the runs not kept yet come from one
    ``run(indices)`` call (they train together), each kept at its path as it is written."""
    out: list[dict | None] = [None] * len(paths)
    for i, path in enumerate(paths):
        if path.exists():
            r = json.loads(path.read_text())
            r["correct"] = np.asarray(r["correct"], dtype=bool)
            r["curve"] = [tuple(c) for c in r["curve"]]
            out[i] = r
    missing = [i for i, r in enumerate(out) if r is None]
    if missing:
        for i, r in zip(missing, run(missing), strict=True):
            atomic_write_text(paths[i], json.dumps(
                {**r, "correct": np.asarray(r["correct"]).astype(int).tolist()}))
            out[i] = r
    return out, len(paths) - len(missing)  # type: ignore[return-value]


def bench_learn(preset_name: str = "quick", out_dir: str | Path = "runs/bench_learn",
                progress=print, settings: list[str] | None = None,
                retrain_teachers: bool = False) -> dict:
    """Runs the preset (with ``settings``, ``key=value`` overrides) over every teacher pair and
    seed and writes ``runs.json``, ``result.json`` and the plot to ``out_dir``.
    ``retrain_teachers`` trains the pairs and the student anew instead of loading them."""
    preset = with_settings(PRESETS[preset_name], settings or [])
    t_start = time.perf_counter()
    pairs, source, artifacts = load_models(preset, retrain_teachers, progress)
    units = unit_dir(Path(out_dir), preset, artifacts)
    reused = 0
    train_set, _, test_set = splits(preset)
    runs: dict[str, list[dict]] = {a: [] for a in preset.arms}
    per_pair, diagnoses = [], []
    base = correct_answers(*pairs[0]["student"], test_set, preset.max_new_tokens)
    for models in pairs:
        k = models["pair"]
        per_pair.append(_teachers(models, test_set, preset))
        progress(f"pair {k} teachers (validation / test): T_x "
                 f"{per_pair[-1]['validation']['teacher_x']:.3f} / "
                 f"{per_pair[-1]['teacher_x']:.3f}, T_s "
                 f"{per_pair[-1]['validation']['teacher_s']:.3f} / "
                 f"{per_pair[-1]['teacher_s']:.3f}")
        t0 = time.perf_counter()
        diagnoses.append({"diagnosis": diagnose(models, preset, preset.diagnosis_rollouts, 0),
                          "identity": identity_check(models, preset, seed=0)})
        progress(f"pair {k} oracle diagnosis and identity control "
                 f"({time.perf_counter() - t0:.0f} s): "
                 f"identity exact={diagnoses[-1]['identity']['exact']}")
        # common random numbers: seed s draws the same prompts and sampling seeds in every
        # arm and every pair, from the same student
        most = list(range(max(preset.seeds, preset.headline_seeds)))
        runs["untrained"] += [{"acc": float(base.mean()), "correct": base, "tokens": 0,
                               "curve": [(0, float(base.mean()))], "pair": k, "seed": seed}
                              for seed in most]
        for arm in runs:
            if arm == "untrained":
                continue
            seeds = most if arm in HEADLINE_ARMS else list(range(preset.seeds))
            found, kept = cached_runs([units / f"{arm}-pair{k}-seed{seed}.json" for seed in seeds],
                                      partial(timed_runs, arm, models, preset, seeds, train_set,
                                              test_set))
            reused += kept
            for seed, r in zip(seeds, found):
                runs[arm].append({**r, "pair": k, "seed": seed})
            progress(f"pair {k} {arm}: " + ", ".join(f"{r['acc']:.3f}" for r in found) +
                     (f" ({found[0]['seconds']:.0f} s per run)" if "seconds" in found[0]
                      else ""))
    teachers = _pooled(per_pair, source)
    save_runs(runs, Path(out_dir) / "runs.json")
    result = summarise(runs, teachers, out_dir)
    result.update(preset=preset_name, overrides=settings or [], settings=asdict(preset),
                  diagnosis=diagnoses[0]["diagnosis"], identity=diagnoses[0]["identity"],
                  by_pair=diagnoses, machine=machine(), units=str(units), reused_units=reused,
                  seconds=time.perf_counter() - t_start)
    atomic_write_text(Path(out_dir) / "result.json", json.dumps(result, indent=2))
    return result


def timed_runs(arm: str, models: dict, preset: Preset, seeds: list[int], train_set, test_set,
               which: list[int]) -> list[dict]:
    """The runs of ``seeds[i]`` for i in ``which``, OPD students ``preset.together`` at a time
    (0: all at once); ``seconds``: each group's time, shared out over its runs."""
    chosen = [seeds[i] for i in which]
    size = len(chosen) if arm in ("sft", "uld") or preset.together == 0 else preset.together
    out = []
    for lo in range(0, len(chosen), max(1, size)):
        group = chosen[lo: lo + max(1, size)]
        t0 = time.perf_counter()
        rs = run_arm(arm, models, preset, group, train_set, test_set)
        share = (time.perf_counter() - t0) / len(group)
        out += [{**r, "seconds": share, "trained_together": len(group)
                 if arm not in ("sft", "uld") else 1} for r in rs]
    return out


def run_arm(arm: str, models: dict, preset: Preset, seeds: list[int], train_set, test_set
            ) -> list[dict]:
    """One run per seed: SFT and ULD one after another, the OPD arms' students together."""
    if arm == "sft":
        return [run_sft(models, preset, seed, train_set, test_set) for seed in seeds]
    if arm == "uld":
        return [run_uld(models, preset, seed, train_set, test_set) for seed in seeds]
    opd = partial(run_opd_seeds, models, seeds=seeds, train_set=train_set, test_set=test_set,
                  preset=preset)
    if arm == "opd_oracle":
        return opd(teacher_key="teacher_x", rule="proportional", oracle=True)
    if arm == "opd_same":
        return opd(teacher_key="teacher_s", rule="proportional")
    if arm == "opd_cross_1to1":
        return opd(teacher_key="teacher_x", rule="proportional", one_to_one=True)
    return opd(teacher_key="teacher_x", rule=arm.removeprefix("opd_cross_"))


def _teachers(models: dict, test_set, preset: Preset) -> dict:
    """One pair's teachers: matched on the split they were matched on (held out from training,
    twice the test split's size); the test split's difference is reported beside it."""
    test = {k: accuracy(*models[k], test_set, preset.max_new_tokens)
            for k in ("teacher_x", "teacher_s")}
    val = {k: v["val_acc"] for k, v in models["training"].items()}
    out = {"pair": models["pair"], **test, "validation": val, "training": models["training"],
           "difference": abs(val["teacher_x"] - val["teacher_s"]),
           "test_difference": abs(test["teacher_x"] - test["teacher_s"])}
    out["matched"] = out["difference"] <= MATCH_TOLERANCE
    return out


def _pooled(per_pair: list[dict], source: str) -> dict:
    """The pairs' teachers summarised: mean accuracies, the largest difference, matched only if
    every pair is."""
    def mean(get) -> float:
        return float(np.mean([get(t) for t in per_pair]))

    names = ("teacher_x", "teacher_s")
    return {**{k: mean(lambda t, k=k: t[k]) for k in names},
            "validation": {k: mean(lambda t, k=k: t["validation"][k]) for k in names},
            "difference": max(t["difference"] for t in per_pair),
            "test_difference": max(t["test_difference"] for t in per_pair),
            "matched": all(t["matched"] for t in per_pair), "pairs": per_pair,
            "source": source}
