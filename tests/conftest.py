"""Real tokenizers, loaded once per test session (the Gemma GGUF conversion is cached on disk)."""

from __future__ import annotations

import os
from functools import cache
from pathlib import Path
from typing import Any

import pytest
import torch
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


def tiny_model(tok, out: Path, seed: int, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64,
                      num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                      max_position_embeddings=512, tie_word_embeddings=True,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id)
    LlamaForCausalLM(cfg).save_pretrained(out)
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    from crossopd.hub import load_hf_tokenizer

    smol = load_hf_tokenizer("smollm2")
    gemma = load_hf_tokenizer("gemma3-270m")
    return {
        "student": str(tiny_model(smol, root / "student", 0)),
        "teacher": str(tiny_model(gemma, root / "teacher", 1)),
        "same_teacher": str(tiny_model(smol, root / "same_teacher", 2)),
    }
