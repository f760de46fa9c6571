"""The one answer checker: the answer a response gives, and whether it matches the reference.
Math goes through ``math-verify`` (LaTeX and plain expressions, so ``\\frac{1}{2}``, ``0.5`` and
``1/2`` agree); a multiple-choice response is read for its option letter; a held-out answer
(``answer_correct``) is a number, checked as math, or a text (a capital city), which must appear
as whole words of the response's first sentence, compared without case or accents, so a
response that lists every city it knows does not count."""

from __future__ import annotations

import re
import threading
import unicodedata
from collections.abc import Callable

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")
_SENTENCE_END = re.compile(r"[.!?;]\s|\n")
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


def math_verdict(response: str, reference: str) -> bool | None:
    """Whether the response's final answer (its last ``\\boxed{}``, else its last expression)
    equals ``reference`` (a LaTeX or plain answer, without ``\\boxed``) under math-verify; None
    when math-verify reads no answer on either side."""
    from math_verify import verify

    gold = _parse(f"\\boxed{{{reference}}}")
    if not gold:
        gold = _parse(reference)
    pred = _parse(response)
    if not gold or not pred:
        return None
    return bool(verify(gold, pred, timeout_seconds=_timeout()))


def math_correct(response: str, reference: str) -> bool:
    """``math_verdict``, with no answer read counting as wrong (the benchmarks' grader)."""
    return bool(math_verdict(response, reference))


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


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def fold(text: str) -> str:
    """Lower case without accents: ``Brasília`` and ``brasilia`` compare equal."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    return "".join(ch for ch in decomposed if not unicodedata.combining(ch))


def first_sentence(text: str) -> str:
    m = _SENTENCE_END.search(text.strip())
    return text.strip()[: m.start()] if m else text.strip()


def text_answer_correct(response: str, answer: str) -> bool:
    words = re.escape(fold(answer.strip())).replace(r"\ ", r"\s+")
    return re.search(rf"(?<!\w){words}(?!\w)", fold(first_sentence(response))) is not None


def answer_correct(response: str, answer: str) -> bool:
    """The held-out answer check: a numeric answer through math-verify (the benchmarks'
    ``math_verdict``), or the response's last number where math-verify reads none; a text
    answer as whole words of the first sentence."""
    if not any(ch.isdigit() for ch in answer):
        return text_answer_correct(response, answer)
    verdict = math_verdict(response, answer)
    if verdict is not None:
        return verdict
    got = last_number(response)
    return got is not None and got == answer.strip().replace(",", "")
