"""What trained students of ``crossopd bench learn`` write: re-trains the runs of one teacher
pair and some seeds in the named arms (standard preset; each run is bit-identical to the one
the benchmark keeps; given a kept ``runs.json``, each run's accuracy there is printed beside
the reproduced one), then decodes the test problems greedily and sorts every answer by
``learn_task.answer_kind`` (correct; the first sum, the copy or the last sum wrong; not of the
worked solution's form, ended or run to the token cap).

    python scripts/learn_trace_students.py PAIR SEEDS [ARMS] [RUNS_JSON]
    python scripts/learn_trace_students.py 0 1,2,3 opd_cross_1to1,opd_cross_proportional \\
        docs/bench_learn/standard-2026-12-05/runs.json   # ~45 s per arm and pair on 2 cores

Prints one JSON line per run: the categories' shares, the mean answer length, examples.
"""

from __future__ import annotations

import copy
import json
import sys
from collections import Counter

from crossopd.bench.learn import PRESETS, load_models, splits
from crossopd.bench.learn_arms import run_opd_seeds
from crossopd.bench.learn_task import answer_kind, generate_ended

ARM_ARGS = {
    "opd_cross_proportional": {"rule": "proportional"},
    "opd_cross_1to1": {"rule": "proportional", "one_to_one": True},
    "opd_oracle": {"rule": "proportional", "oracle": True},
}


def main(pair: str, seeds: str, arms: str = "opd_cross_1to1,opd_cross_proportional",
         runs_json: str | None = None) -> None:
    preset = PRESETS["standard"]
    models = load_models(preset)[0][int(pair)]
    train, _, test = splits(preset)
    kept = json.load(open(runs_json)) if runs_json else {}
    chosen = [int(s) for s in seeds.split(",")]
    student, tok = models["student"]
    for arm in arms.split(","):
        runs = run_opd_seeds(models, "teacher_x", preset=preset, seeds=chosen, train_set=train,
                             test_set=test, keep_weights=True, **ARM_ARGS[arm])
        for seed, r in zip(chosen, runs):
            model = copy.deepcopy(student)
            missing, unexpected = model.transformer.load_state_dict(r["weights"], strict=False)
            if unexpected or any(not k.endswith("attn.bias") for k in missing):
                raise RuntimeError(f"weights do not fit the student: {missing} {unexpected}")
            texts, ended = generate_ended(model, tok, [p for p, _, _ in test],
                                          preset.max_new_tokens, sample=False)
            lengths = [len(tok(t, add_special_tokens=False)["input_ids"]) for t in texts]
            cats = [answer_kind(p, t, a, ended=e) for (p, _, a), t, e in zip(test, texts, ended)]
            counts = Counter(cats)
            documented = next((k["acc"] for k in kept.get(arm, [])
                               if k["pair"] == int(pair) and k["seed"] == seed), None)
            out = {"arm": arm, "pair": int(pair), "seed": seed, "acc": r["acc"],
                   "acc_kept": documented,
                   "shares": {k: counts[k] / len(cats) for k in sorted(counts)},
                   "mean_tokens": sum(lengths) / len(lengths),  # re-encoded: approximate
                   "m_n_masked_tokens": r.get("m_n_masked_tokens"),
                   "examples": {k: next(f"{p} {t!r}" for (p, _, _), t, c2 in
                                        zip(test, texts, cats) if c2 == k) for k in counts}}
            print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:])
