"""The models of ``crossopd bench learn`` as fixed artifacts: K teacher pairs and one student.

A teacher trained on another CPU is a new random draw (floating point differs across CPUs), and
two teachers matched on accuracy are not equal teachers: the benchmark's answer depended on
which pair was drawn. So the pairs are a random factor (K of them, each trained from its own
seeds, the statistics resample over them) and fixed artifacts: the quick and standard presets'
pairs ship inside the package (``learn_teachers/``, ~0.1M parameters per model) with a manifest of
their files' SHA-256 digests and validation accuracies, checked on every load. Other model sizes,
or ``--retrain-teachers``, train them into the cache.

Each pair is T_x (teacher tokenizer: digit runs merged) trained until its validation accuracy
reaches ``teacher_target``, and T_s (the student's tokenizer) trained until it reaches T_x's
level; the student is pretrained weakly on the student tokenizer, the same for every pair.
"""

from __future__ import annotations

import copy
import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

from crossopd.bench.learn_task import (
    accuracy,
    encode_pair,
    new_model,
    supervised_train,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.files import atomic_dir_write, cache_dir

SHIPPED = Path(__file__).parent / "learn_teachers"
# bump when model, tokenizer or training code changes: old artifacts then no longer load
VERSION = "v5"
MODEL_FIELDS = ("digits", "n_train", "n_val", "n_test", "width", "layers", "teacher_target",
                "teacher_steps", "teacher_check_every", "student_steps")
TEACHERS = ("teacher_x", "teacher_s")


class ArtifactError(RuntimeError):
    """A shipped or cached model file does not match its manifest."""


def artifact_key(preset: Any) -> str:
    """What the models depend on; artifacts with at least the pairs a run asks for serve it
    (``teacher_pairs=1`` uses pair 0)."""
    fields = {k: v for k, v in asdict(preset).items() if k in MODEL_FIELDS}
    fields.update(version=VERSION)
    return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]


def pair_seeds(k: int) -> tuple[int, int]:
    """(T_x seed, T_s seed) of pair ``k``; pair 0 keeps the seeds of the one pair of v1."""
    return 11 + 10 * k, 12 + 10 * k


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_artifacts(preset: Any, pairs: int, dest: Path, splits: tuple[list, list, list],
                    progress: Callable[[str], None] = print) -> Path:
    """Trains ``pairs`` teacher pairs and the student into ``dest`` (atomically; an existing
    ``dest`` is replaced) and writes ``manifest.json``."""
    train, val, _ = splits

    def build(tmp: Path) -> None:
        corpus = [p + s for p, s, _ in train]
        toks = {"teacher": train_teacher_tokenizer(corpus),
                "student": train_student_tokenizer(corpus)}
        trained: dict[str, dict] = {}
        for k in range(pairs):
            sx, ss = pair_seeds(k)
            # T_x first (digit runs merged: the harder one to train); T_s stops at its level
            trained[f"pair{k}/teacher_x"] = pretrain(
                tmp / f"pair{k}" / "teacher_x", toks["teacher"], train, preset,
                preset.teacher_steps, sx, progress, f"pair {k} teacher_x",
                stop_at=preset.teacher_target, val=val)
            trained[f"pair{k}/teacher_s"] = pretrain(
                tmp / f"pair{k}" / "teacher_s", toks["student"], train, preset,
                preset.teacher_steps, ss, progress, f"pair {k} teacher_s",
                stop_at=trained[f"pair{k}/teacher_x"]["val_acc"], val=val)
        trained["student"] = pretrain(tmp / "student", toks["student"], train, preset,
                                      preset.student_steps, 13, progress, "student")
        write_manifest(tmp, {
            "key": artifact_key(preset), "pairs": pairs,
            "settings": {k: v for k, v in asdict(preset).items() if k in MODEL_FIELDS},
            "seeds": {f"pair{k}": pair_seeds(k) for k in range(pairs)}, "trained": trained})

    if dest.exists():
        shutil.rmtree(dest)
    return atomic_dir_write(dest, build)


def write_manifest(root: Path, fields: dict) -> None:
    """``root/manifest.json``: ``fields`` and the SHA-256 digest of every file under ``root``."""
    files = {str(f.relative_to(root)): _digest(f) for f in sorted(root.rglob("*"))
             if f.is_file()}
    (root / "manifest.json").write_text(json.dumps({**fields, "sha256": files}, indent=1))


def verify(root: Path) -> dict:
    """The manifest, once every file it lists has its digest; raises ``ArtifactError`` naming
    the first file that does not."""
    manifest = json.loads((root / "manifest.json").read_text())
    for name, want in manifest["sha256"].items():
        path = root / name
        if not path.is_file():
            raise ArtifactError(f"{path}: missing; reinstall crossopd or run "
                                f"`crossopd bench learn --retrain-teachers`")
        if _digest(path) != want:
            raise ArtifactError(f"{path}: SHA-256 differs from {root / 'manifest.json'}; "
                                f"reinstall crossopd or run `crossopd bench learn "
                                f"--retrain-teachers`")
    return manifest


def locate(preset: Any, pairs: int, splits: tuple[list, list, list], retrain: bool = False,
           progress: Callable[[str], None] = print) -> tuple[Path, str]:
    """(artifact directory, where it came from: ``shipped``, ``cache`` or ``trained``). The
    shipped artifacts serve a preset whose model settings and pair count they were built for."""
    key = artifact_key(preset)
    cached = cache_dir() / "bench_learn" / f"{VERSION}-{key}"

    def build() -> None:
        progress(f"training {pairs} teacher pair(s) and the student into {cached}")
        build_artifacts(preset, pairs, cached, splits, progress)

    return find_artifacts(key, pairs, "pairs", (SHIPPED, cached), retrain, build)


def find_artifacts(key: str, count: int, field: str, roots: tuple[Path, Path], retrain: bool,
                   build: Callable[[], None]) -> tuple[Path, str]:
    """(directory, ``shipped``, ``cache`` or ``trained``): the first of ``roots`` (shipped,
    cache) whose manifest has ``key`` and at least ``count`` in its ``field``, or the cache
    after ``build()`` has trained into it (always, with ``retrain``)."""
    def serves(root: Path) -> bool:
        if not (root / "manifest.json").exists():
            return False
        manifest = json.loads((root / "manifest.json").read_text())
        return manifest["key"] == key and manifest[field] >= count

    for root, source in zip(roots, ("shipped", "cache")):
        if not retrain and serves(root):
            return root, source
    build()
    return roots[1], "trained"


def load_artifacts(root: Path, pairs: int, unit: str = "pair",
                   teachers: tuple[str, ...] = TEACHERS) -> list[dict[str, Any]]:
    """One models dict per pair (each ``teachers`` name and ``student``: (model, tokenizer);
    ``training``: how each teacher was trained; ``pair``: its index), digests checked. The
    student is the same model in every pair. ``unit``: the directory prefix of a pair
    (``pair0/``, or ``set0/`` for ``bench learn --multi-teacher``'s specialist sets)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    manifest = verify(root)

    def load(path: Path) -> tuple[Any, Any]:
        return (AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path))

    student = load(root / "student")
    out = []
    for k in range(pairs):
        models = {name: load(root / f"{unit}{k}" / name) for name in teachers}
        models.update(student=student, pair=k,
                      training={name: manifest["trained"][f"{unit}{k}/{name}"]
                                for name in teachers})
        out.append(models)
    return out


def pretrain(out: Path, tok: Any, train, preset: Any, steps: int, seed: int,
             progress: Callable[[str], None], label: str, stop_at: float | None = None,
             val=None) -> dict:
    """Supervised pretraining; with ``stop_at``, stops at the first check where the validation
    accuracy reaches it and keeps that model or the previous check's, whichever is closer to
    ``stop_at``. Returns ``{"steps", "val_acc"}`` of the kept model (NaN without ``val``)."""
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
    progress(f"pretrained {label} ({seen['steps']} steps, validation accuracy "
             f"{seen['val_acc']:.3f}, {time.perf_counter() - t0:.0f} s)")
    return {"steps": int(seen["steps"]), "val_acc": float(seen["val_acc"])}
