"""``crossopd bench learn``: does cross-tokenizer OPD work? A controlled comparison at small scale.

Everything is built inside the benchmark, on CPU: a synthetic multi-step addition task with an
exact checker, two tokenizers trained here (the teacher's byte-level BPE merges digit runs; the
student's SentencePiece-style BPE with byte fallback splits every digit, so boundaries differ
often), small GPT-2 models trained from scratch (teacher T_x on the teacher tokenizer, teacher
T_s on the student tokenizer as the same-tokenizer control, a weakly pretrained student), and
arms trained on an equal budget of student tokens:

  untrained, sft (cross-entropy on T_x samples), opd_cross_{proportional,uniform,last} (OPD from
  T_x through DPCA and each credit rule), opd_same (OPD from T_s, 1:1 chunks)

over several seeds. Teachers are trained once and cached on disk.
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

from crossopd.bench.learn_task import (
    accuracy,
    encode_pair,
    generate_texts,
    make_split,
    new_model,
    supervised_train,
    train_student_tokenizer,
    train_teacher_tokenizer,
)
from crossopd.config import RolloutConfig
from crossopd.files import atomic_dir_write, cache_dir
from crossopd.loss import LossConfig
from crossopd.opd import Components, rollout_and_score, update
from crossopd.prompts import Example
from crossopd.teachers.hf import HFTeacher

ARMS = ("untrained", "sft", "opd_cross_proportional", "opd_cross_uniform", "opd_cross_last",
        "opd_same")


# ------------------------------------------------------------------------------ presets
@dataclass(frozen=True)
class Preset:
    digits: int = 2
    n_train: int = 4000
    n_test: int = 300
    width: int = 64
    layers: int = 2
    teacher_steps: int = 1500
    student_steps: int = 800
    budget_tokens: int = 120_000  # student tokens each training arm may train on
    opd_batch: int = 32
    opd_lr: float = 1e-4  # 1e-3 collapsed OPD (same and cross) in calibration runs
    sft_lr: float = 1e-3
    evals: int = 4  # accuracy checkpoints along each arm
    seeds: int = 3
    max_new_tokens: int = 24
    uld: bool = False  # the ULD baseline arm (full preset)


PRESETS = {
    "tiny": Preset(n_train=300, n_test=20, width=32, layers=1, teacher_steps=30,
                   student_steps=10, budget_tokens=600, opd_batch=8, evals=2, seeds=2,
                   uld=True),
    "quick": Preset(),
    "full": Preset(n_train=20_000, n_test=500, width=96, layers=3, teacher_steps=6000,
                   student_steps=1200, budget_tokens=400_000, evals=8, seeds=5, uld=True),
}


def _teachers(preset: Preset, root: Path, progress) -> dict[str, Any]:
    """Tokenizers, T_x and T_s (trained once, cached on disk) and the weakly pretrained student
    (cached per ``student_steps``)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    def key(*extra: str) -> str:
        fields = {k: v for k, v in asdict(preset).items()
                  if k in ("digits", "n_train", "width", "layers", "teacher_steps", *extra)}
        return hashlib.sha1(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:12]

    train = make_split(preset.n_train, 1, digits=preset.digits)
    # bump the v-prefix when model or tokenizer code changes
    teachers = root / f"v3-{key()}"
    if not (teachers / "done").exists():
        def build(tmp: Path) -> None:
            corpus = [p + s for p, s, _ in train]
            toks = {"teacher": train_teacher_tokenizer(corpus),
                    "student": train_student_tokenizer(corpus)}
            for name, tk, seed in (("teacher_x", "teacher", 11), ("teacher_s", "student", 12)):
                _pretrain(tmp / name, toks[tk], train, preset, preset.teacher_steps, seed,
                          progress, name)
            (tmp / "done").write_text("ok")

        atomic_dir_write(teachers, build)
    student = root / f"v3-{key('student_steps')}-student{preset.student_steps}"
    if not (student / "config.json").exists():
        tok = AutoTokenizer.from_pretrained(teachers / "teacher_s")
        atomic_dir_write(student, lambda tmp: _pretrain(
            tmp, tok, train, preset, preset.student_steps, 13, progress, "student"))
    out = {}
    for name, path in (("teacher_x", teachers / "teacher_x"), ("teacher_s", teachers /
                                                                "teacher_s"), ("student", student)):
        out[name] = (AutoModelForCausalLM.from_pretrained(path).eval(),
                     AutoTokenizer.from_pretrained(path))
    return out


def _pretrain(out: Path, tok: Any, train, preset: Preset, steps: int, seed: int,
              progress, label: str) -> None:
    t0 = time.perf_counter()
    model = new_model(len(tok), seed, preset.width, preset.layers)
    pairs = [encode_pair(tok, p, s) for p, s, _ in train]
    supervised_train(model, pairs, steps, 3e-3, 64, seed)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    progress(f"pretrained {label} ({steps} steps, {time.perf_counter() - t0:.0f} s)")


def _curve_points(preset: Preset) -> list[int]:
    return [round(preset.budget_tokens * (k + 1) / preset.evals) for k in range(preset.evals)]


def run_opd(models: dict, teacher_key: str, rule: str, preset: Preset, seed: int,
            train_set, test_set) -> dict:
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    teacher, t_tok = models[teacher_key]
    c = Components.from_tokenizers(student, s_tok, HFTeacher(teacher), t_tok)
    rollout = RolloutConfig(max_new_tokens=preset.max_new_tokens)
    opt = torch.optim.AdamW(student.parameters(), lr=preset.opd_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokens, curve, shares, points = 0, [], [], _curve_points(preset)
    while tokens < preset.budget_tokens:
        batch = [Example([{"role": "user", "content": p}], str(a))
                 for p, _, a in rng.sample(train_set, preset.opd_batch)]
        scored = rollout_and_score(c, batch, rollout, credit_rule=rule)
        update(c, scored, opt, sched, LossConfig())
        tokens += int(scored.stats["response_tokens"])
        shares.append(scored.stats["one_to_one_share"])
        while points and tokens >= points[0]:
            curve.append((tokens, accuracy(student, s_tok, test_set, preset.max_new_tokens)))
            points.pop(0)
    return {"acc": curve[-1][1], "tokens": tokens, "curve": curve,
            "one_to_one_share": float(np.mean(shares))}


def teacher_samples(models: dict, preset: Preset, seed: int, train_set) -> list[tuple]:
    """(problem, teacher text) for up to 2000 training prompts, sampled from T_x."""
    teacher, t_tok = models["teacher_x"]
    rng = random.Random(seed)
    torch.manual_seed(seed)
    probs = rng.sample(train_set, min(len(train_set), 2000))
    texts = generate_texts(teacher, t_tok, [p[0] for p in probs], preset.max_new_tokens,
                           sample=True)
    return list(zip(probs, texts))


def run_sft(models: dict, preset: Preset, seed: int, train_set, test_set) -> dict:
    """Cross-entropy on T_x's own samples, re-spelled in the student's tokenization."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    pairs = []
    for prob, text in teacher_samples(models, preset, seed, train_set):
        p_ids, r_ids = encode_pair(s_tok, prob[0], text)
        pairs.append((p_ids, r_ids[:160]))  # a rambling sample stays within context
    per_step = 32
    avg = float(np.mean([len(r) for _, r in pairs]))
    curve, tokens = [], 0
    for point in _curve_points(preset):
        steps = max(1, round((point - tokens) / (per_step * avg)))
        tokens += supervised_train(student, pairs, steps, preset.sft_lr, per_step, seed + tokens)
        curve.append((tokens, accuracy(student, s_tok, test_set, preset.max_new_tokens)))
    return {"acc": curve[-1][1], "tokens": tokens, "curve": curve}


def run_uld(models: dict, preset: Preset, seed: int, train_set, test_set,
            weight: float = 1.0) -> dict:
    """ULD (Boizard et al. 2024): cross-entropy on teacher samples plus the L1 distance between
    the sorted teacher and student next-token distributions, position k against position k of
    each side's own tokenization (truncated to the shorter), vocabularies zero-padded."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    teacher, t_tok = models["teacher_x"]
    data = []
    for prob, text in teacher_samples(models, preset, seed, train_set):
        sp, sr = encode_pair(s_tok, prob[0], text)
        tp, tr = encode_pair(t_tok, prob[0], text)
        data.append(((sp, sr[:160]), (tp, tr[:160])))
    opt = torch.optim.AdamW(student.parameters(), lr=preset.sft_lr, weight_decay=0.01)
    rng = np.random.default_rng(seed)
    v_max = max(len(s_tok), len(t_tok))
    curve, tokens, points = [], 0, _curve_points(preset)
    student.train()
    while points:
        batch = [data[i] for i in rng.integers(0, len(data), size=32)]
        loss = 0.0
        for (sp, sr), (tp, tr) in batch:
            s_ids = torch.tensor([sp + sr])
            s_logits = student(input_ids=s_ids).logits[0, len(sp) - 1: len(sp) + len(sr) - 1]
            ce = torch.nn.functional.cross_entropy(s_logits, torch.tensor(sr))
            with torch.no_grad():
                t_logits = teacher(input_ids=torch.tensor([tp + tr])).logits[
                    0, len(tp) - 1: len(tp) + len(tr) - 1]
            k = min(len(sr), len(tr))
            ps = torch.nn.functional.pad(s_logits[:k].softmax(-1), (0, v_max - len(s_tok)))
            pt = torch.nn.functional.pad(t_logits[:k].softmax(-1), (0, v_max - len(t_tok)))
            l1 = (ps.sort(-1, descending=True).values - pt.sort(-1, descending=True).values)
            loss = loss + ce + weight * l1.abs().sum(-1).mean()
            tokens += len(sr)
        opt.zero_grad(set_to_none=True)
        (loss / len(batch)).backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
        while points and tokens >= points[0]:
            student.eval()
            curve.append((tokens, accuracy(student, s_tok, test_set, preset.max_new_tokens)))
            student.train()
            points.pop(0)
    student.eval()
    return {"acc": curve[-1][1], "tokens": tokens, "curve": curve}


def bench_learn(preset_name: str = "quick", out_dir: str | Path = "runs/bench_learn",
                progress=print) -> dict:
    preset = PRESETS[preset_name]
    t_start = time.perf_counter()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    models = _teachers(preset, cache_dir() / "bench_learn", progress)
    train_set = make_split(preset.n_train, 1, digits=preset.digits)
    test_set = make_split(preset.n_test, 2, exclude={p for p, _, _ in train_set},
                          digits=preset.digits)
    teacher_acc = {k: accuracy(models[k][0], models[k][1], test_set, preset.max_new_tokens)
                   for k in ("teacher_x", "teacher_s")}
    progress(f"teachers: T_x {teacher_acc['teacher_x']:.3f}, T_s {teacher_acc['teacher_s']:.3f}")
    runs: dict[str, list[dict]] = {a: [] for a in ARMS + (("uld",) if preset.uld else ())}
    base = accuracy(models["student"][0], models["student"][1], test_set, preset.max_new_tokens)
    for seed in range(preset.seeds):
        runs["untrained"].append({"acc": base, "tokens": 0, "curve": [(0, base)]})
        runs["sft"].append(run_sft(models, preset, seed, train_set, test_set))
        for rule in ("proportional", "uniform", "last"):
            runs[f"opd_cross_{rule}"].append(
                run_opd(models, "teacher_x", rule, preset, seed, train_set, test_set))
        runs["opd_same"].append(
            run_opd(models, "teacher_s", "proportional", preset, seed, train_set, test_set))
        if preset.uld:
            runs["uld"].append(run_uld(models, preset, seed, train_set, test_set))
        progress(f"seed {seed}: " + ", ".join(f"{a} {r[-1]['acc']:.3f}" for a, r in runs.items()))
    return _summarise(runs, preset, preset_name, teacher_acc, out_dir, t_start)


def _summarise(runs: dict, preset: Preset, name: str, teacher_acc: dict, out_dir, t_start):
    arms = {}
    for arm, rs in runs.items():
        accs = [r["acc"] for r in rs]
        arms[arm] = {"acc_mean": float(np.mean(accs)), "acc_std": float(np.std(accs)),
                     "acc_per_seed": accs,
                     "student_tokens": int(np.mean([r["tokens"] for r in rs]))}
        if "one_to_one_share" in rs[0]:
            arms[arm]["one_to_one_share"] = float(np.mean([r["one_to_one_share"] for r in rs]))
    sft_final = arms["sft"]["acc_mean"]
    for arm in ("opd_cross_proportional", "opd_cross_uniform", "opd_cross_last", "opd_same"):
        # mean curve over seeds at the shared checkpoints
        curves = np.array([[acc for _, acc in r["curve"]] for r in runs[arm]])
        toks = np.array([[t for t, _ in r["curve"]] for r in runs[arm]]).mean(axis=0)
        mean = curves.mean(axis=0)
        hit = np.flatnonzero(mean >= sft_final)
        # only meaningful when SFT itself improved on the untrained student
        useful = sft_final > arms["untrained"]["acc_mean"]
        need = int(toks[hit[0]]) if hit.size and useful else None
        arms[arm]["tokens_to_sft_final"] = need
        arms[arm]["tokens_to_sft_final_ratio"] = (
            need / arms["sft"]["student_tokens"] if need is not None else None)
    u = arms["untrained"]["acc_mean"]
    cross_gain = arms["opd_cross_proportional"]["acc_mean"] - u
    same_gain = arms["opd_same"]["acc_mean"] - u
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plot = out / "learn_curve.png"
    _plot(runs, plot)
    result = {
        "preset": name,
        "settings": asdict(preset),
        "teachers": teacher_acc,
        "arms": arms,
        "one_to_one_share": arms["opd_cross_proportional"].get("one_to_one_share"),
        "cross_same_gain_ratio": cross_gain / same_gain if abs(same_gain) > 1e-9 else None,
        "plot": str(plot),
        "seconds": time.perf_counter() - t_start,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    return result


def _plot(runs: dict, path: Path) -> None:
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


def render_learn_table(r: dict) -> str:
    lines = [f"preset {r['preset']}: teachers T_x {r['teachers']['teacher_x']:.3f}, "
             f"T_s {r['teachers']['teacher_s']:.3f}; 1:1 chunk share (cross) "
             f"{r['one_to_one_share']:.3f}",
             f"{'arm':<24} {'accuracy':>16} {'student tokens':>15} {'tokens to SFT acc':>18}"]
    for arm, a in r["arms"].items():
        need = a.get("tokens_to_sft_final")
        lines.append(f"{arm:<24} {a['acc_mean']:>8.3f} ± {a['acc_std']:.3f} "
                     f"{a['student_tokens']:>15} {'' if need is None else need:>18}")
    ratio = r["cross_same_gain_ratio"]
    lines.append(f"cross/same gain ratio: {'n/a' if ratio is None else f'{ratio:.2f}'}; "
                 f"plot: {r['plot']}; {r['seconds']:.0f} s")
    return "\n".join(lines)
