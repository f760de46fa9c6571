"""Real tokenizers, loaded once per test session (the Gemma GGUF conversion is cached on disk)."""

from __future__ import annotations

import os
from functools import cache

import pytest
from hypothesis import HealthCheck, settings

from crossopd import ByteVocab

settings.register_profile(
    "crossopd",
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    derandomize=os.environ.get("CI") == "true",  # reproducible in CI, exploring locally
)
settings.load_profile("crossopd")

REAL = ("smollm2", "gemma3-270m", "llama3", "mistral-v3", "cl100k", "tekken", "mistral-v1")


@cache
def vocab(name: str) -> ByteVocab:
    return ByteVocab.from_pretrained(name)


@pytest.fixture(scope="session")
def get_vocab():
    return vocab
