"""``crossopd bench align``: alignment + credit throughput against the decode-based baseline.

The baseline (``crossopd.bench.decode_baseline``) follows the paper's description of a
decode-based aligner; it is a benchmark reference, not part of the library API. Numbers are
student tokens per second in one process, best of repeated runs for both sides (medians reported
too); the inputs are real tokenizations of mixed-language text.
"""

from __future__ import annotations

import platform
import random
import time

import numpy as np

from crossopd.bench import decode_baseline
from crossopd.core.align import align
from crossopd.core.credit import assign_credit
from crossopd.core.tokens import ByteVocab

PAIRS = (("smollm2", "gemma3-270m"), ("llama3", "mistral-v3"), ("cl100k", "tekken"))
SIZES = (512, 4096, 16384)
QUICK_SIZES = (512, 4096)

# Mixed-language material: prose, code, maths with long digit runs, accents (NFC and NFD), CJK,
# Korean, Arabic (RTL), emoji with ZWJ sequences, whitespace runs, tabs and CRLF.
SNIPPETS = (
    "The student samples a response and the teacher scores every token of it. ",
    "def chunk_sums(x, seg):\n    return np.bincount(seg, weights=x)\n\n",
    "Compute 123456789 * 987654321 = 121932631112635269, then add 3.14159265358979. ",
    "Größere Übungen für Schüler: die Straße ist naß. ",
    "Cafe\u0301 de\u0301ja\u0300 vu, na\u0131\u0308ve re\u0301sume\u0301. ",
    "机器学习模型的蒸馏需要对齐不同的分词器。",
    "東京の天気は晴れです。今日は勉強します。",
    "안녕하세요, 토크나이저 정렬 테스트입니다. ",
    "مرحبا بالعالم، هذا نص عربي للاختبار. ",
    "Family: 👨\u200d👩\u200d👧\u200d👦, flags 🇫🇷🇯🇵, skin 👋🏽, heart ❤\ufe0f. ",
    "    indented    with   runs\tof\t\twhitespace  \r\n",
    "<think>Let me check step 2 first.</think> The answer is 42.\n",
    "| col | value |\n|-----|-------|\n| a   | 1,000,000 |\n",
)


def mixed_text(n_chars: int, seed: int = 0) -> str:
    rng = random.Random(seed)
    parts, total = [], 0
    while total < n_chars:
        s = rng.choice(SNIPPETS)
        parts.append(s)
        total += len(s)
    return "".join(parts)


def sample_response(sv: ByteVocab, n_tokens: int, seed: int = 0) -> np.ndarray:
    """Exactly ``n_tokens`` student ids of mixed text (the cut may fall inside a character,
    as a length-limited sample does)."""
    n_chars = n_tokens * 2
    while True:
        ids = sv.encode_bytes(mixed_text(n_chars, seed).encode("utf-8"))
        if len(ids) >= n_tokens:
            return np.asarray(ids[:n_tokens], dtype=np.int64)
        n_chars *= 2


def _in_context_decode(v: ByteVocab):
    """The tokenizer's decode, with the dummy-prefix space SentencePiece drops put back (a
    baseline that skipped this would lose every chunk after the first on Mistral/Llama 2)."""
    if not v.dummy_prefix:
        return v.decode

    def decode(ids: list[int]) -> str:
        text = v.decode(ids)
        return " " + text if v.token_bytes(ids[:1])[0].startswith(b" ") else text

    return decode


def _times(fn, min_repeats: int, min_seconds: float, max_repeats: int = 10_000) -> np.ndarray:
    """Wall times of repeated calls (at least ``min_repeats`` and ``min_seconds`` in total)."""
    times: list[float] = []
    start = time.perf_counter()
    while len(times) < min_repeats or (
        time.perf_counter() - start < min_seconds and len(times) < max_repeats
    ):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return np.asarray(times)


def bench_align(quick: bool = False, pairs=PAIRS, sizes=None, progress=None) -> dict:
    sizes = sizes or (QUICK_SIZES if quick else SIZES)
    rng = np.random.default_rng(0)
    results = []
    vocabs: dict[str, ByteVocab] = {}
    for student, teacher in pairs:
        for name in (student, teacher):
            if name not in vocabs:
                vocabs[name] = ByteVocab.from_pretrained(name)
        sv, tv = vocabs[student], vocabs[teacher]
        for n in sizes:
            s_ids = sample_response(sv, n)
            t_ids = np.asarray(tv.encode_bytes(sv.concat_bytes(s_ids)), dtype=np.int64)
            s_lp = -rng.exponential(1.0, s_ids.size)
            t_lp = -rng.exponential(1.0, t_ids.size)

            def ours(s_ids=s_ids, t_ids=t_ids, s_lp=s_lp, t_lp=t_lp, sv=sv, tv=tv):
                a = align(s_ids, t_ids, sv, tv)
                assign_credit(a, t_lp, s_lp)
                return a

            a = ours()
            t_ours = _times(ours, 5, 0.3 if quick else 1.0)
            row = {
                "pair": f"{student}->{teacher}",
                "tokens": int(n),
                "teacher_tokens": int(t_ids.size),
                "one_to_one_share": a.one_to_one_share,
                "coverage": a.coverage,
                "unaligned_share": a.unaligned_student_tokens / n,
                # Best-of-N is the headline (as timeit recommends: slower repeats are other
                # processes, not our code); the median is kept for a noisy machine's picture.
                "crossopd_tok_per_s": n / t_ours.min(),
                "crossopd_tok_per_s_median": n / float(np.median(t_ours)),
                "repeats": int(t_ours.size),
            }
            # the decode baseline, on the same inputs
            s_list, t_list = s_ids.tolist(), t_ids.tolist()
            box: dict = {}
            s_dec, t_dec = _in_context_decode(sv), _in_context_decode(tv)

            def base(s_list=s_list, t_list=t_list, s_dec=s_dec, t_dec=t_dec, box=box):
                box["r"] = decode_baseline.decode_align(s_list, t_list, s_dec, t_dec)

            base()  # warm-up: lazily built decoders are not the baseline's cost
            t_base = _times(base, 3, 0.5 if quick else 2.0, max_repeats=50)
            row.update(
                baseline_tok_per_s=n / t_base.min(),
                baseline_tok_per_s_median=n / float(np.median(t_base)),
                baseline_repeats=int(t_base.size),
                baseline_unaligned_share=box["r"][1] / n,
                speedup=float(t_base.min() / t_ours.min()),
                speedup_median=float(np.median(t_base) / np.median(t_ours)),
            )
            results.append(row)
            if progress:
                progress(row)
    return {
        "benchmark": "align",
        "quick": quick,
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor() or platform.machine(),
            "python": platform.python_version(),
            "numpy": np.__version__,
        },
        "baseline": "crossopd.bench.decode_baseline (decode-based, paper's description)",
        "results": results,
    }


def render_row(row: dict) -> str:
    """One terminal line per (pair, size) while the benchmark runs."""
    return (
        f"{row['pair']:<24} {row['tokens']:>6} tok  crossopd "
        f"{row['crossopd_tok_per_s'] / 1e6:8.2f} M tok/s  unaligned "
        f"{row['unaligned_share']:.3%}  baseline {row['baseline_tok_per_s'] / 1e6:8.3f} M tok/s  "
        f"speedup {row['speedup']:6.0f}x (median {row['speedup_median']:.0f}x)  "
        f"baseline unaligned {row['baseline_unaligned_share']:.3%}"
    )
