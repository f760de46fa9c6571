"""``crossopd bench learn --multi-teacher``: does a student learn two skills from two teachers of
two tokenizer families on-policy, and at what cost against each specialist on its own skill?

Two sub-tasks with exact checkers (``add``: a+b+c, ``sub``: a-b+c, each with a worked solution),
two teachers built here on two different tokenizers (T_add on the byte-level BPE that merges
digit runs, trained mostly on ``add``; T_sub on the SentencePiece-style one that splits digits,
trained mostly on ``sub``), one weakly pretrained student, and arms at an equal budget of student
tokens, paired by seed (the same student, prompts and sampling seed per seed):

  untrained; opd_add, opd_sub (one teacher scores every row); routed (each row to its
  sub-task's teacher: ``Example.teacher``); mixed (``teacher_mix`` 1:1, every teacher scores
  every row); sft_routed (cross-entropy on the routed teachers' own samples)

Accuracy per sub-task and on their union, with the paired bootstrap intervals of
``bench.learn_stats`` (seeds and test problems resampled together).
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.bench.learn_stats import bootstrap, difference
from crossopd.bench.learn_task import (
    check_answer,
    encode_pair,
    generate_texts,
    make_split,
    new_model,
    supervised_train,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.files import atomic_dir_write, cache_dir
from crossopd.step.data import Example
from crossopd.step.rollout import rollout_and_score
from crossopd.step.settings import StepSettings
from crossopd.step.sides import StudentSide, TeacherSide
from crossopd.step.update import update
from crossopd.teachers.hf import HFTeacher

KINDS = ("add", "sub")
ARMS = ("untrained", "opd_add", "opd_sub", "routed", "mixed", "sft_routed")


@dataclass(frozen=True)
class MultiPreset:
    n_train: int = 3000  # per sub-task
    n_test: int = 400  # per sub-task
    width: int = 64
    layers: int = 2
    teacher_steps: int = 1500
    weak_share: float = 0.05  # the share of its weak sub-task in a teacher's training data
    # a student that starts with some of both skills (as bench learn's), so OPD has samples to
    # shape; 300 steps left it at ~0.5% and every arm at noise
    student_steps: int = 800
    budget_tokens: int = 80_000
    opd_batch: int = 32
    lr: float = 3e-4
    seeds: int = 3
    max_new_tokens: int = 24


MULTI_PRESETS = {
    "tiny": MultiPreset(n_train=200, n_test=20, width=32, layers=1, teacher_steps=20,
                        student_steps=10, budget_tokens=400, opd_batch=8, seeds=2),
    "quick": MultiPreset(),
}


def make_problem(rng: random.Random, kind: str) -> tuple[str, str, int]:
    """(prompt, worked solution, answer): ``add`` a+b+c, ``sub`` a-b+c with a > b."""
    a, b, c = (rng.randint(10, 99) for _ in range(3))
    if kind == "add":
        return f"{a}+{b}+{c}=", f"{a}+{b}={a + b},{a + b}+{c}={a + b + c}", a + b + c
    a, b = max(a, b) + 1, min(a, b)
    return f"{a}-{b}+{c}=", f"{a}-{b}={a - b},{a - b}+{c}={a - b + c}", a - b + c


def split(n: int, seed: int, kind: str, exclude: set[str] = frozenset()) -> list[tuple]:
    return make_split(n, seed, exclude, problem=lambda rng: make_problem(rng, kind))


def splits(preset: MultiPreset) -> tuple[dict[str, list], dict[str, list]]:
    train = {k: split(preset.n_train, 21 + i, k) for i, k in enumerate(KINDS)}
    test = {k: split(preset.n_test, 31 + i, k, {p for p, _, _ in train[k]})
            for i, k in enumerate(KINDS)}
    return train, test


def load_models(preset: MultiPreset, root: Path, progress=print) -> dict[str, Any]:
    """The two specialist teachers and the student, each trained once and cached (the teachers
    by the fields they depend on, so a new student budget reuses them)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def key(*fields: str) -> str:
        data = {k: v for k, v in asdict(preset).items() if k in fields}
        return hashlib.sha1(json.dumps(data, sort_keys=True).encode()).hexdigest()[:12]

    shared = ("n_train", "n_test", "width", "layers")
    teachers = root / f"multi-v1-{key(*shared, 'teacher_steps', 'weak_share')}"
    student = root / f"multi-v1-{key(*shared, 'student_steps')}-student"
    train, _ = splits(preset)
    corpus = [p + s for k in KINDS for p, s, _ in train[k]]

    def fit(tmp: Path, tok: Any, strong: str | None, steps: int, seed: int, name: str) -> None:
        t0 = time.perf_counter()
        rows = mix_rows(train, strong, preset.weak_share, seed)
        model = new_model(len(tok), seed, preset.width, preset.layers)
        supervised_train(model, [encode_pair(tok, p, s) for p, s, _ in rows], steps, 3e-3, 64,
                         seed)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        progress(f"trained {name} ({steps} steps, {time.perf_counter() - t0:.0f} s)")

    if not (teachers / "done").exists():
        def build(tmp: Path) -> None:
            fit(tmp / "teacher_add", train_teacher_tokenizer(corpus), "add",
                preset.teacher_steps, 41, "teacher_add")
            fit(tmp / "teacher_sub", train_student_tokenizer(corpus), "sub",
                preset.teacher_steps, 42, "teacher_sub")
            (tmp / "done").write_text("ok")

        atomic_dir_write(teachers, build)
    if not (student / "config.json").exists():
        # the student's own tokenizer family: T_sub's
        tok = AutoTokenizer.from_pretrained(teachers / "teacher_sub")
        atomic_dir_write(student, lambda tmp: fit(tmp, tok, None, preset.student_steps, 43,
                                                  "student"))
    paths = {"teacher_add": teachers / "teacher_add", "teacher_sub": teachers / "teacher_sub",
             "student": student}
    return {name: (AutoModelForCausalLM.from_pretrained(path).eval(),
                   AutoTokenizer.from_pretrained(path)) for name, path in paths.items()}


def mix_rows(train: dict[str, list], strong: str | None, weak_share: float, seed: int) -> list:
    """A teacher's data: its strong sub-task plus ``weak_share`` of the other; the student's
    (``strong`` None): both, equally."""
    if strong is None:
        return train["add"] + train["sub"]
    weak = next(k for k in KINDS if k != strong)
    n = int(len(train[strong]) * weak_share / (1 - weak_share))
    return train[strong] + random.Random(seed).sample(train[weak], min(n, len(train[weak])))


def correct(model: Any, tok: Any, test: dict[str, list], preset: MultiPreset) -> np.ndarray:
    """Greedy answers on the add then the sub test problems: one bool per problem."""
    problems = test["add"] + test["sub"]
    texts = generate_texts(model, tok, [p[0] for p in problems], preset.max_new_tokens, False)
    return np.array([check_answer(t, p[2]) for t, p in zip(texts, problems)])


def _sides(models: dict) -> tuple[StudentSide, dict[str, TeacherSide]]:
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    teachers = {k: TeacherSide.from_tokenizer(HFTeacher(models[f"teacher_{k}"][0]),
                                              models[f"teacher_{k}"][1], name=k) for k in KINDS}
    return StudentSide.from_model(student, s_tok), teachers


def run_opd(models: dict, arm: str, preset: MultiPreset, seed: int, train: dict,
            test: dict) -> dict:
    """One OPD arm at the token budget: rows of both sub-tasks, half each, every step."""
    student, teachers = _sides(models)
    mix = {"add": 1.0, "sub": 1.0} if arm == "mixed" else None
    if arm in ("opd_add", "opd_sub"):
        teachers = {arm[4:]: teachers[arm[4:]]}
    settings = StepSettings.build(max_new_tokens=preset.max_new_tokens, mix=mix)
    opt = torch.optim.AdamW(student.model.parameters(), lr=preset.lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(seed)
    rng, tokens = random.Random(seed), 0
    while tokens < preset.budget_tokens:
        batch = [Example([{"role": "user", "content": p}], str(a),
                         teacher=kind if arm == "routed" else None)
                 for kind in KINDS for p, _, a in rng.sample(train[kind], preset.opd_batch // 2)]
        scored = rollout_and_score(student, teachers, batch, settings)
        update(student, scored, opt, sched, settings)
        tokens += int(scored.stats["response_tokens"])
    return {"correct": correct(student.model, student.tokenizer, test, preset), "tokens": tokens}


def run_sft_routed(models: dict, preset: MultiPreset, seed: int, train: dict,
                   test: dict) -> dict:
    """Cross-entropy on each sub-task's teacher's own samples, re-spelled for the student."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    rng = random.Random(seed)
    torch.manual_seed(seed)
    pairs = []
    for kind in KINDS:
        model, tok = models[f"teacher_{kind}"]
        probs = rng.sample(train[kind], min(len(train[kind]), 1000))
        for prob, text in zip(probs, generate_texts(model, tok, [p[0] for p in probs],
                                                    preset.max_new_tokens, sample=True)):
            p, r = encode_pair(s_tok, prob[0], text)
            pairs.append((p, r[:160]))
    avg = float(np.mean([len(r) for _, r in pairs]))
    steps = max(1, round(preset.budget_tokens / (32 * avg)))
    tokens = supervised_train(student, pairs, steps, preset.lr, 32, seed)
    return {"correct": correct(student, s_tok, test, preset), "tokens": tokens}


def summarise(runs: dict[str, list[dict]], n_add: int) -> dict:
    """Per arm: accuracy on each sub-task and on the union (seed means); the comparisons the
    benchmark asks about, each with its paired bootstrap interval."""
    parts = {"add": slice(0, n_add), "sub": slice(n_add, None), "union": slice(None)}
    arrays = {arm: np.stack([r["correct"] for r in rs]).astype(float) for arm, rs in runs.items()}
    arms = {arm: {**{f"acc_{k}": float(a[:, s].mean()) for k, s in parts.items()},
                  "student_tokens": int(np.mean([r["tokens"] for r in runs[arm]]))}
            for arm, a in arrays.items()}

    def diff(arm: str, ref: str, part: str) -> dict:
        if arm not in arrays or ref not in arrays:
            return {"value": None, "ci_low": None, "ci_high": None, "refused": "not run"}
        sub = {k: v[:, parts[part]] for k, v in arrays.items()}
        return bootstrap(sub, difference(arm, ref))

    return {"arms": arms, "comparisons": {
        # what routing adds to each specialist on the skill it lacks
        "routed_minus_opd_add_on_sub": diff("routed", "opd_add", "sub"),
        "routed_minus_opd_sub_on_add": diff("routed", "opd_sub", "add"),
        # what routing costs against each specialist on its own skill
        "routed_minus_opd_add_on_add": diff("routed", "opd_add", "add"),
        "routed_minus_opd_sub_on_sub": diff("routed", "opd_sub", "sub"),
        "routed_minus_sft_routed_on_union": diff("routed", "sft_routed", "union"),
        "mixed_minus_routed_on_union": diff("mixed", "routed", "union"),
        "routed_minus_untrained_on_union": diff("routed", "untrained", "union")}}


def bench_learn_multi(preset_name: str = "quick", out_dir: str | Path = "runs/bench_learn_multi",
                      progress=print) -> dict:
    preset = MULTI_PRESETS[preset_name]
    t_start = time.perf_counter()
    models = load_models(preset, cache_dir() / "bench_learn", progress)
    train, test = splits(preset)
    teachers = {}
    for name in ("teacher_add", "teacher_sub", "student"):
        c = correct(*models[name], test, preset)
        teachers[name] = {"acc_add": float(c[: preset.n_test].mean()),
                          "acc_sub": float(c[preset.n_test:].mean())}
    progress("teachers (add / sub): " + ", ".join(
        f"{k} {v['acc_add']:.3f} / {v['acc_sub']:.3f}" for k, v in teachers.items()))
    runs: dict[str, list[dict]] = {arm: [] for arm in ARMS}
    base = correct(*models["student"], test, preset)
    for seed in range(preset.seeds):
        runs["untrained"].append({"correct": base, "tokens": 0})
        for arm in ARMS[1:]:
            runs[arm].append(run_sft_routed(models, preset, seed, train, test)
                             if arm == "sft_routed" else
                             run_opd(models, arm, preset, seed, train, test))
        progress(f"seed {seed}: " + ", ".join(
            f"{a} {r[-1]['correct'].mean():.3f}" for a, r in runs.items()))
    result = {"preset": preset_name, "settings": asdict(preset), "teachers": teachers,
              **summarise(runs, preset.n_test), "seconds": time.perf_counter() - t_start}
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def render_multi_table(r: dict) -> str:
    lines = ["teachers (accuracy add / sub): " + ", ".join(
        f"{k} {v['acc_add']:.3f} / {v['acc_sub']:.3f}" for k, v in r["teachers"].items()),
        f"{'arm':<14} {'add':>7} {'sub':>7} {'union':>7} {'student tokens':>15}"]
    for arm, a in r["arms"].items():
        lines.append(f"{arm:<14} {a['acc_add']:>7.3f} {a['acc_sub']:>7.3f} "
                     f"{a['acc_union']:>7.3f} {a['student_tokens']:>15}")
    for name, d in r["comparisons"].items():
        v = "not run" if d["value"] is None else \
            f"{d['value']:+.3f} [{d['ci_low']:+.3f}, {d['ci_high']:+.3f}]"
        lines.append(f"{name:<36} {v}")
    lines.append(f"{r['seconds']:.0f} s")
    return "\n".join(lines)
