"""A learning-rate grid for the main arms of ``crossopd bench learn --quick``: SFT, cross-tokenizer
OPD (proportional) and same-tokenizer OPD, each at v2's first learning rate (SFT 1e-3, OPD 1e-4)
and its neighbours (OPD only upward: 1e-3 collapsed in v1).

Each arm's learning rate is chosen on the validation split (the one the teachers were matched
on), and the arms are then compared at their chosen rates on the test split, so the choice does
not look at the numbers it is judged by. Writes ``<out>/lr_grid.json``.

    python scripts/learn_lr_grid.py [out_dir]      # ~15 min on 2 cores, teachers cached
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from crossopd.bench.learn import PRESETS, load_models, splits
from crossopd.bench.learn_arms import run_opd, run_sft
from crossopd.bench.learn_stats import bootstrap, difference, gain_ratio
from crossopd.bench.learn_task import correct_answers

GRID = {  # the grid that ran; the chosen rates are now the preset's defaults
    "sft": (3e-4, 1e-3, 3e-3),
    "opd_cross_proportional": (1e-4, 3e-4),  # 1e-3 collapsed every OPD arm in v1
    "opd_same": (1e-4, 3e-4),
}


def main(out_dir: str = "runs/learn_lr_grid") -> None:
    t0 = time.perf_counter()
    preset = PRESETS["quick"]
    models = load_models(preset)[0][0]  # teacher pair 0
    train_set, val_set, test_set = splits(preset)
    both = val_set + test_set  # one evaluation pass; split by problem afterwards
    n_val = len(val_set)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs: dict[str, dict[float, np.ndarray]] = {a: {} for a in GRID}
    for arm, lrs in GRID.items():
        for lr in lrs:
            saved = out / f"{arm}_lr{lr:g}.npy"  # a widened grid re-uses the points it has
            if saved.exists():
                runs[arm][lr] = np.load(saved)
                continue
            p = replace(preset, sft_lr=lr) if arm == "sft" else replace(preset, opd_lr=lr)
            per_seed = []
            for seed in range(preset.seeds):
                if arm == "sft":
                    r = run_sft(models, p, seed, train_set, both)
                else:
                    teacher = "teacher_x" if arm == "opd_cross_proportional" else "teacher_s"
                    r = run_opd(models, teacher, "proportional", p, seed, train_set, both)
                per_seed.append(np.asarray(r["correct"], dtype=float))
            acc = runs[arm][lr] = np.stack(per_seed)
            np.save(saved, acc)
            print(f"{arm} lr {lr:g}: validation {acc[:, :n_val].mean():.3f}, "
                  f"test {acc[:, n_val:].mean():.3f} ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    grid = {arm: {f"{lr:g}": {"validation": float(c[:, :n_val].mean()),
                              "test": float(c[:, n_val:].mean())}
                  for lr, c in per_lr.items()} for arm, per_lr in runs.items()}
    chosen = {arm: max(per_lr, key=lambda lr: per_lr[lr][:, :n_val].mean())
              for arm, per_lr in runs.items()}
    test = {arm: runs[arm][lr][:, n_val:] for arm, lr in chosen.items()}
    untrained = correct_answers(*models["student"], test_set, preset.max_new_tokens).astype(float)
    test["untrained"] = np.broadcast_to(untrained, test["sft"].shape)
    result = {
        "grid": grid,
        "chosen_lr": {arm: f"{lr:g}" for arm, lr in chosen.items()},
        "test_at_chosen": {arm: float(c.mean()) for arm, c in test.items()},
        "cross_minus_sft": bootstrap(test, difference("opd_cross_proportional", "sft")),
        "same_minus_sft": bootstrap(test, difference("opd_same", "sft")),
        "ratio_cross_same": bootstrap(test, gain_ratio("opd_cross_proportional", "opd_same",
                                                       "untrained")),
        "seconds": time.perf_counter() - t0,
    }
    (out / "lr_grid.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main(*sys.argv[1:])
