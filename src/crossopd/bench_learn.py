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

import hashlib
import json
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from crossopd.bridge import ChatFormat, TeacherContext
from crossopd.config import TrainConfig
from crossopd.data import Example
from crossopd.tokens import ByteVocab, atomic_dir_write, cache_dir

ARMS = ("untrained", "sft", "opd_cross_proportional", "opd_cross_uniform", "opd_cross_last",
        "opd_same")


# ------------------------------------------------------------------------------------ the task
def make_problem(rng: random.Random, digits: int = 2) -> tuple[str, str, int]:
    """(prompt, worked solution, answer) for a three-term addition."""
    lo, hi = 10 ** (digits - 1), 10**digits - 1
    a, b, c = (rng.randint(lo, hi) for _ in range(3))
    s = a + b
    return f"{a}+{b}+{c}=", f"{a}+{b}={s},{s}+{c}={s + c}", s + c


_FINAL = re.compile(r"=(\d+)\s*$")


def check_answer(response: str, answer: int) -> bool:
    """Exact: the response's last ``=N`` must be the answer (nothing may follow but spaces)."""
    m = _FINAL.search(response)
    return m is not None and int(m.group(1)) == answer


def make_split(n: int, seed: int, exclude: set[str] = frozenset(), digits: int = 2):
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        p = make_problem(rng, digits)
        if p[0] not in seen:
            seen.add(p[0])
            out.append(p)
    return out


# ------------------------------------------------------------------------------ tokenizers
TEMPLATE = "{{ messages[-1]['content'] }}"  # the prompt is the problem text itself


def _wrap(tok_obj: Any) -> Any:
    from transformers import PreTrainedTokenizerFast

    t = PreTrainedTokenizerFast(tokenizer_object=tok_obj, eos_token="</s>", pad_token="<pad>",
                                unk_token="<unk>")
    t.chat_template = TEMPLATE
    return t


def train_teacher_tokenizer(corpus: list[str], vocab_size: int = 300) -> Any:
    """Byte-level BPE without the split regex: merges run across digits, so numbers become
    multi-digit tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<pad>", "</s>", "<unk>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return _wrap(tok)


def train_student_tokenizer(corpus: list[str], vocab_size: int = 120) -> Any:
    """SentencePiece-style BPE (``▁`` for space) with byte fallback; digits always split."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    tok.normalizer = normalizers.Replace(" ", "▁")
    tok.pre_tokenizer = pre_tokenizers.Digits(individual_digits=True)
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(),
                                     decoders.Fuse()])
    byte_tokens = [f"<0x{b:02X}>" for b in range(256)]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(
        vocab_size=vocab_size + 256, special_tokens=["<pad>", "</s>", "<unk>", *byte_tokens]))
    # the byte pieces belong to the model vocabulary (byte fallback), not to the special tokens
    doc = json.loads(tok.to_str())
    doc["added_tokens"] = [a for a in doc["added_tokens"] if a["content"] not in byte_tokens]
    return _wrap(Tokenizer.from_str(json.dumps(doc)))


# ------------------------------------------------------------------------------ models
def new_model(vocab_size: int, seed: int, width: int, layers: int) -> Any:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab_size, n_positions=256, n_embd=width, n_layer=layers,
                     n_head=4, bos_token_id=1, eos_token_id=1, pad_token_id=0,
                     tie_word_embeddings=True)
    return GPT2LMHeadModel(cfg)


def encode_pair(tok: Any, prompt: str, response: str) -> tuple[list[int], list[int]]:
    p = tok(prompt, add_special_tokens=False)["input_ids"]
    r = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return p, r


def supervised_train(model: Any, pairs: list[tuple[list[int], list[int]]], steps: int,
                     lr: float, batch: int, seed: int) -> int:
    """Cross-entropy on response tokens (prompt masked). Returns response tokens trained on."""
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / 50))
    model.train()
    seen = 0
    for _ in range(steps):
        idx = rng.integers(0, len(pairs), size=batch)
        seqs = [pairs[i][0] + pairs[i][1] for i in idx]
        width = max(map(len, seqs))
        ids = torch.zeros((batch, width), dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for r, i in enumerate(idx):
            p, resp = pairs[i]
            ids[r, : len(p) + len(resp)] = torch.tensor(p + resp)
            labels[r, len(p): len(p) + len(resp)] = torch.tensor(resp)
            mask[r, : len(p) + len(resp)] = 1
            seen += len(resp)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
    model.eval()
    return seen


@torch.inference_mode()
def generate_texts(model: Any, tok: Any, prompts: list[str], max_new_tokens: int,
                   sample: bool) -> list[str]:
    """Continuations of ``prompts`` (greedy, or sampled from the full distribution), cut at EOS."""
    texts = []
    for lo in range(0, len(prompts), 64):
        ids_list = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts[lo: lo + 64]]
        width = max(map(len, ids_list))
        ids = torch.zeros((len(ids_list), width), dtype=torch.long)
        mask = torch.zeros((len(ids_list), width), dtype=torch.long)
        for r, p in enumerate(ids_list):  # left padding for generation
            ids[r, width - len(p):] = torch.tensor(p)
            mask[r, width - len(p):] = 1
        extra = {"do_sample": True, "top_k": 0} if sample else {"do_sample": False}
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                             eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                             **extra)
        for row in out[:, width:].tolist():
            if tok.eos_token_id in row:
                row = row[: row.index(tok.eos_token_id)]
            texts.append(tok.decode(row, skip_special_tokens=True))
    return texts


def accuracy(model: Any, tok: Any, problems: list[tuple[str, str, int]],
             max_new_tokens: int = 24) -> float:
    """Greedy decoding, exact answer check."""
    texts = generate_texts(model, tok, [p[0] for p in problems], max_new_tokens, sample=False)
    return sum(check_answer(t, p[2]) for t, p in zip(texts, problems)) / len(problems)


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


def _components(student: Any, s_tok: Any, teacher: Any, t_tok: Any):
    from crossopd.teachers.hf import HFTeacher
    from crossopd.train import Components

    return Components(student, ChatFormat.from_tokenizer(s_tok), ByteVocab.from_pretrained(s_tok),
                      HFTeacher(teacher), ChatFormat.from_tokenizer(t_tok),
                      ByteVocab.from_pretrained(t_tok), TeacherContext(),
                      s_tok.pad_token_id, torch.device("cpu"))


def _curve_points(preset: Preset) -> list[int]:
    return [round(preset.budget_tokens * (k + 1) / preset.evals) for k in range(preset.evals)]


def run_opd(models: dict, teacher_key: str, rule: str, preset: Preset, seed: int,
            train_set, test_set) -> dict:
    from crossopd.train import rollout_and_score, update

    student, s_tok = models["student"]
    student = _clone(student)
    teacher, t_tok = models[teacher_key]
    c = _components(student, s_tok, teacher, t_tok)
    cfg = TrainConfig(credit_rule=rule, batch_size=preset.opd_batch)
    cfg.rollout.max_new_tokens = preset.max_new_tokens
    cfg.optim.lr = preset.opd_lr
    opt = torch.optim.AdamW(student.parameters(), lr=preset.opd_lr)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    torch.manual_seed(seed)
    rng = random.Random(seed)
    tokens, curve, shares, points = 0, [], [], _curve_points(preset)
    while tokens < preset.budget_tokens:
        batch = [Example([{"role": "user", "content": p}], str(a))
                 for p, _, a in rng.sample(train_set, preset.opd_batch)]
        scored = rollout_and_score(c, batch, cfg, samples_per_prompt=1)
        update(c, scored, opt, sched, cfg)
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
    student = _clone(student)
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
    student = _clone(student)
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


def _clone(model: Any) -> Any:
    import copy

    return copy.deepcopy(model)


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
