"""``crossopd bench learn``: does cross-tokenizer OPD work? A controlled comparison at small scale.

Everything is built inside the benchmark, on CPU: a synthetic multi-step addition task with an
exact checker, two tokenizers trained here (the teacher's byte-level BPE merges digit runs; the
student's SentencePiece-style BPE with byte fallback splits every digit, so boundaries differ
often), small GPT-2 models trained from scratch (teacher T_x on the teacher tokenizer, teacher
T_s on the student tokenizer as the same-tokenizer control, a weakly pretrained student), and
arms trained on an equal budget of student tokens:

  untrained, sft (cross-entropy on T_x samples), opd_cross_{proportional,uniform,last} (OPD from
  T_x through DPCA and each credit rule), opd_cross_chunk (our ablation: chunk-level REINFORCE),
  opd_same (OPD from T_s, 1:1 chunks), uld (the ULD baseline on T_x samples)

over several seeds, paired by seed. The two teachers are matched in strength: each is trained
until its accuracy on a validation split reaches the same target (T_s, the easier one to train,
stops at T_x's level), so "cross vs same" compares tokenizers, not a weak teacher with a strong
one. Teachers are trained once and cached on disk. Before training, a training-free diagnosis
(``bench.oracle``) compares each credit rule with the exact teacher log-prob of every student
token, and an identity control checks that a cross arm whose tokenizers agree is same-tokenizer
OPD exactly.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from crossopd.bench.learn_arms import run_opd, run_sft, run_uld
from crossopd.bench.learn_stats import MATCH_TOLERANCE, save_runs, summarise
from crossopd.bench.learn_task import (
    accuracy,
    correct_answers,
    encode_pair,
    make_split,
    new_model,
    supervised_train,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.bench.oracle import diagnose, identity_check
from crossopd.credit import BUILTIN_RULES
from crossopd.files import atomic_dir_write, cache_dir

CROSS_RULES = tuple(BUILTIN_RULES)  # proportional, uniform, last, chunk
# opd_oracle: the cross-family teacher's exact byte-marginal targets (its knowledge without the
# chunk credit guess); opd_same: a separately trained same-tokenizer teacher
ARMS = ("untrained", "sft", *(f"opd_cross_{r}" for r in CROSS_RULES), "opd_oracle", "opd_same",
        "uld")


# ------------------------------------------------------------------------------ presets
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
    seeds: int = 5
    max_new_tokens: int = 24
    diagnosis_rollouts: int = 64
    arms: tuple[str, ...] = ARMS  # "untrained" always runs: every gain is measured from it


PRESETS = {
    "tiny": Preset(n_train=300, n_val=20, n_test=20, width=32, layers=1, teacher_target=0.0,
                   teacher_steps=30, teacher_check_every=10, student_steps=10,
                   budget_tokens=600, opd_batch=8, evals=2, seeds=2, diagnosis_rollouts=8),
    "quick": Preset(),
    "full": Preset(n_train=20_000, width=96, layers=3,
                   teacher_target=0.8, teacher_steps=8000, student_steps=1200,
                   budget_tokens=400_000, evals=8, seeds=8),
}


def with_settings(preset: Preset, settings: list[str]) -> Preset:
    """``key=value`` overrides on a preset (``crossopd bench learn --quick budget_tokens=240000
    opd_lr=3e-4 arms=sft,opd_cross_proportional,opd_same``)."""
    fields = {f.name for f in dataclasses.fields(Preset)}
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
    return dataclasses.replace(preset, **changes)


def splits(preset: Preset) -> tuple[list, list, list]:
    """(train, validation, test) problems, disjoint."""
    train = make_split(preset.n_train, 1, digits=preset.digits)
    seen = {p for p, _, _ in train}
    test = make_split(preset.n_test, 2, exclude=seen, digits=preset.digits)
    val = make_split(preset.n_val, 3, exclude=seen | {p for p, _, _ in test},
                     digits=preset.digits)
    return train, val, test


def load_models(preset: Preset, root: Path, progress=print) -> dict[str, Any]:
    """Tokenizers, T_x and T_s (matched in validation accuracy; trained once, cached on disk) and
    the weakly pretrained student (cached per ``student_steps``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def key(*extra: str) -> str:
        fields = {k: v for k, v in asdict(preset).items()
                  if k in ("digits", "n_train", "n_val", "n_test", "width", "layers",
                           "teacher_target", "teacher_steps", "teacher_check_every", *extra)}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    train, val, _ = splits(preset)
    # bump the v-prefix when model or tokenizer code changes
    teachers = root / f"v4-{key()}"
    if not (teachers / "done").exists():
        def build(tmp: Path) -> None:
            corpus = [p + s for p, s, _ in train]
            toks = {"teacher": train_teacher_tokenizer(corpus),
                    "student": train_student_tokenizer(corpus)}
            # T_x first (digit runs merged: the harder one to train); T_s stops at its level
            level = _pretrain(tmp / "teacher_x", toks["teacher"], train, preset,
                              preset.teacher_steps, 11, progress, "teacher_x",
                              stop_at=preset.teacher_target, val=val)
            _pretrain(tmp / "teacher_s", toks["student"], train, preset, preset.teacher_steps,
                      12, progress, "teacher_s", stop_at=level, val=val)
            (tmp / "done").write_text("ok")

        atomic_dir_write(teachers, build)
    student = root / f"v4-{key('student_steps')}-student{preset.student_steps}"
    if not (student / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(teachers / "teacher_s")
        atomic_dir_write(student, lambda tmp: _pretrain(
            tmp, tok, train, preset, preset.student_steps, 13, progress, "student"))
    out = {}
    for name, path in (("teacher_x", teachers / "teacher_x"), ("teacher_s", teachers /
                                                                "teacher_s"), ("student", student)):
        out[name] = (AutoModelForCausalLM.from_pretrained(path).eval(),
                     AutoTokenizer.from_pretrained(path))
    out["training"] = {name: json.loads((teachers / name / "trained.json").read_text())
                       for name in ("teacher_x", "teacher_s")}
    return out


def _pretrain(out: Path, tok: Any, train, preset: Preset, steps: int, seed: int,
              progress, label: str, stop_at: float | None = None, val=None) -> float:
    """Supervised pretraining; with ``stop_at``, stops at the first check where the validation
    accuracy reaches it and keeps that model or the previous check's, whichever is closer to
    ``stop_at``. Returns the kept model's validation accuracy (NaN without ``val``)."""
    t0 = time.perf_counter()
    model = new_model(len(tok), seed, preset.width, preset.layers)
    pairs = [encode_pair(tok, p, s) for p, s, _ in train]
    seen: dict[str, float] = {"steps": steps, "val_acc": float("nan")}
    before: dict[str, Any] = {}  # the previous check: it may be closer to the target

    def reached(step: int) -> bool:
        acc = accuracy(model, tok, val, preset.max_new_tokens)
        if acc < stop_at:
            before.update(state=copy.deepcopy(model.state_dict()), steps=step, val_acc=acc)
            return False
        if before and stop_at - before["val_acc"] < acc - stop_at:
            model.load_state_dict(before.pop("state"))
            seen.update(before)
        else:
            seen.update(steps=step, val_acc=acc)
        return True

    supervised_train(model, pairs, steps, 3e-3, 64, seed,
                     stop=reached if stop_at is not None else None,
                     check_every=preset.teacher_check_every)
    if val is not None and seen["steps"] == steps:  # ran to the end: measure once more
        seen["val_acc"] = accuracy(model, tok, val, preset.max_new_tokens)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    (out / "trained.json").write_text(json.dumps(seen))
    progress(f"pretrained {label} ({seen['steps']} steps, validation accuracy "
             f"{seen['val_acc']:.3f}, {time.perf_counter() - t0:.0f} s)")
    return seen["val_acc"]


def bench_learn(preset_name: str = "quick", out_dir: str | Path = "runs/bench_learn",
                progress=print, settings: list[str] | None = None) -> dict:
    """Runs the preset (with ``settings``, ``key=value`` overrides) and writes ``runs.json``,
    ``result.json`` and the plot to ``out_dir``."""
    preset = with_settings(PRESETS[preset_name], settings or [])
    t_start = time.perf_counter()
    models = load_models(preset, cache_dir() / "bench_learn", progress)
    train_set, _, test_set = splits(preset)
    teacher_acc = {k: accuracy(*models[k], test_set, preset.max_new_tokens)
                   for k in ("teacher_x", "teacher_s")}
    val_acc = {k: v["val_acc"] for k, v in models["training"].items()}
    progress(f"teachers (validation / test): T_x {val_acc['teacher_x']:.3f} / "
             f"{teacher_acc['teacher_x']:.3f}, T_s {val_acc['teacher_s']:.3f} / "
             f"{teacher_acc['teacher_s']:.3f}")
    t0 = time.perf_counter()
    diagnosis = diagnose(models, preset, preset.diagnosis_rollouts, seed=0)
    identity = identity_check(models, preset, seed=0)
    progress(f"oracle diagnosis and identity control ({time.perf_counter() - t0:.0f} s): "
             f"identity exact={identity['exact']}")
    runs: dict[str, list[dict]] = {a: [] for a in preset.arms}
    base = correct_answers(*models["student"], test_set, preset.max_new_tokens)
    for seed in range(preset.seeds):
        runs["untrained"].append({"acc": float(base.mean()), "correct": base, "tokens": 0,
                                  "curve": [(0, float(base.mean()))]})
        for arm in runs:
            if arm == "sft":
                runs[arm].append(run_sft(models, preset, seed, train_set, test_set))
            elif arm == "uld":
                runs[arm].append(run_uld(models, preset, seed, train_set, test_set))
            elif arm == "opd_oracle":
                runs[arm].append(run_opd(models, "teacher_x", "proportional", preset, seed,
                                         train_set, test_set, oracle=True))
            elif arm == "opd_same":
                runs[arm].append(run_opd(models, "teacher_s", "proportional", preset, seed,
                                         train_set, test_set))
            elif arm.startswith("opd_cross_"):
                runs[arm].append(run_opd(models, "teacher_x", arm.removeprefix("opd_cross_"),
                                         preset, seed, train_set, test_set))
        progress(f"seed {seed}: " + ", ".join(f"{a} {r[-1]['acc']:.3f}" for a, r in runs.items()))
    # matched on the split they were matched on (held out from training, twice the test
    # split's size); the test split's difference is reported beside it
    teachers = {**teacher_acc, "validation": val_acc, "training": models["training"],
                "difference": abs(val_acc["teacher_x"] - val_acc["teacher_s"]),
                "test_difference": abs(teacher_acc["teacher_x"] - teacher_acc["teacher_s"])}
    teachers["matched"] = teachers["difference"] <= MATCH_TOLERANCE
    save_runs(runs, Path(out_dir) / "runs.json")
    result = summarise(runs, teachers, out_dir)
    result.update(preset=preset_name, overrides=settings or [], settings=asdict(preset),
                  diagnosis=diagnosis, identity=identity, seconds=time.perf_counter() - t_start)
    (Path(out_dir) / "result.json").write_text(json.dumps(result, indent=2))
    return result
