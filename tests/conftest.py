"""Real tokenizers, loaded once per test session (the Gemma GGUF conversion is cached on disk)."""

from __future__ import annotations

import os
from functools import cache
from typing import Any

import pytest
from hypothesis import HealthCheck, settings

from crossopd import ByteVocab

from tiny_models import tiny_models

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


def free_port() -> int:
    """A free TCP port on 127.0.0.1 for a real server in a test."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: Any, url: str, deadline_s: float) -> None:
    """Poll ``url`` until a real server subprocess answers; its output if it dies first."""
    import time
    import urllib.request

    end = time.time() + deadline_s
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {proc.stdout.read() if proc.stdout else ''}")
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError(f"server at {url} not ready after {deadline_s}s")


PLAIN = {"plain_template": "Question: {prompt}\nAnswer:", "stop": "\n\nQuestion:"}


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    return tiny_models(tmp_path_factory.mktemp("tiny"))
