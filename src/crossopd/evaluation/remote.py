"""A benchmark's responses from a served model: ``crossopd eval http://HOST:PORT/v1 --benchmark
NAME`` asks an OpenAI-compatible server (``vllm serve``, or any server with
``/v1/chat/completions``) for K samples per item, so a teacher's headroom is checked where it is
served, with the server's generation engine.

The server applies the model's own chat template to the benchmark's messages and ends each
response at the model's end of turn, as the in-process path does. Requests run concurrently;
each carries the sampling settings and a per-item seed (the run's seed plus the item's index),
so a rerun against the same server and model draws the same samples where the server honours
``seed`` (vLLM does)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from crossopd.teachers import TeacherError
from crossopd.teachers.probe import served_models


def is_url(model: str) -> bool:
    return model.startswith(("http://", "https://"))


def served_name(url: str, api_key: str | None = None) -> str:
    """The one model the server serves (its ``/v1/models``); refuses a server with none."""
    names = [m.get("id") for m in served_models(url, api_key) if m.get("id")]
    if not names:
        raise TeacherError(f"{url} serves no model (its /v1/models list is empty)")
    return names[0]


def chat_samples(url: str, messages: list[dict], samples: int, max_tokens: int,
                 temperature: float, top_p: float, seed: int, model: str,
                 api_key: str | None = None, timeout: float = 600.0) -> list[str]:
    """``samples`` responses to one conversation, in the order the server returns them."""
    base = url.rstrip("/").removesuffix("/v1")
    body = {"model": model, "messages": messages, "n": samples, "max_tokens": max_tokens,
            "temperature": temperature, "top_p": top_p, "seed": seed}
    headers = {"Content-Type": "application/json",
               **({"Authorization": f"Bearer {api_key}"} if api_key else {})}
    req = urllib.request.Request(base + "/v1/chat/completions", json.dumps(body).encode(),
                                 headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        detail = " ".join(e.read()[:300].decode("utf-8", "replace").split())
        hint = (" (a scoring-only server such as `crossopd serve-teacher` has no chat "
                "completions: serve the model with `vllm serve`, or give its path as MODEL)"
                if e.code in (404, 405) else "")
        raise TeacherError(f"{base}/v1/chat/completions answered HTTP {e.code}{hint}: "
                           f"{detail}") from e
    except (OSError, ValueError) as e:
        raise TeacherError(f"{base}/v1/chat/completions failed ({e})") from e
    choices = sorted(doc.get("choices") or [], key=lambda c: c.get("index", 0))
    if len(choices) != samples:
        raise TeacherError(f"{base}/v1/chat/completions returned {len(choices)} choices for "
                           f"n={samples}")
    return [c["message"]["content"] or "" for c in choices]


def remote_responses(url: str, conversations: Sequence[list[dict]], s: Any,
                     api_key: str | None = None, concurrency: int = 8,
                     progress: bool = True) -> list[list[str]]:
    """``s.samples`` responses per conversation (``s``: the benchmark's ``Sampling``), with a
    progress bar over items."""
    from tqdm import tqdm

    model = served_name(url, api_key)

    def one(i: int) -> list[str]:
        return chat_samples(url, conversations[i], s.samples, s.max_new_tokens, s.temperature,
                            s.top_p, s.seed + i, model, api_key)

    with ThreadPoolExecutor(max_workers=max(1, concurrency)) as pool:
        return list(tqdm(pool.map(one, range(len(conversations))), total=len(conversations),
                         desc=f"generating ({model})", unit="item", disable=not progress,
                         dynamic_ncols=True))
