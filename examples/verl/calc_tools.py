"""A verl function tool for the tool-calling launch (examples/verl/tools_vllm_teacher.sh):
verl loads this file from ``actor_rollout_ref.rollout.multi_turn.function_tool_path`` and
registers every ``@function_tool``; the schema comes from the type hints and the docstring,
as TRL's and crossopd's native engine read them (``rollout.tools``)."""

from verl.tools.function_tool import function_tool


@function_tool
def calc(expr: str) -> str:
    """Evaluate an arithmetic expression of integers with + - * and parentheses.

    Args:
        expr: the expression, e.g. 17*23
    """
    if set(expr) - set("0123456789+-*() "):
        raise ValueError(f"not arithmetic: {expr!r}")
    return str(eval(expr))  # noqa: S307 - digits and operators only, checked above
