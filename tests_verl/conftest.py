"""Models the verl tests build themselves: tests/tiny_models.py's tiny Llama pair with the real
bundled tokenizers (SmolLM2 student, Gemma 3 teacher)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from tiny_models import tiny_models, tiny_tool_teacher  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="session")
def tool_teacher(tmp_path_factory):
    """A tiny Gemma-tokenizer teacher whose template renders tool turns (calls as JSON
    objects)."""
    return tiny_tool_teacher(tmp_path_factory.mktemp("tool_teacher"))
