"""``crossopd bench learn --agentic``: does a student learn to use a tool on-policy from a teacher
that writes tool calls in another family's syntax and tokenization?

The task (``bench.learn_agentic_task``): a product of two 2-digit numbers, which the small
models cannot compute. A ``mul`` tool can. The student writes Hermes calls; the cross-family
teacher T_x writes Llama 3 JSON calls in another tokenizer. Each trajectory is two assistant
turns (the call, then the answer) around the tool's result.

Every model is built here on CPU and cached: per teacher pair, T_x (teacher tokenizer, trained
until its validation accuracy reaches ``teacher_target``) and T_s (the student's tokenizer and
syntax, trained until it reaches T_x's level); and one student, pretrained weakly. The arms,
on an equal budget of student tokens:

  untrained; sft (cross-entropy on T_x's own sampled trajectories, each call parsed in T_x's
  syntax and re-rendered in the student's); opd_cross (T_x through the trajectory bridge:
  each assistant turn aligned on its own span, the call's syntax counted as format tokens);
  opd_oracle (T_x's exact byte-marginal log-prob of each student token, turn by turn);
  opd_same (T_s: the same syntax and tokenizer)

Reported: task accuracy and tool-call validity of greedy two-turn rollouts on held-out
problems, with ``bench.learn_stats``'s two-level bootstrap over teacher pairs and seeds.
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

from crossopd.bench import learn_agentic_task as task
from crossopd.bench.learn_arms import oracle_scored
from crossopd.bench.learn_stats import bootstrap, difference, gain_ratio
from crossopd.bench.learn_task import new_model, supervised_train
from crossopd.bench.machine import machine
from crossopd.bench.oracle import PrefixLogprobs
from crossopd.files import atomic_dir_write, atomic_write_text, cache_dir
from crossopd.step.multiturn import Toolbox
from crossopd.step.rollout import rollout_and_score
from crossopd.step.settings import StepSettings
from crossopd.step.sides import hf_pair
from crossopd.step.update import update

# *_masked: unparsed_calls=mask (a turn whose call does not parse gets no signal) instead of
# the default score (the teacher scores its bytes verbatim)
ARMS = ("untrained", "sft", "opd_cross", "opd_oracle", "opd_same", "opd_cross_masked",
        "opd_oracle_masked")
# a malformed call is a chunk of ~20 bytes with a great many spellings in T_x's tokens: paths
# whose probability falls to this are not expanded (each is below any float32 log-prob step)
ORACLE_MIN_MASS = 1e-12
VERSION = "agentic-v2"  # bump when the task, the templates or model training change


@dataclass(frozen=True)
class AgenticPreset:
    n_train: int = 3000
    n_val: int = 200
    n_test: int = 400
    width: int = 64
    layers: int = 2
    teacher_target: float = 0.9
    teacher_steps: int = 1500  # at most
    teacher_check_every: int = 25
    # a student that calls the tool in its own syntax but often copies a digit wrong
    student_steps: int = 88
    budget_tokens: int = 32_000
    opd_batch: int = 32
    opd_lr: float = 3e-4
    sft_lr: float = 3e-4
    seeds: int = 3
    teacher_pairs: int = 2
    max_new_tokens: int = 40  # per assistant turn


AGENTIC_PRESETS = {
    "tiny": AgenticPreset(n_train=300, n_val=20, n_test=20, width=32, layers=1,
                          teacher_target=0.0, teacher_steps=20, teacher_check_every=10,
                          student_steps=10, budget_tokens=300, opd_batch=8, seeds=2,
                          teacher_pairs=2),
    "quick": AgenticPreset(seeds=1, teacher_pairs=1),
    "standard": AgenticPreset(teacher_pairs=3),
}
MODEL_FIELDS = ("n_train", "n_val", "n_test", "width", "layers", "teacher_target",
                "teacher_steps", "teacher_check_every", "student_steps", "max_new_tokens")


def model_dir(preset: AgenticPreset) -> Path:
    fields = {k: v for k, v in asdict(preset).items() if k in MODEL_FIELDS}
    key = hashlib.sha1(json.dumps({**fields, "version": VERSION}, sort_keys=True)
                       .encode()).hexdigest()[:12]
    return cache_dir() / "bench_learn" / f"{VERSION}-{key}"


def build_models(preset: AgenticPreset, pairs: int, dest: Path, progress=print) -> None:
    """Trains the tokenizers, ``pairs`` teacher pairs and the student into ``dest``
    (atomically), with ``manifest.json`` recording how each teacher was trained."""
    train, val, _ = task.splits(preset.n_train, preset.n_val, preset.n_test)

    def fit(out: Path, tok: Any, steps: int, seed: int, label: str,
            stop_at: float | None) -> dict:
        t0 = time.perf_counter()
        model = new_model(len(tok), seed, preset.width, preset.layers)
        seen = {"steps": steps, "val_acc": float("nan")}

        def reached(step: int) -> bool:
            seen.update(steps=step, val_acc=float(task.evaluate(
                model, tok, val, preset.max_new_tokens)["correct"].mean()))
            return seen["val_acc"] >= stop_at

        task.pretrain(model, tok, train, steps, 3e-3, seed,
                      stop=reached if stop_at is not None else None,
                      check_every=preset.teacher_check_every)
        if seen["steps"] == steps:  # ran to the end: measure the final model
            seen["val_acc"] = float(task.evaluate(model, tok, val,
                                                  preset.max_new_tokens)["correct"].mean())
        model.save_pretrained(out)
        tok.save_pretrained(out)
        progress(f"trained {label}: {seen['steps']} steps, validation accuracy "
                 f"{seen['val_acc']:.3f} ({time.perf_counter() - t0:.0f} s)")
        return {"steps": int(seen["steps"]), "val_acc": seen["val_acc"]}

    def build(tmp: Path) -> None:
        toks = task.tokenizers(train)
        trained = {}
        for k in range(pairs):
            x = trained[f"pair{k}/teacher_x"] = fit(
                tmp / f"pair{k}" / "teacher_x", toks["teacher"], preset.teacher_steps,
                11 + 10 * k, f"pair {k} teacher_x", preset.teacher_target)
            trained[f"pair{k}/teacher_s"] = fit(
                tmp / f"pair{k}" / "teacher_s", toks["student"], preset.teacher_steps,
                12 + 10 * k, f"pair {k} teacher_s", x["val_acc"])
        trained["student"] = fit(tmp / "student", toks["student"], preset.student_steps, 13,
                                 "student", None)
        (tmp / "manifest.json").write_text(json.dumps({"pairs": pairs, "trained": trained},
                                                      indent=1))

    atomic_dir_write(dest, build)


def load_models(preset: AgenticPreset, progress=print) -> tuple[list[dict], dict]:
    """One models dict per pair (``teacher_x``, ``teacher_s``, ``student``: (model,
    tokenizer)), and how the teachers were trained; built into the cache on first use."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = model_dir(preset)
    manifest = root / "manifest.json"
    if not manifest.exists() or json.loads(manifest.read_text())["pairs"] < preset.teacher_pairs:
        progress(f"training {preset.teacher_pairs} teacher pair(s) and the student into {root}")
        if root.exists():
            import shutil

            shutil.rmtree(root)
        build_models(preset, preset.teacher_pairs, root, progress)

    def load(path: Path) -> tuple[Any, Any]:
        return (AutoModelForCausalLM.from_pretrained(path).eval(),
                AutoTokenizer.from_pretrained(path))

    student = load(root / "student")
    pairs = [{"teacher_x": load(root / f"pair{k}" / "teacher_x"),
              "teacher_s": load(root / f"pair{k}" / "teacher_s"), "student": student, "pair": k}
             for k in range(preset.teacher_pairs)]
    return pairs, json.loads(manifest.read_text())["trained"]


# ------------------------------------------------------------------------------------ arms
def run_opd(models: dict, teacher_key: str, preset: AgenticPreset, seed: int, train: list,
            test: list, oracle: bool = False, unparsed_calls: str = "score") -> dict:
    """Two-turn tool rollouts scored by ``teacher_key`` (proportional credit), or with
    ``oracle`` by that teacher's exact byte-marginal targets, until the token budget;
    ``unparsed_calls`` as the step setting."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    side, teachers = hf_pair(student, s_tok, *models[teacher_key])
    prefix = PrefixLogprobs.from_model(models[teacher_key][0]) if oracle else None
    settings = StepSettings.build(max_new_tokens=preset.max_new_tokens, max_turns=2,
                                  unparsed_calls=unparsed_calls)
    toolbox = Toolbox(task.TOOLS)
    opt = torch.optim.AdamW(student.parameters(), lr=preset.opd_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokens, counts = 0, dict.fromkeys(("format_tokens", "env_tokens", "unparsed_tool_calls",
                                        "masked_unparsed_tokens", "tool_calls",
                                        "signal_tokens"), 0.0)
    while tokens < preset.budget_tokens:
        batch = [task.example(p, a) for p, _, a in rng.sample(train, preset.opd_batch)]
        scored = rollout_and_score(side, teachers, batch, settings, toolbox=toolbox)
        if prefix is not None:
            scored = oracle_scored(scored, prefix, side.vocab, teachers["teacher"].vocab,
                                   settings.penalty, settings.loss.adv_clamp,
                                   min_mass=ORACLE_MIN_MASS,
                                   mask_unparsed=unparsed_calls == "mask")
        update(side, scored, opt, sched, settings)
        tokens += int(scored.stats["response_tokens"])
        for k in counts:
            counts[k] += scored.stats[k]
    return {**task.evaluate(student, s_tok, test, preset.max_new_tokens), "tokens": tokens,
            **{k: int(v) for k, v in counts.items()}}


def run_sft(models: dict, preset: AgenticPreset, seed: int, train: list, test: list) -> dict:
    """Cross-entropy on T_x's own sampled trajectories (its calls parsed in its syntax and
    re-rendered by the student's template; tool results unlabelled), at the token budget."""
    student, s_tok = models["student"]
    student = copy.deepcopy(student)
    teacher, t_tok = models["teacher_x"]
    probs = random.Random(seed).sample(train, min(len(train), 1000))
    _, _, trajs = task.rollouts(teacher, t_tok, probs, max_new_tokens=preset.max_new_tokens,
                                greedy=False, seed=seed)
    rows = task.training_rows(s_tok, [[{"role": "user", "content": p}, *t.messages]
                                      for (p, _, _), t in zip(probs, trajs)])
    avg = float(np.mean([sum(m) for _, _, m in rows]))
    steps = max(1, round(preset.budget_tokens / (32 * avg)))
    tokens = supervised_train(student, rows, steps, preset.sft_lr, 32, seed)
    return {**task.evaluate(student, s_tok, test, preset.max_new_tokens), "tokens": tokens,
            "unparsed_tool_calls": sum(t.unparsed_tool_calls for t in trajs)}


def run_arm(arm: str, models: dict, preset: AgenticPreset, seed: int, train: list,
            test: list) -> dict:
    t0 = time.perf_counter()
    if arm == "sft":
        r = run_sft(models, preset, seed, train, test)
    else:
        kind = arm.removesuffix("_masked")
        r = run_opd(models, "teacher_s" if kind == "opd_same" else "teacher_x", preset, seed,
                    train, test, oracle=kind == "opd_oracle",
                    unparsed_calls="mask" if arm.endswith("_masked") else "score")
    return {**r, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------ the whole
# name -> (per-problem data, statistic, arm, reference); gain ratios are over the untrained
COMPARISONS = {
    "ratio_cross_oracle": ("correct", gain_ratio, "opd_cross", "opd_oracle"),
    "cross_minus_oracle": ("correct", difference, "opd_cross", "opd_oracle"),
    "cross_minus_sft": ("correct", difference, "opd_cross", "sft"),
    "cross_minus_untrained": ("correct", difference, "opd_cross", "untrained"),
    "oracle_minus_untrained": ("correct", difference, "opd_oracle", "untrained"),
    "same_minus_untrained": ("correct", difference, "opd_same", "untrained"),
    "sft_minus_untrained": ("correct", difference, "sft", "untrained"),
    "cross_masked_minus_oracle_masked": ("correct", difference, "opd_cross_masked",
                                         "opd_oracle_masked"),
    "cross_masked_minus_untrained": ("correct", difference, "opd_cross_masked", "untrained"),
    "validity_cross_minus_untrained": ("valid", difference, "opd_cross", "untrained"),
    "validity_oracle_minus_untrained": ("valid", difference, "opd_oracle", "untrained"),
    "validity_same_minus_untrained": ("valid", difference, "opd_same", "untrained"),
    "validity_sft_minus_untrained": ("valid", difference, "sft", "untrained"),
}


def summarise(runs: dict[str, list[dict]]) -> dict:
    """Per arm: accuracy and tool-call validity (means over pairs and seeds); the comparisons,
    each with its two-level bootstrap interval (pairs, seeds within pairs, test problems)."""
    def arrays(key: str) -> dict[str, np.ndarray]:
        out = {}
        for arm, rs in runs.items():
            pairs = sorted({r["pair"] for r in rs})
            out[arm] = np.stack([np.stack([np.asarray(r[key], dtype=float) for r in rs
                                           if r["pair"] == k]) for k in pairs])
        return out

    data = {k: arrays(k) for k in ("correct", "valid", "right_call")}
    acc, valid, right = data["correct"], data["valid"], data["right_call"]
    arms = {arm: {"acc": float(acc[arm].mean()), "tool_call_validity": float(valid[arm].mean()),
                  "right_call": float(right[arm].mean()),
                  "acc_per_run": [float(np.mean(r["correct"])) for r in rs],
                  "student_tokens": int(np.mean([r["tokens"] for r in rs])),
                  **({"seconds": float(np.mean([r["seconds"] for r in rs]))}
                     if "seconds" in rs[0] else {}),
                  **{k: int(np.sum([r[k] for r in rs])) for k in
                     ("tool_calls", "unparsed_tool_calls", "masked_unparsed_tokens",
                      "format_tokens", "env_tokens", "signal_tokens") if k in rs[0]}}
            for arm, rs in runs.items()}

    def compare(what: str, fn: Any, arm: str, ref: str) -> dict:
        ratio = fn is gain_ratio
        needed = (arm, ref, "untrained") if ratio else (arm, ref)
        if any(a not in data[what] for a in needed):
            return {"value": None, "ci_low": None, "ci_high": None, "refused": "not run"}
        return bootstrap({a: data[what][a] for a in needed},
                         fn(arm, ref, "untrained") if ratio else fn(arm, ref))

    comparisons = {name: compare(*spec) for name, spec in COMPARISONS.items()}
    return {"arms": arms, "comparisons": comparisons}


def bench_learn_agentic(preset_name: str = "quick",
                        out_dir: str | Path = "runs/bench_learn_agentic",
                        progress=print) -> dict:
    """Runs every arm on every teacher pair and seed; writes ``runs.json`` and
    ``result.json`` to ``out_dir``."""
    preset = AGENTIC_PRESETS[preset_name]
    t_start = time.perf_counter()
    pairs, trained = load_models(preset, progress)
    train, _, test = task.splits(preset.n_train, preset.n_val, preset.n_test)
    base = task.evaluate(*pairs[0]["student"], test, preset.max_new_tokens)
    runs: dict[str, list[dict]] = {a: [] for a in ARMS}
    teachers = []
    for models in pairs:
        k = models["pair"]
        test_acc = {name: float(task.evaluate(*models[name], test,
                                              preset.max_new_tokens)["correct"].mean())
                    for name in ("teacher_x", "teacher_s")}
        teachers.append({"pair": k, "test": test_acc,
                         "validation": {n: trained[f"pair{k}/{n}"]["val_acc"]
                                        for n in ("teacher_x", "teacher_s")},
                         "steps": {n: trained[f"pair{k}/{n}"]["steps"]
                                   for n in ("teacher_x", "teacher_s")}})
        progress(f"pair {k} teachers (test accuracy): T_x {test_acc['teacher_x']:.3f}, "
                 f"T_s {test_acc['teacher_s']:.3f}")
        for seed in range(preset.seeds):
            # common random numbers: seed s draws the same prompts and sampling seed in every
            # arm and pair, from the same student
            runs["untrained"].append({**base, "tokens": 0})
            for arm in ARMS[1:]:
                runs[arm].append(run_arm(arm, models, preset, seed, train, test))
            for arm in ARMS:
                runs[arm][-1].update(pair=k, seed=seed)
            progress(f"pair {k} seed {seed}: " + ", ".join(
                f"{a} {np.mean(rs[-1]['correct']):.3f}"
                + (f" ({rs[-1]['seconds']:.0f} s)" if "seconds" in rs[-1] else "")
                for a, rs in runs.items()))
    result = summarise(runs)
    result.update(preset=preset_name, settings=asdict(preset), teachers=teachers,
                  student={"val_acc": trained["student"]["val_acc"],
                           "steps": trained["student"]["steps"]},
                  models=str(model_dir(preset)), machine=machine(),
                  seconds=time.perf_counter() - t_start)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out / "runs.json", json.dumps(
        {arm: [{**r, **{k: np.asarray(r[k]).astype(int).tolist()
                        for k in ("correct", "valid", "right_call")}} for r in rs]
         for arm, rs in runs.items()}))
    atomic_write_text(out / "result.json", json.dumps(result, indent=2))
    return result


def _interval(d: dict) -> str:
    if d.get("value") is None:
        return "n/a"
    lo, hi = d.get("ci_low"), d.get("ci_high")
    span = f" [{lo:+.3f}, {hi:+.3f}]" if lo is not None and hi is not None else ""
    return f"{d['value']:+.3f}{span}"


def render_agentic_table(r: dict) -> str:
    lines = [f"bench learn --agentic ({r['preset']}): {len(r['teachers'])} teacher pair(s) x "
             f"{r['settings']['seeds']} seed(s), {r['settings']['budget_tokens']} student "
             f"tokens per arm, {r['seconds']:.0f} s",
             f"{'arm':<18} {'accuracy':>9} {'valid calls':>12} {'right calls':>12} "
             f"{'tokens':>7}"]
    for arm, a in r["arms"].items():
        lines.append(f"{arm:<18} {a['acc']:>9.3f} {a['tool_call_validity']:>12.3f} "
                     f"{a['right_call']:>12.3f} {a['student_tokens']:>7}")
    lines.append("comparisons (value [95% two-level interval]):")
    lines += [f"  {k:<32} {_interval(v)}" for k, v in r["comparisons"].items()]
    return "\n".join(lines)
