"""``crossopd doctor``: is this student/teacher pair ready for cross-tokenizer OPD?

Checks what silently breaks distillation: byte views that do not round-trip, bytes a teacher
cannot spell, poor alignment on realistic text, a teacher without a chat template, and the two
prompts and stop markers each side will actually see.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from typing import Any

import numpy as np

from crossopd.cli.align import tokenizer_help
from crossopd.core.align import align_text
from crossopd.core.tokens import ByteVocab, UnsupportedTokenizerError
from crossopd.models.hub import load_hf_tokenizer, quiet_hf
from crossopd.step.bridge import (
    DEFAULT_PLAIN_STOP,
    DEFAULT_PLAIN_TEMPLATE,
    ChatFormat,
    TemplateError,
    build_teacher_request,
)
from crossopd.step.data import DataError, is_trajectory_file

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
SAMPLE_ANSWERS = ("84", "12 × 7 = 84.", "The answer is 84.")
# A first token (or stop chunk) this many nats below the rest of the response means the
# teacher is judging the format (a wrong seam or end marker), not the answer.
FORMAT_COST_WARN = 3.0


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


def check_teacher_url(url: str, served_name: str | None, warnings: list[str]) -> dict:
    """Reachable, serving the expected model, and its context (from ``/v1/models``)."""
    from crossopd.teachers import TeacherError
    from crossopd.teachers.probe import check_teacher_server

    try:
        return {"reachable": True, **check_teacher_server([url], served_name)}
    except TeacherError as e:
        warnings.append(str(e))
        return {"reachable": False, "url": url}


def check_data(path: str, s_fmt: ChatFormat | None, t_fmt: ChatFormat | None,
               warnings: list[str], new_tokens: int = 64) -> dict:
    """Rows, columns, and the longest prompt on each side against that side's context (plus
    ``new_tokens`` for the response)."""
    from crossopd.step.data import DataError, load_examples

    try:
        examples = load_examples(path)
    except DataError as e:
        warnings.append(f"data: {e}")
        return {"path": path, "rows": 0}
    info: dict[str, Any] = {"path": path, "rows": len(examples),
                            "multi_turn_rows": sum(len(e.messages) > 1 for e in examples),
                            "with_answer": sum(e.answer is not None for e in examples)}
    for role, fmt in (("student", s_fmt), ("teacher", t_fmt)):
        if fmt is None:
            continue
        longest = max(len(fmt.prompt_ids(e.messages)) for e in examples)
        info[f"longest_{role}_prompt"] = longest
        if fmt.max_length and longest + new_tokens > fmt.max_length:
            warnings.append(f"data: the longest prompt is {longest} {role} tokens; with "
                            f"{new_tokens} new tokens it exceeds the {role}'s context of "
                            f"{fmt.max_length}: such rollouts get no signal")
    if len(examples) < 40:
        warnings.append(f"data: {len(examples)} rows; at most a quarter is held out for "
                        "evaluation, so results on so few prompts are noisy")
    return info


def trajectory_file(path: str) -> bool:
    try:
        return is_trajectory_file(path)
    except DataError:
        return False  # not a json file of conversations: checked as prompts


def run_doctor(student: str, teacher: str, teacher_template: str | None = None,
               teacher_stop: str | None = None, scorer: Any = None,
               teacher_url: str | None = None, served_name: str | None = None,
               data: str | None = None, tool_format: str | None = None) -> dict:
    """``scorer``: a loaded teacher (anything with ``score``) to measure ``format_costs``;
    ``teacher_url`` / ``data``: also check a teacher server and a prompt file (a file of
    complete conversations with assistant turns is checked as trajectories, key
    ``trajectories``); ``tool_format``: how a side whose template cannot render tool calls
    writes them."""
    sv, tv = ByteVocab.from_pretrained(student), ByteVocab.from_pretrained(teacher)
    warnings: list[str] = []
    s_info, s_fmt = _side(student, sv, warnings, "student", None, None)
    t_info, t_fmt = _side(teacher, tv, warnings, "teacher", teacher_template, teacher_stop)
    samples = []
    for text in SAMPLE_TEXTS:
        raw = text.encode("utf-8")
        s_ids, t_ids, a = align_text(raw, sv, tv)
        round_trip = {"student": sv.concat_bytes(s_ids) == raw,
                      "teacher": tv.concat_bytes(tv.encode_bytes(raw)) == raw}
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
    server = check_teacher_url(teacher_url, served_name, warnings) if teacher_url else None
    if server and server.get("max_model_len") and t_fmt:
        # a scoring request asks for one token beyond the prompt
        t_fmt = dataclasses.replace(t_fmt, max_length=int(server["max_model_len"]) - 1)
    data_info = trajectories = None
    if data and s_fmt and t_fmt and trajectory_file(data):
        from crossopd.cli.doctor_trajectories import check_trajectories

        decoder = load_hf_tokenizer(teacher)
        trajectories = check_trajectories(
            data, s_fmt, t_fmt, sv, tv,
            lambda ids: decoder.decode(ids, skip_special_tokens=False), warnings, tool_format)
    elif data:
        data_info = check_data(data, s_fmt, t_fmt, warnings)
    costs = None
    if scorer is not None and s_fmt and t_fmt:
        costs = format_costs(s_fmt, t_fmt, sv, tv, scorer)
        check_format_costs(costs, warnings)
    return {
        "student": s_info,
        "teacher": t_info,
        "samples": samples,
        "mean_coverage": mean_cov,
        "mean_one_to_one_share": float(np.mean([s["one_to_one_share"] for s in samples])),
        "student_prompt": s_fmt.render(SAMPLE_CONVERSATION) if s_fmt else None,
        "teacher_prompt": t_fmt.render(SAMPLE_CONVERSATION) if t_fmt else None,
        "format_costs": costs,
        "teacher_server": server,
        "data": data_info,
        "trajectories": trajectories,
        "warnings": warnings,
    }


def format_costs(s_fmt: ChatFormat, t_fmt: ChatFormat, sv: ByteVocab, tv: ByteVocab,
                 teacher: Any) -> dict:
    """The teacher's log-probs, through the bridge, of short correct answers to
    ``SAMPLE_CONVERSATION`` written in the student's format: first response token, the rest
    (mean per token) and the stop chunk (teacher end-of-turn tokens, summed)."""
    stop_id = (s_fmt.end_of_turn_ids[0] if len(s_fmt.end_of_turn_ids) == 1
               else min(s_fmt.stop_ids, default=None))
    first, rest, stop = [], [], []
    for answer in SAMPLE_ANSWERS:
        ids = sv.encode_bytes((s_fmt.seam + answer).encode("utf-8"))
        resp = ids + ([stop_id] if stop_id is not None else [])
        req = build_teacher_request(SAMPLE_CONVERSATION, resp, s_fmt, t_fmt, sv, tv)
        lp = teacher.score([req.teacher_ids], [req.scored_span])[0]
        n_body = req.response_end - req.response_start
        first.append(lp[0])
        rest.extend(lp[1:n_body])
        if req.stop_end > req.response_end:
            stop.append(lp[n_body:].sum())
    return {"first_token": float(np.mean(first)),
            "rest_per_token": float(np.mean(rest)) if rest else None,
            "stop_chunk": float(np.mean(stop)) if stop else None,
            "answers": list(SAMPLE_ANSWERS)}


def check_format_costs(costs: dict, warnings: list[str]) -> None:
    rest = costs["rest_per_token"]
    if rest is None:
        return
    if costs["first_token"] < rest - FORMAT_COST_WARN:
        warnings.append(
            f"the teacher gives the first response token {costs['first_token']:.2f} nats vs "
            f"{rest:.2f} per token for the rest: the seam between prompt and response costs "
            "about {:.1f} nats on every response; check the teacher's template (a plain "
            "template's answer usually follows a space)".format(rest - costs["first_token"]))
    if costs["stop_chunk"] is not None and costs["stop_chunk"] < rest - FORMAT_COST_WARN:
        warnings.append(
            f"the teacher gives its end-of-turn {costs['stop_chunk']:.2f} nats after a complete "
            f"answer (the rest: {rest:.2f} per token): check teacher.stop / the end-of-turn")


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
    if r.get("teacher_server"):
        srv = r["teacher_server"]
        lines.append(f"teacher server {srv['url']}: " + (
            f"serves {', '.join(srv['models'])}, context {srv.get('max_model_len')}"
            if srv["reachable"] else "not reachable"))
    if r.get("data"):
        d = r["data"]
        lines.append(f"data {d['path']}: {d['rows']} rows"
                     + "".join(f", longest {role} prompt {d[f'longest_{role}_prompt']} tokens"
                               for role in ("student", "teacher")
                               if f"longest_{role}_prompt" in d))
    if r.get("trajectories") is not None:
        from crossopd.cli.doctor_trajectories import trajectory_lines

        lines += ["trajectories (per row):", *trajectory_lines(r["trajectories"]), ""]
    costs = r.get("format_costs")
    if costs:
        stop = "none" if costs["stop_chunk"] is None else f"{costs['stop_chunk']:.2f}"
        rest = "n/a" if costs["rest_per_token"] is None else f"{costs['rest_per_token']:.2f}"
        lines += [f"teacher log-probs of {len(costs['answers'])} sample answers: first token "
                  f"{costs['first_token']:.2f}, rest {rest} per token, stop chunk {stop}", ""]
    else:
        lines += ["(add --score to measure what the seam and the stop cost with the teacher "
                  "model)", ""]
    lines += [f"warning: {w}" for w in r["warnings"]] or ["no warnings"]
    return "\n".join(lines)


def per_teacher(values: list[str] | None, teachers: list[str]) -> list[str | None]:
    """A flag given once applies to every teacher; given per teacher, in the same order."""
    if not values:
        return [None] * len(teachers)
    if len(values) == 1:
        return values * len(teachers)
    if len(values) != len(teachers):
        raise ValueError(f"{len(values)} --teacher-template/--teacher-stop values for "
                         f"{len(teachers)} teachers: give one for all, or one per --teacher")
    return list(values)


def doctor_pairs(student: str, teachers: list[str], templates: list[str] | None = None,
                 stops: list[str] | None = None, *, score: bool = False,
                 device: str | None = None, **checks: Any) -> dict:
    """``run_doctor`` for the student with each teacher. One teacher: its pair report; several:
    the first pair's keys (the single-pair contract) plus ``pairs``, every pair's report with
    its ``teacher_name``."""
    reports = []
    for teacher, template, stop in zip(teachers, per_teacher(templates, teachers),
                                       per_teacher(stops, teachers)):
        scorer = None
        if score:
            from crossopd.teachers.hf import HFTeacher

            scorer = HFTeacher.from_pretrained(teacher, device=device)
        reports.append(run_doctor(student, teacher, template, stop, scorer=scorer, **checks))
    if len(reports) == 1:
        return reports[0]
    return {**reports[0], "pairs": [{"teacher_name": t, **r} for t, r in zip(teachers, reports)]}


def cmd_doctor(args: argparse.Namespace) -> int:
    from crossopd.cli.doctor import doctor_pairs, render_report

    quiet_hf()
    report = doctor_pairs(args.student, args.teacher, args.teacher_template, args.teacher_stop,
                          score=args.score, device=args.device, teacher_url=args.teacher_url,
                          served_name=args.served_name, data=args.data,
                          tool_format=args.tool_format)
    if args.json:
        print(json.dumps(report, ensure_ascii=False), file=args.stdout)
    else:
        pairs = report.get("pairs") or [{"teacher_name": args.teacher[0], **report}]
        print("\n\n".join(render_report(r, args.student, r["teacher_name"]) for r in pairs),
              file=args.stdout)
    return 0


def add_doctor_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``doctor`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    doc = sub.add_parser("doctor", help="check a student/teacher pair before training",
                         description="Tokenizer kinds, byte-view round trips, alignment coverage "
                         "on sample texts, both rendered prompts, both stop markers, warnings.")
    doc.add_argument("--student", required=True, help="student " + tokenizer_help())
    doc.add_argument("--teacher", required=True, action="append",
                     help="teacher " + tokenizer_help() + "; repeat it for several teachers "
                     "(one report per pair)")
    doc.add_argument("--teacher-template", action="append",
                     help="plain prompt template for a teacher without a chat template, e.g. "
                     "'Question: {prompt}\\nAnswer:' (once for all teachers, or once per "
                     "--teacher)")
    doc.add_argument("--teacher-stop", action="append", help="what ends the teacher's answer "
                     "(with a plain template), e.g. '\\n\\nQuestion:'")
    doc.add_argument("--score", action="store_true", help="load the teacher model and measure "
                     "its log-probs of sample answers: first token (the prompt/response seam), "
                     "the rest, the stop chunk; warns when the format costs nats")
    doc.add_argument("--device", default=None, help="device for --score (default: cuda if "
                     "available)")
    doc.add_argument("--teacher-url", help="also check a teacher server: reachable, the model "
                     "it serves, its context length")
    doc.add_argument("--served-name", help="with --teacher-url: the model name it must serve")
    doc.add_argument("--data", help="also check a prompt file: rows, and the longest prompt "
                     "against both contexts; a file of complete conversations (assistant turns, "
                     "tool calls, tool messages) is checked as trajectories: per row the "
                     "assistant turns, environment and format tokens, coverage")
    doc.add_argument("--tool-format", choices=["hermes"], default=None,
                     help="how a side whose chat template cannot render tool calls writes "
                     "them: hermes (<tool_call>{json}</tool_call> in the content)")
    doc.add_argument("--json", action="store_true", help="print one JSON object")
    doc.set_defaults(func=cmd_doctor)
    return doc
