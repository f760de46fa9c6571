"""``crossopd bench step``: one whole OPD step, phase by phase, per engine, for the bundled
cross-family pair and a same-tokenizer control, beside TRL's own distillation trainers.

Each row is a real ``crossopd train`` run in its own process (so peak RSS is that run's alone,
read from ``wait4``): ``warmup`` steps, then ``steps`` measured ones, whose per-phase times come
from the run's ``metrics.jsonl`` (``time/<phase>_s``). The cross-family overhead is crossopd's
own work (bridge: teacher prompts and teacher tokenization; align + credit) in the cross pair
minus the same in the same-tokenizer control, as a share of the cross step; a second,
model-free measurement times that work on responses of 4096 student tokens.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

PHASES = ("rollout", "bridge", "teacher", "student_logps", "align_credit", "update")
OWN = ("bridge", "align_credit")  # crossopd's own work in a step
PRESETS = {  # prompts per step (2 samples each: TRL's minimum), new tokens, measured steps
    "quick": {"prompts": 2, "max_new_tokens": 32, "steps": 2, "warmup": 1},
    "full": {"prompts": 4, "max_new_tokens": 128, "steps": 3, "warmup": 1},
}
PLAIN = {"teacher.plain_template": "Question: {prompt}\nAnswer:",
         "teacher.stop": "\n\nQuestion:"}


def pairs(student: str, teacher: str, same_teacher: str) -> dict[str, list[str]]:
    """Config overrides per pair: the bundled base teacher gets the plain format, the
    same-tokenizer control scores with the student's own chat template."""
    return {
        "cross": [f"student.model={student}", f"teacher.model={teacher}",
                  *(f"{k}={v}" for k, v in PLAIN.items())],
        "same": [f"student.model={student}", f"teacher.model={same_teacher}"],
    }


def run_row(engine: str, pair: list[str], preset: dict, out_dir: Path,
            python: str = sys.executable, device: str = "cpu") -> dict:
    """One ``crossopd train`` run in a child process; its measured steps summarised."""
    steps = preset["warmup"] + preset["steps"]
    cmd = [python, "-m", "crossopd", "train", *pair, f"engine={engine}", f"device={device}",
           f"steps={steps}", f"batch_size={preset['prompts']}", "rollout.samples_per_prompt=2",
           f"rollout.max_new_tokens={preset['max_new_tokens']}", "eval_prompts=0",
           "checkpoint_every=0", f"output_dir={out_dir}", "--overwrite", "--no-progress"]
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)
    _, status, usage = os.wait4(proc.pid, 0)  # this child's own peak RSS (KiB on Linux)
    err = proc.stderr.read() if proc.stderr else ""
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"bench step: `{' '.join(cmd[2:])}` failed: {err[-1500:]}")
    rows = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    measured = rows[preset["warmup"]:]
    phases = {p: float(sum(r.get(f"time/{p}_s", 0.0) for r in measured)) for p in PHASES}
    if engine == "trl":  # TRL's step time includes its update, which crossopd does not time
        total = float(sum(r["time/step_s"] for r in measured))
        phases["update"] = max(total - sum(v for k, v in phases.items() if k != "update"), 0.0)
    seconds = sum(phases.values())
    tokens = int(sum(r["response_tokens"] for r in measured))
    return {"steps": len(measured), "student_tokens": tokens, "seconds": seconds,
            "tok_per_s": tokens / seconds if seconds else 0.0,
            "peak_rss_mb": usage.ru_maxrss / 1024, "phases": phases}


def own_work_4k(student: str, teacher: str, same_teacher: str, n_tokens: int = 4096,
                repeats: int = 5) -> dict[str, float]:
    """Seconds of bridge + align + credit for one response of ``n_tokens`` student tokens,
    cross pair and same-tokenizer control, without any model (random teacher log-probs)."""
    from crossopd.bench.align import sample_response
    from crossopd.core.credit import assign_credit
    from crossopd.core.tokens import ByteVocab
    from crossopd.models.hub import load_hf_tokenizer
    from crossopd.step.bridge import ChatFormat, align_bridged, build_teacher_request

    s_tok = load_hf_tokenizer(student)
    s_fmt, sv = ChatFormat.from_tokenizer(s_tok), ByteVocab.from_pretrained(student)
    messages = [{"role": "user", "content": "Explain long division with an example."}]
    out = {}
    for name, t_src, kw in (("cross", teacher, {"plain_template": "Question: {prompt}\nAnswer:",
                                                "stop": "\n\nQuestion:"}),
                            ("same", same_teacher, {})):
        t_fmt = ChatFormat.from_tokenizer(load_hf_tokenizer(t_src), **kw)
        tv = ByteVocab.from_pretrained(t_src)
        response = sample_response(sv, n_tokens, seed=1)
        rng = np.random.default_rng(0)
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            req = build_teacher_request(messages, response, s_fmt, t_fmt, sv, tv)
            a = align_bridged(req, sv, tv)
            t_lp = -rng.exponential(size=req.stop_end - req.response_start)
            assign_credit(a, t_lp, -rng.exponential(size=response.size))
            times.append(time.perf_counter() - t0)
        out[name] = float(np.median(times))
    return out


def bench_step(quick: bool = False, out_dir: str | Path = "runs/bench_step",
               engines: tuple[str, ...] = ("native", "trl"), peers: bool = True,
               student: str = "smollm2", teacher: str = "gemma3-270m",
               same_teacher: str = "smollm2", vllm_python: str | None = None,
               device: str = "cpu", progress: Callable[[str], None] | None = None) -> dict:
    """Rows per (engine, rollout, pair), the cross-family overhead share, and TRL's peers.
    ``vllm_python``: an interpreter with vLLM installed, for TRL rows with vLLM rollouts."""
    say = progress or (lambda m: None)
    preset = PRESETS["quick" if quick else "full"]
    out = Path(out_dir)
    runs = [(e, "hf") for e in engines]
    if vllm_python and "trl" in engines:
        runs.append(("trl", "vllm"))
    rows = []
    for engine, rollout in runs:
        for pair, overrides in pairs(student, teacher, same_teacher).items():
            say(f"{engine} engine, {rollout} rollouts, {pair} pair ...")
            extra = ["rollout.backend=vllm"] if rollout == "vllm" else []
            row = run_row(engine, overrides + extra, preset, out / f"{engine}-{rollout}-{pair}",
                          python=vllm_python if rollout == "vllm" else sys.executable,
                          device=device)
            rows.append({"engine": engine, "rollout": rollout, "pair": pair, **row})
            say(render_row(rows[-1]))
    native = {r["pair"]: r for r in rows if r["engine"] == engines[0] and r["rollout"] == "hf"}
    own = {p: sum(native[p]["phases"][k] for k in OWN) for p in native}
    share = (own["cross"] - own["same"]) / native["cross"]["seconds"] if len(own) == 2 else None
    say("crossopd's own work on 4096-token responses ...")
    own_4k = own_work_4k(student, teacher, same_teacher)
    peer_rows = []
    if peers:
        from crossopd.bench.peers import PeerUnavailable, run_peer

        for trainer, pair in (("distillation", "same"), ("gold", "cross")):
            say(f"peer: TRL {trainer} on the {pair} pair ...")
            try:
                peer_rows.append(run_peer(
                    trainer, pair, batch_size=2 * preset["prompts"],
                    max_new_tokens=preset["max_new_tokens"], steps=preset["steps"],
                    warmup_steps=preset["warmup"], student=student, device=device,
                    teacher=teacher if pair == "cross" else same_teacher))
            except PeerUnavailable as e:
                peer_rows.append({"trainer": trainer, "pair": pair, "mode": "unavailable",
                                  "note": str(e)})
    return {
        "preset": "quick" if quick else "full",
        "machine": {"cpu_count": os.cpu_count(), "platform": platform.platform(),
                    "python": platform.python_version(), "device": device},
        "settings": dict(preset, samples_per_prompt=2),
        "rows": rows,
        "cross_overhead_share": share,
        "own_work_share_cross": own.get("cross", 0.0) / native["cross"]["seconds"]
        if "cross" in native else None,
        "own_seconds_per_4k_response": own_4k,
        "peers": peer_rows,
    }


def render_row(r: dict) -> str:
    ph = " ".join(f"{k} {v:.2f}" for k, v in r["phases"].items())
    return (f"{r['engine']:<7} {r['rollout']:<4} {r['pair']:<5} {r['student_tokens']:>6} tok "
            f"{r['seconds']:>7.1f} s {r['tok_per_s']:>7.1f} tok/s {r['peak_rss_mb']:>7.0f} MB | "
            f"{ph}")


def render_step(result: dict) -> str:
    lines = ["engine  roll pair  tokens    step s    tok/s    peak | phases (s)"]
    lines += [render_row(r) for r in result["rows"]]
    share = result["cross_overhead_share"]
    lines.append("")
    if share is not None:
        lines.append(f"cross-family overhead (bridge + align + credit, cross minus same): "
                     f"{100 * share:.3f}% of the cross step")
    o = result["own_seconds_per_4k_response"]
    lines.append(f"own work per 4096-token response: cross {1000 * o['cross']:.1f} ms, same "
                 f"{1000 * o['same']:.1f} ms")
    for p in result["peers"]:
        if p.get("mode") == "unavailable":
            lines.append(f"peer TRL {p['trainer']} ({p['pair']}): unavailable: {p['note']}")
        else:
            lines.append(f"peer TRL {p['trainer']} ({p['pair']}, {p['mode']}): "
                         f"{p['tok_per_s']:.1f} tok/s, peak {p['peak_rss_mb']:.0f} MB")
    return "\n".join(lines)
