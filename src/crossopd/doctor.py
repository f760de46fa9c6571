"""``crossopd doctor``: is this student/teacher pair ready for cross-tokenizer OPD?

Checks what silently breaks distillation: byte views that do not round-trip, bytes a teacher
cannot spell, poor alignment on realistic text, a teacher without a chat template, and the two
prompts and stop markers each side will actually see.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from crossopd.align import align_text
from crossopd.bridge import (
    DEFAULT_PLAIN_STOP,
    DEFAULT_PLAIN_TEMPLATE,
    ChatFormat,
    TemplateError,
)
from crossopd.hub import load_hf_tokenizer
from crossopd.tokens import ByteVocab, UnsupportedTokenizerError

SAMPLE_TEXTS = (
    "The answer is 42. First, 17 + 25 = 42; then we check it twice.",
    "def add(a, b):\n    return a + b\n\nprint(add(12345, 67890))",
    "机器学习很有趣。東京は晴れ。안녕하세요!",
    "Emoji 👩\u200d💻 and flags 🇫🇷, accents café / cafe\u0301, math ∑ x² ≤ π.",
    "<think>Let me reason step by step.</think>\nSo the result is 3.14159.",
    "   whitespace\truns\r\nand\n\n\nnewlines   ",
)
SAMPLE_CONVERSATION = [
    {"role": "system", "content": "You are a careful math tutor."},
    {"role": "user", "content": "What is 12 × 7?"},
]


def _side(src: str, vocab: ByteVocab, warnings: list[str], role: str,
          plain_template: str | None, stop: str | None) -> tuple[dict, ChatFormat | None]:

    info: dict[str, Any] = {"kind": vocab.kind, "vocab_size": vocab.vocab_size,
                            "end_of_turn": None, "stop_ids": [],
                            "dummy_prefix": vocab.dummy_prefix, "has_chat_template": False}
    missing = np.flatnonzero(vocab.byte_ids < 0)
    if missing.size and vocab.unk_id is None:
        warnings.append(f"{role} has no token for {missing.size} byte values "
                        f"(e.g. {', '.join(f'0x{b:02X}' for b in missing[:6])}): text with "
                        "those bytes cannot be spelled and stays unaligned")
    try:
        tok = load_hf_tokenizer(src)
    except (UnsupportedTokenizerError, OSError, ValueError) as e:
        warnings.append(f"{role}: no chat template available ({e})")
        return info, None
    info["has_chat_template"] = bool(getattr(tok, "chat_template", None))
    if not info["has_chat_template"] and plain_template is None:
        warnings.append(
            f"{role} has no chat template (a base model?): set a plain template; shown here "
            f"with {DEFAULT_PLAIN_TEMPLATE!r} and stop {DEFAULT_PLAIN_STOP!r}"
        )
        plain_template, stop = DEFAULT_PLAIN_TEMPLATE, stop or DEFAULT_PLAIN_STOP
    try:
        fmt = ChatFormat.from_tokenizer(tok, plain_template=plain_template, stop=stop, name=src)
    except TemplateError as e:
        warnings.append(f"{role}: {e}")
        return info, None
    info["end_of_turn"] = fmt.end_of_turn
    info["stop_ids"] = sorted(fmt.stop_ids)  # the ids that end this side's turn
    return info, fmt


def run_doctor(student: str, teacher: str, teacher_template: str | None = None,
               teacher_stop: str | None = None) -> dict:
    sv, tv = ByteVocab.from_pretrained(student), ByteVocab.from_pretrained(teacher)
    warnings: list[str] = []
    s_info, s_fmt = _side(student, sv, warnings, "student", None, None)
    t_info, t_fmt = _side(teacher, tv, warnings, "teacher", teacher_template, teacher_stop)
    samples = []
    for text in SAMPLE_TEXTS:
        data = text.encode("utf-8")
        s_ids, t_ids, a = align_text(data, sv, tv)
        round_trip = {"student": sv.concat_bytes(s_ids) == data,
                      "teacher": tv.concat_bytes(tv.encode_bytes(data)) == data}
        for role, ok in round_trip.items():
            if not ok:
                warnings.append(f"{role} byte view does not round-trip {text[:30]!r}: a lossy "
                                "normaliser or missing byte tokens; those bytes stay unaligned")
        samples.append({"text": text, "coverage": a.coverage,
                        "one_to_one_share": a.one_to_one_share,
                        "student_tokens": len(s_ids), "teacher_tokens": len(t_ids),
                        "round_trip": round_trip})
    mean_cov = float(np.mean([s["coverage"] for s in samples]))
    if mean_cov < 0.99:
        warnings.append(f"mean alignment coverage is {mean_cov:.3f}: part of every response will "
                        "get no teacher signal")
    return {
        "student": s_info,
        "teacher": t_info,
        "samples": samples,
        "mean_coverage": mean_cov,
        "mean_one_to_one_share": float(np.mean([s["one_to_one_share"] for s in samples])),
        "student_prompt": s_fmt.render(SAMPLE_CONVERSATION) if s_fmt else None,
        "teacher_prompt": t_fmt.render(SAMPLE_CONVERSATION) if t_fmt else None,
        "warnings": warnings,
    }


def render_report(r: dict, student: str, teacher: str) -> str:
    lines = [f"crossopd doctor: student {student} vs teacher {teacher}", ""]
    for role, name in (("student", student), ("teacher", teacher)):
        i = r[role]
        template = "yes" if i["has_chat_template"] else "no"
        lines.append(f"{role:<8} {name}: {i['kind']}, {i['vocab_size']} ids, end of turn "
                     f"{i['end_of_turn']!r}, chat template {template}")
    lines += ["", f"{'coverage':>9} {'1:1':>6} {'S tok':>6} {'T tok':>6}  sample"]
    for s in r["samples"]:
        lines.append(f"{s['coverage']:>9.4f} {s['one_to_one_share']:>6.3f} "
                     f"{s['student_tokens']:>6} {s['teacher_tokens']:>6}  "
                     f"{s['text'][:50]!r}")
    lines += ["", "student prompt:", repr(r["student_prompt"]), "", "teacher prompt:",
              repr(r["teacher_prompt"]), ""]
    lines += [f"warning: {w}" for w in r["warnings"]] or ["no warnings"]
    return "\n".join(lines)
