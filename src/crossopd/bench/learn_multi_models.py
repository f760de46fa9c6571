"""The models of ``crossopd bench learn --multi-teacher`` as fixed artifacts: K teacher sets,
each two specialists of two tokenizer families, and one student of a third.

Two sub-tasks with exact checkers: ``add`` (a+b+c) and ``sub`` (a-b+c), each with a worked
solution. In set k, T_add is trained on ``add`` plus ``weak_share`` of ``sub`` until its ``add``
validation accuracy reaches ``teacher_target``; T_sub the other way round. The three tokenizers
split numbers three ways: T_add's byte-level BPE merges digit runs (learned on both sub-tasks),
T_sub's is another byte-level BPE learned on its own training rows, so its merges differ, and
the student's splits every digit. The student is pretrained weakly on both sub-tasks (more on
``sub``, the harder one for it).

As with ``bench.learn_teachers`` (whose manifest, digest check and lookup these use), a teacher
trained on another CPU is another random draw, so the sets are a random factor the statistics
resample over, and the quick and standard presets' sets ship inside the package
(``learn_teachers_multi/``) with the SHA-256 digest of every file, checked on every load.
"""

from __future__ import annotations

import hashlib
import json
import random
import shutil
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crossopd.bench.learn_task import (
    make_split,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.bench.learn_teachers import find_artifacts, pretrain, write_manifest
from crossopd.bench.learn_teachers import load_artifacts as load_pair_artifacts
from crossopd.files import atomic_dir_write, cache_dir

SHIPPED = Path(__file__).parent / "learn_teachers_multi"
# bump when model, tokenizer or training code changes: old artifacts then no longer load
VERSION = "m2"
KINDS = ("add", "sub")
SPECIALISTS = tuple(f"teacher_{k}" for k in KINDS)
MODEL_FIELDS = ("n_train", "n_val", "n_test", "width", "layers", "teacher_target",
                "teacher_steps", "teacher_check_every", "weak_share", "student_steps",
                "student_sub_share")


def make_problem(rng: random.Random, kind: str) -> tuple[str, str, int]:
    """(prompt, worked solution, answer): ``add`` a+b+c, ``sub`` a-b+c with a > b."""
    a, b, c = (rng.randint(10, 99) for _ in range(3))
    if kind == "add":
        return f"{a}+{b}+{c}=", f"{a}+{b}={a + b},{a + b}+{c}={a + b + c}", a + b + c
    a, b = max(a, b) + 1, min(a, b)
    return f"{a}-{b}+{c}=", f"{a}-{b}={a - b},{a - b}+{c}={a - b + c}", a - b + c


def kind_of(prompt: str) -> str:
    """The sub-task of a prompt (routing's key)."""
    return "sub" if "-" in prompt else "add"


def splits(preset: Any) -> dict[str, tuple[list, list, list]]:
    """Per sub-task: (train, validation, test) problems, disjoint."""
    out = {}
    for i, kind in enumerate(KINDS):
        def problem(rng: random.Random, kind: str = kind) -> tuple[str, str, int]:
            return make_problem(rng, kind)

        train = make_split(preset.n_train, 21 + i, problem=problem)
        seen = {p for p, _, _ in train}
        test = make_split(preset.n_test, 31 + i, seen, problem=problem)
        val = make_split(preset.n_val, 41 + i, seen | {p for p, _, _ in test}, problem=problem)
        out[kind] = (train, val, test)
    return out


def set_seeds(k: int) -> tuple[int, int]:
    """(T_add seed, T_sub seed) of teacher set ``k``."""
    return 51 + 10 * k, 52 + 10 * k


def specialist_rows(train: dict[str, list], strong: str, weak_share: float, seed: int) -> list:
    """A specialist's data: all of its strong sub-task plus ``weak_share`` (of the result) drawn
    from the other."""
    weak = next(k for k in KINDS if k != strong)
    n = int(len(train[strong]) * weak_share / (1 - weak_share))
    return train[strong] + random.Random(seed).sample(train[weak], min(n, len(train[weak])))


def student_rows(train: dict[str, list], sub_share: float) -> list:
    """The student's data: every ``sub`` row and as many ``add`` rows as make ``sub``
    ``sub_share`` of the whole."""
    n = int(len(train["sub"]) * (1 - sub_share) / sub_share)
    return train["add"][:n] + train["sub"]


def artifact_key(preset: Any) -> str:
    fields = {k: v for k, v in asdict(preset).items() if k in MODEL_FIELDS}
    fields.update(version=VERSION)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def build_artifacts(preset: Any, sets: int, dest: Path,
                    progress: Callable[[str], None] = print) -> Path:
    """Trains ``sets`` specialist sets and the student into ``dest`` (atomically, replacing it)
    and writes the manifest."""
    data = splits(preset)
    train = {k: data[k][0] for k in KINDS}

    def build(tmp: Path) -> None:
        rows = {k: specialist_rows(train, k, preset.weak_share, 7 + i)
                for i, k in enumerate(KINDS)}
        toks = {"teacher_add": train_teacher_tokenizer([p + s for k in KINDS
                                                        for p, s, _ in train[k]]),
                "teacher_sub": train_teacher_tokenizer([p + s for p, s, _ in rows["sub"]],
                                                       vocab_size=280),
                "student": train_student_tokenizer([p + s for k in KINDS
                                                    for p, s, _ in train[k]])}
        trained: dict[str, dict] = {}
        for k in range(sets):
            for kind, seed in zip(KINDS, set_seeds(k)):
                name = f"teacher_{kind}"
                trained[f"set{k}/{name}"] = pretrain(
                    tmp / f"set{k}" / name, toks[name], rows[kind], preset, preset.teacher_steps,
                    seed, progress, f"set {k} {name}", stop_at=preset.teacher_target,
                    val=data[kind][1])
        trained["student"] = pretrain(tmp / "student", toks["student"],
                                      student_rows(train, preset.student_sub_share), preset,
                                      preset.student_steps, 53, progress, "student")
        write_manifest(tmp, {
            "key": artifact_key(preset), "sets": sets,
            "settings": {k: v for k, v in asdict(preset).items() if k in MODEL_FIELDS},
            "seeds": {f"set{k}": set_seeds(k) for k in range(sets)}, "trained": trained})

    if dest.exists():
        shutil.rmtree(dest)
    return atomic_dir_write(dest, build)


def locate(preset: Any, sets: int, retrain: bool = False,
           progress: Callable[[str], None] = print) -> tuple[Path, str]:
    """(artifact directory, ``shipped``, ``cache`` or ``trained``)."""
    key = artifact_key(preset)
    cached = cache_dir() / "bench_learn" / f"multi-{VERSION}-{key}"

    def build() -> None:
        progress(f"training {sets} specialist set(s) and the student into {cached}")
        build_artifacts(preset, sets, cached, progress)

    return find_artifacts(key, sets, "sets", (SHIPPED, cached), retrain, build)


def load_artifacts(root: Path, sets: int) -> list[dict[str, Any]]:
    """One models dict per set (``teacher_add``, ``teacher_sub``, ``student``; ``pair``: the
    set's index, the statistics' first level), digests checked."""
    return load_pair_artifacts(root, sets, unit="set", teachers=SPECIALISTS)
