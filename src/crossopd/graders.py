"""Graders of benchmark responses: the answer a response gives, and whether it matches the
reference. Math goes through ``math-verify`` (LaTeX and plain expressions, so ``\\frac{1}{2}``,
``0.5`` and ``1/2`` agree); a multiple-choice response is read for its option letter."""

from __future__ import annotations

import re
import threading
from collections.abc import Callable

# A response's own \boxed{} wins over any other number in it: the prompt asks for one.
_BOX = re.compile(r"\\(?:boxed|fbox)\s*\{")


def last_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` (or ``\\fbox{...}``), braces balanced; None
    when there is none or it is not closed."""
    starts = [m.end() for m in _BOX.finditer(text)]
    if not starts:
        return None
    depth, i = 1, starts[-1]
    while i < len(text):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[starts[-1] : i]
        i += 1
    return None


def _timeout() -> int | None:
    # math-verify's timeouts use SIGALRM, which only the main thread may set: elsewhere none
    return 5 if threading.current_thread() is threading.main_thread() else None


def _parse(text: str) -> list:
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse

    return parse(text, extraction_config=[LatexExtractionConfig(), ExprExtractionConfig()],
                 parsing_timeout=_timeout())


def math_correct(response: str, reference: str) -> bool:
    """Whether the response's final answer (its last ``\\boxed{}``, else its last expression)
    equals ``reference`` (a LaTeX or plain answer, without ``\\boxed``) under math-verify."""
    from math_verify import verify

    gold = _parse(f"\\boxed{{{reference}}}")
    if not gold:
        gold = _parse(reference)
    pred = _parse(response)
    if not gold or not pred:
        return False
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


LETTERS = "ABCD"
# "Answer: C", "answer is (C)", "**Answer:** C"; the last such statement counts
_ANSWER_LINE = re.compile(r"answer\s*(?:is)?\s*[:：]?\s*\**\s*\(?\s*([A-D])\b\s*\)?",
                          re.IGNORECASE)


def choice_letter(response: str) -> str | None:
    """The option letter a response chose: its last "Answer: X" statement, else a boxed letter,
    else a response that is only a letter (``"C"``, ``"(C)"``, ``"C."``)."""
    found = _ANSWER_LINE.findall(response)
    if found:
        return found[-1].upper()
    boxed = last_boxed(response)
    if boxed is not None:
        m = re.fullmatch(r"\s*(?:\\text\{)?\(?([A-Da-d])\)?\}?\s*", boxed)
        if m:
            return m.group(1).upper()
    m = re.fullmatch(r"\s*\(?([A-D])[).]?\s*", response)
    return m.group(1) if m else None


def choice_correct(response: str, reference: str) -> bool:
    return choice_letter(response) == reference


GRADERS: dict[str, Callable[[str, str], bool]] = {"math": math_correct, "choice": choice_correct}


def gold_response(grader: str, reference: str) -> str:
    """The reference written as a model is asked to answer (what ``--gold`` grades)."""
    if grader == "choice":
        return f"Answer: {reference}"
    return f"The final answer is \\boxed{{{reference}}}."
