"""Answer checking for evaluation: math answers through ``math-verify`` when installed, with an
exact last-number comparison as the fallback."""

from __future__ import annotations

import re

_NUMBER = re.compile(r"-?\d+(?:[.,]\d+)*")


def last_number(text: str) -> str | None:
    found = _NUMBER.findall(text)
    return found[-1].replace(",", "") if found else None


def answer_correct(response: str, answer: str) -> bool:
    try:
        from math_verify import parse, verify

        gold, pred = parse(answer), parse(response)
        if gold and pred:
            return bool(verify(gold, pred))
    except ImportError:
        pass
    got = last_number(response)
    return got is not None and got == answer.strip().replace(",", "")
