"""A learning-rate grid for ``crossopd bench learn --multi-teacher``, judged on the validation
split (the one the specialists were matched on), so the choice does not look at the test
numbers the benchmark reports.

- OPD: one rate for every OPD arm alike, chosen by the condition the benchmark's other
  comparisons rest on: each specialist alone (``opd_add_own``, ``opd_sub_own``) teaches its own
  skill. The rate with the largest *smaller* of the two validation gains over the untrained
  student wins.
- SFT (``sft_routed``): the rate with the highest validation accuracy on both sub-tasks.

Every teacher set, seeds 0 and 1 (trained together). Each run is one line of
``<out>/runs.jsonl`` (kept: a widened grid trains only its new points); the summary and the
chosen rates go to ``<out>/lr_grid.json``.

    python scripts/learn_multi_lr_grid.py [out_dir]     # ~30 min on 2 cores
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from crossopd.bench.learn_multi import MULTI_PRESETS, run_arm
from crossopd.bench.learn_multi_models import load_artifacts, locate, splits
from crossopd.bench.learn_task import correct_answers

GRID = {
    "opd_add_own": (5e-5, 1e-4, 2e-4, 3e-4, 1e-3),
    "opd_sub_own": (5e-5, 1e-4, 2e-4, 3e-4, 1e-3),
    "sft_routed": (1e-4, 3e-4, 1e-3),
}
SEEDS = [0, 1]


def main(out_dir: str = "runs/learn_multi_lr_grid") -> None:
    t0 = time.perf_counter()
    preset = MULTI_PRESETS["standard"]
    root, _ = locate(preset, preset.teacher_sets, False, print)
    sets = load_artifacts(root, preset.teacher_sets)
    full = splits(preset)
    # every arm judged on the validation split: it stands where the test split stood
    data = {kind: (train, val, val) for kind, (train, val, _) in full.items()}
    n = preset.n_val
    val = data["add"][2] + data["sub"][2]
    base = correct_answers(*sets[0]["student"], val, preset.max_new_tokens)
    untrained = {"add": float(base[:n].mean()), "sub": float(base[n:].mean())}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    log = out / "runs.jsonl"
    kept = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    done = {(r["arm"], r["lr"], r["set"], r["seed"]) for r in kept}
    for arm, lrs in GRID.items():
        for lr in lrs:
            p = replace(preset, sft_lr=lr) if arm == "sft_routed" else replace(preset, opd_lr=lr)
            for models in sets:
                k = models["pair"]
                if all((arm, lr, k, s) in done for s in SEEDS):
                    continue
                for s, r in zip(SEEDS, run_arm(arm, models, p, SEEDS, data)):
                    c = np.asarray(r["correct"], dtype=float)
                    rec = {"arm": arm, "lr": lr, "set": k, "seed": s,
                           "add": float(c[:n].mean()), "sub": float(c[n:].mean())}
                    kept.append(rec)
                    with log.open("a") as f:
                        f.write(json.dumps(rec) + "\n")
                    print(rec, flush=True)
    table = {arm: {f"{lr:g}": {part: float(np.mean([r[part] for r in kept
                                                    if r["arm"] == arm and r["lr"] == lr]))
                               for part in ("add", "sub")} for lr in lrs}
             for arm, lrs in GRID.items()}
    opd_lrs = sorted(set(GRID["opd_add_own"]) & set(GRID["opd_sub_own"]))

    def smaller_gain(lr: float) -> float:
        return min(table["opd_add_own"][f"{lr:g}"]["add"] - untrained["add"],
                   table["opd_sub_own"][f"{lr:g}"]["sub"] - untrained["sub"])

    chosen = {"opd_lr": max(opd_lrs, key=smaller_gain),
              "sft_lr": max(GRID["sft_routed"], key=lambda lr: sum(
                  table["sft_routed"][f"{lr:g}"].values()))}
    result = {"untrained": untrained, "validation_accuracy": table,
              "smaller_own_gain": {f"{lr:g}": smaller_gain(lr) for lr in opd_lrs},
              "chosen": chosen, "seeds": SEEDS, "sets": len(sets),
              "seconds": time.perf_counter() - t0}
    (out / "lr_grid.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
