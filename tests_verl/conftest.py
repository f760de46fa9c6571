"""Models the verl tests build themselves: tests/tiny_models.py's tiny Llama pair with the real
bundled tokenizers (SmolLM2 student, Gemma 3 teacher)."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "tests"))

from tiny_models import tiny_models  # noqa: E402


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))
