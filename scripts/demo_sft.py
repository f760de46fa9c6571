"""The SFT baseline for `crossopd demo`: the same student, teacher, prompts and held-out
evaluation, but the student is trained with cross-entropy on the teacher's own sampled answers
(the teacher sees the same teacher-only context), for as many student tokens as an OPD run used.
The teacher must be an in-process one (``teacher.model``): it generates the answers.

    python scripts/demo_sft.py runs/demo     # after `crossopd demo`: its config and budget

Prints one JSON object: the OPD run's before/after next to SFT's after (same evaluation seed).
Built on the step library (build_sides, lifecycle.heldout_eval), not on an engine loop.
"""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import torch

from crossopd.evaluation.summary import heldout_summary
from crossopd.files import read_jsonl
from crossopd.models.hub import quiet_hf
from crossopd.models.sampling import sample
from crossopd.models.scoring import score_sequences
from crossopd.run.config import load_config
from crossopd.run.lifecycle import heldout_eval
from crossopd.run.load import build_sides, load_splits


def teacher_answers(student, teacher, examples, cfg) -> list[list[int]]:
    """The teacher's sampled answer to each prompt, cut at its stop string and spelled in the
    student's vocabulary with the student's end-of-turn."""
    prompts = [teacher.fmt.prompt_ids(teacher.context.apply(e.messages, e.reference))
               for e in examples]
    model = teacher.teacher.model
    e = model.generation_config.eos_token_id
    eos = {int(i) for i in (e if isinstance(e, list) else [e]) if i is not None}
    outs = sample(model, prompts, max_new_tokens=cfg.rollout.max_new_tokens,
                  temperature=cfg.rollout.temperature, top_p=cfg.rollout.top_p,
                  stop_ids=eos or {0}, pad_id=0)
    stop = cfg.teacher.stop or teacher.fmt.end_of_turn
    answers = []
    for out in outs:
        text = teacher.vocab.concat_bytes([int(i) for i in out if int(i) not in eos])
        text = text.decode("utf-8", "replace").split(stop)[0].strip()
        answers.append(student.vocab.encode_bytes(text.encode()) + student.fmt.end_of_turn_ids)
    return answers


def main(run_dir: str, overrides: list[str]) -> dict:
    quiet_hf()
    run = Path(run_dir)
    cfg = load_config(run / "config.json", overrides)  # the OPD run's own settings
    budget = sum(int(m["response_tokens"]) for m in read_jsonl(run / "metrics.jsonl"))
    student, teachers = build_sides(cfg)
    (teacher,) = teachers.values()
    train, heldout = load_splits(cfg)
    torch.manual_seed(cfg.seed)
    rng = random.Random(cfg.seed)
    opt = torch.optim.AdamW(student.model.parameters(), lr=cfg.optim.lr)
    tokens = steps = 0
    while tokens < budget:
        batch = rng.sample(train, min(cfg.batch_size, len(train)))
        with torch.no_grad():
            answers = teacher_answers(student, teacher, batch, cfg)
        prompts = [student.fmt.prompt_ids(e.messages) for e in batch]
        seqs = [p + a for p, a in zip(prompts, answers)]
        spans = [(len(p), len(p) + len(a)) for p, a in zip(prompts, answers)]
        logps = score_sequences(student.model, seqs, spans, grad=True, pad_id=student.pad_id)
        n = sum(len(a) for a in answers)
        loss = -torch.cat(logps).sum() / n  # token mean, as the OPD loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.model.parameters(), cfg.optim.grad_clip)
        opt.step()
        tokens, steps = tokens + n, steps + 1
    student.model.eval()
    after = heldout_eval(cfg, student, teachers, heldout)
    evals = read_jsonl(run / "eval.jsonl")
    opd = heldout_summary(evals)
    sft = heldout_summary([evals[0], after])
    return {"student_tokens": {"opd": budget, "sft": tokens}, "sft_steps": steps,
            "opd": {k: v for k, v in opd.items() if k.startswith("heldout_")},
            "sft": {k: v for k, v in sft.items() if k.startswith("heldout_")}}


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], sys.argv[2:]), indent=2))
