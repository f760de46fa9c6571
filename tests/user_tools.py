"""A user's tools and environment, imported by path in tests/test_agentic.py (pytest puts
tests/ on sys.path), written as TRL takes them."""

from __future__ import annotations


def calc(expr: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * and parentheses.

    Args:
        expr: the expression, e.g. 17*23
    """
    if set(expr) - set("0123456789+-*() "):
        raise ValueError(f"not arithmetic: {expr!r}")
    return str(eval(expr))  # noqa: S307 - digits and operators only, checked above


class Calculator:
    """An environment per rollout (TRL's environment_factory shape): ``reset`` starts it (and
    may return text for the prompt); its public methods are the tools. It remembers its
    calls."""

    def reset(self, **row) -> None:
        self.history: list[str] = []

    def calc(self, expr: str) -> str:
        """Evaluate an arithmetic expression of integers with + - * and parentheses.

        Args:
            expr: the expression, e.g. 17*23
        """
        self.history.append(expr)
        return calc(expr)


class Hinting(Calculator):
    def reset(self, **row) -> str:
        super().reset(**row)
        return " Use the calculator."
