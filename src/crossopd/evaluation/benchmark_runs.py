"""A model on a benchmark: each item's prompt in the model's own chat template, K sampled
responses per item, each graded; accuracy is pass@1 averaged over the K samples, with its
standard error over items, and pass@K. Per-item responses and grades go to a JSONL file.

``--gold`` needs no model: every item's reference, written as a model is asked to answer, goes
through the same answer extraction and grader, so a grader or data problem shows as an item
below 1.0."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from crossopd.evaluation.benchmarks import Benchmark, Item
from crossopd.evaluation.graders import GRADERS, choice_letter, gold_response, last_boxed
from crossopd.evaluation.summary import standard_error
from crossopd.step.bridge import ChatFormat

# a base model (no chat template) is prompted with this plain format
PLAIN_TEMPLATE = "Question: {prompt}\nAnswer:"


@dataclass(frozen=True)
class Sampling:
    samples: int
    max_new_tokens: int
    temperature: float  # 0: greedy
    top_p: float
    seed: int = 0
    batch_size: int = 8


def sampling_for(bench: Benchmark, samples: int | None = None, max_new_tokens: int | None = None,
                 temperature: float | None = None, top_p: float | None = None, seed: int = 0,
                 batch_size: int = 8) -> Sampling:
    """The benchmark's defaults, each overridden where given."""
    d = bench.defaults
    s = Sampling(samples if samples is not None else d.samples,
                 max_new_tokens if max_new_tokens is not None else d.max_new_tokens,
                 temperature if temperature is not None else d.temperature,
                 top_p if top_p is not None else d.top_p, seed, batch_size)
    for name, value, low in (("--samples", s.samples, 1), ("--max-new-tokens", s.max_new_tokens,
                             1), ("--batch-size", s.batch_size, 1)):
        if value < low:
            raise ValueError(f"{name} must be at least {low} (got {value})")
    if s.temperature < 0 or not 0 < s.top_p <= 1:
        raise ValueError(f"--temperature must be >= 0 and --top-p in (0, 1] (got "
                         f"{s.temperature}, {s.top_p})")
    return s


def model_format(model: Any, tokenizer: Any, name: str) -> ChatFormat:
    """The model's chat template, ending turns on its end-of-turn and generation-config EOS;
    a base model without a template gets ``PLAIN_TEMPLATE``, ending at its EOS."""
    from crossopd.step.sides import generation_eos

    eos = generation_eos(model)
    if getattr(tokenizer, "chat_template", None):
        return ChatFormat.from_tokenizer(tokenizer, name=name, eos_ids=eos)
    return ChatFormat.from_tokenizer(tokenizer, PLAIN_TEMPLATE, stop=tokenizer.eos_token or "\n",
                                     name=name, eos_ids=eos)


@torch.inference_mode()
def generate(model: Any, tokenizer: Any, fmt: ChatFormat, prompts: list[list[int]],
             s: Sampling, progress: bool = True) -> list[str]:
    """One decoded response per prompt (batched, left-padded; special tokens dropped)."""
    from tqdm import tqdm

    from crossopd.models.sampling import left_pad, sampling_config

    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else \
        tokenizer.eos_token_id
    stops = sorted(fmt.stop_ids)
    config = sampling_config(model, max(s.temperature, 1e-5), s.top_p,
                             max_new_tokens=s.max_new_tokens, eos_token_id=stops,
                             pad_token_id=int(pad or 0))
    if s.temperature == 0:
        config.do_sample, config.temperature, config.top_p = False, None, None
    device = next(model.parameters()).device
    torch.manual_seed(s.seed)
    out: list[str] = []
    bar = tqdm(total=len(prompts), desc="generating", unit="response", disable=not progress,
               dynamic_ncols=True)
    for lo in range(0, len(prompts), s.batch_size):
        ids, mask = left_pad(prompts[lo : lo + s.batch_size], int(pad or 0))
        gen = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device),
                             generation_config=config)
        for row in gen[:, ids.shape[1]:].tolist():
            cut = next((i for i, t in enumerate(row) if t in fmt.stop_ids), len(row))
            out.append(tokenizer.decode(row[:cut], skip_special_tokens=True))
        bar.update(ids.shape[0])
    bar.close()
    return out


def extracted(grader: str, response: str) -> str | None:
    """The answer a response gave, as shown in the samples file."""
    return choice_letter(response) if grader == "choice" else last_boxed(response)


def item_record(bench: Benchmark, item: Item, responses: list[str]) -> dict:
    grade = GRADERS[bench.grader]
    record = {"id": item.id, "reference": item.reference,
              "responses": responses,
              "extracted": [extracted(bench.grader, r) for r in responses],
              "correct": [bool(grade(r, item.reference)) for r in responses]}
    if not item.redact:  # GPQA's questions are not written out (its authors' request)
        record = {"id": item.id, "question": item.question, **record}
    return record


def summarise(bench: Benchmark, records: list[dict], samples_path: Path | None,
              s: Sampling | None) -> dict:
    """accuracy (mean over items of each item's share of correct samples), its standard error
    over items, and pass@K (an item counts when any of its K samples is correct)."""
    per_item = [sum(r["correct"]) / len(r["correct"]) for r in records]
    n = len(per_item)
    acc = sum(per_item) / n
    se = standard_error(per_item) if n > 1 else None
    return {"benchmark": bench.name, "n": n,
            "samples_per_item": s.samples if s else 1,
            "accuracy": acc, "stderr": se,
            "pass_at_k": sum(any(r["correct"]) for r in records) / n,
            "samples_path": str(samples_path) if samples_path else None,
            **({"temperature": s.temperature, "top_p": s.top_p,
                "max_new_tokens": s.max_new_tokens, "seed": s.seed} if s else {})}


def write_records(path: Path, records: list[dict]) -> None:
    """One JSON line per item, written whole (a killed run leaves no half file)."""
    import json

    from crossopd.files import atomic_write_text

    atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def run_gold(bench: Benchmark, samples_path: Path | None = None) -> dict:
    """Every reference through the benchmark's extraction and grader; the failures listed."""
    records = [item_record(bench, it, [gold_response(bench.grader, it.reference)])
               for it in bench.items]
    if samples_path:
        write_records(samples_path, records)
    result = summarise(bench, records, samples_path, None)
    result["gold"] = True
    result["failed"] = [r["id"] for r in records if not r["correct"][0]]
    return result


def run_benchmark(bench: Benchmark, model: Any, tokenizer: Any, fmt: ChatFormat, s: Sampling,
                  samples_path: Path | None, progress: bool = True) -> dict:
    """The model's responses to every item (``s.samples`` each), graded and summarised."""
    prompts = [fmt.prompt_ids(bench.messages(it)) for it in bench.items for _ in
               range(s.samples)]
    responses = generate(model, tokenizer, fmt, prompts, s, progress=progress)
    k = s.samples
    return grade_benchmark(bench, [responses[i * k : (i + 1) * k]
                                   for i in range(len(bench.items))], s, samples_path)


def grade_benchmark(bench: Benchmark, responses: list[list[str]], s: Sampling,
                    samples_path: Path | None) -> dict:
    """Each item's responses graded, written to ``samples_path`` and summarised."""
    records = [item_record(bench, it, rs) for it, rs in zip(bench.items, responses, strict=True)]
    if samples_path:
        write_records(samples_path, records)
    return summarise(bench, records, samples_path, s)


def default_samples_path(bench: Benchmark, model: str | None, out_dir: str = "runs/eval"
                         ) -> Path:
    slug = "gold" if model is None else re.sub(r"[^\w.-]+", "_", model.strip("/"))[-60:]
    return Path(out_dir) / f"{bench.name}-{slug}.jsonl"


def render_benchmark(r: dict, model: str | None) -> str:
    who = "reference answers (--gold)" if r.get("gold") else model
    se = f" ± {r['stderr']:.3f}" if r.get("stderr") is not None else ""
    lines = [f"{r['benchmark']}: {who}",
             f"{'items':<18}{r['n']}",
             f"{'samples per item':<18}{r['samples_per_item']}",
             f"{'accuracy':<18}{r['accuracy']:.3f}{se}  (pass@1, mean over samples; ± 1 s.e.)",
             f"{'pass@' + str(r['samples_per_item']):<18}{r['pass_at_k']:.3f}"]
    if "temperature" in r:
        lines.append(f"{'sampling':<18}temperature {r['temperature']}, top-p {r['top_p']}, "
                     f"max {r['max_new_tokens']} new tokens, seed {r['seed']}")
    if r.get("failed"):
        lines.append(f"{'failed':<18}{', '.join(r['failed'])}")
    if r.get("samples_path"):
        lines.append(f"{'per item':<18}{r['samples_path']}")
    return "\n".join(lines)


def benchmark_metrics(name: str, limit: int, model: Any, tokenizer: Any, fmt: ChatFormat,
                      seed: int, samples_path: Path | None, progress: bool = False) -> dict:
    """A benchmark's accuracy as a held-out evaluation reports it (``eval_benchmark:``), with
    the benchmark's default sampling; ``limit`` 0 is every item."""
    from crossopd.evaluation.benchmarks import load_benchmark

    bench = load_benchmark(name, limit or None)
    r = run_benchmark(bench, model, tokenizer, fmt, sampling_for(bench, seed=seed),
                      samples_path, progress=progress)
    return {"benchmark": r["benchmark"], "benchmark_n": r["n"],
            "benchmark_accuracy": r["accuracy"], "benchmark_stderr": r["stderr"],
            "benchmark_pass_at_k": r["pass_at_k"], "benchmark_samples_path": r["samples_path"]}
