"""HTTP teacher: an OpenAI-compatible ``/v1/completions`` endpoint with vLLM's prompt_logprobs.

Works against ``vllm serve`` and ``crossopd serve-teacher``. Requests run concurrently over
several URLs (round-robin), each with a timeout, retried with exponential backoff on connection
errors, timeouts, HTTP 5xx/429 and malformed responses; after the last try a ``TeacherError``
says what failed where. Client errors (HTTP 4xx) are not retried: they will not get better.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

import numpy as np

from crossopd.teachers import TeacherError, check_spans


class _Retryable(Exception):
    pass


class HTTPTeacher:
    def __init__(
        self,
        urls: str | Sequence[str],
        model: str | None = None,
        timeout: float = 120.0,
        retries: int = 3,
        backoff: float = 0.5,
        concurrency: int = 8,
        max_length: int | None = None,
        first_url: int = 0,
    ) -> None:
        # a base URL with or without the OpenAI-style /v1 suffix (what `vllm serve` prints)
        self.urls = [u.rstrip("/").removesuffix("/v1")
                     for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("HTTPTeacher needs at least one URL")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"teacher URL {u!r} must start with http:// or https://")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.concurrency = concurrency
        self.context = max_length  # the server's max_model_len; read from /v1/models if None
        # processes of one run start on different URLs of the pool, so they spread the load
        self._next_start = itertools.count(first_url)
        self._lock = threading.Lock()

    @property
    def max_length(self) -> int | None:
        """The longest prompt the server scores: vLLM refuses ``prompt + max_tokens >
        max_model_len`` and a scoring request asks for one token."""
        if self.context is None:
            self.context = self._server_context()
        return None if self.context is None else self.context - 1

    def _server_context(self) -> int | None:
        """``max_model_len`` from ``/v1/models`` (vLLM and serve-teacher report it)."""
        for url in self.urls:
            try:
                with urllib.request.urlopen(url + "/v1/models", timeout=30) as resp:
                    models = json.loads(resp.read()).get("data", [])
            except (OSError, ValueError, HTTPException):
                continue
            lengths = [m.get("max_model_len") for m in models
                       if not self.model or m.get("id") == self.model]
            if lengths and isinstance(lengths[0], int):
                return lengths[0]
        return None

    def _first_url_index(self) -> int:
        with self._lock:
            return next(self._next_start)

    def _post(self, url: str, body: dict) -> dict:
        data = json.dumps(body).encode()
        req = urllib.request.Request(
            url + "/v1/completions", data=data, headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = e.read()[:300].decode("utf-8", "replace")
            if e.code >= 500 or e.code == 429:
                raise _Retryable(f"HTTP {e.code} from {url}: {detail}") from e
            raise TeacherError(f"HTTP {e.code} from {url}: {detail}") from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, OSError) as e:
            raise _Retryable(f"{type(e).__name__} talking to {url}: {e}") from e
        try:
            return json.loads(raw)
        except ValueError as e:
            raise _Retryable(f"malformed JSON from {url}: {raw[:120]!r}") from e

    def _score_one(self, index: int, ids: list[int], span: tuple[int, int]) -> np.ndarray:
        body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
        if self.model:
            body["model"] = self.model
        errors: list[str] = []
        first = self._first_url_index()  # requests start round-robin; a retry moves on
        for attempt in range(self.retries + 1):
            url = self.urls[(first + attempt) % len(self.urls)]
            try:
                return _parse(self._post(url, body), ids, span, url)
            except _Retryable as e:
                errors.append(str(e))
                if attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
        raise TeacherError(
            f"teacher request {index} ({len(ids)} tokens) failed after {self.retries + 1} "
            f"attempts; last error: {errors[-1]}"
        )

    def score(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        check_spans(sequences, spans)
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [
                pool.submit(self._score_one, i, [int(t) for t in seq], tuple(span))
                for i, (seq, span) in enumerate(zip(sequences, spans))
            ]
            return [f.result() for f in futures]


def _parse(doc: dict, ids: list[int], span: tuple[int, int], url: str) -> np.ndarray:
    """The realised tokens' log-probs for ``span``; any shape problem is retryable."""
    try:
        entries = doc["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise _Retryable(f"response from {url} has no choices[0].prompt_logprobs") from e
    if not isinstance(entries, list) or len(entries) != len(ids):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise _Retryable(f"{url} returned {got} prompt_logprobs for a {len(ids)}-token prompt")
    start, end = span
    out = np.empty(end - start, dtype=np.float64)
    for k, p in enumerate(range(start, end)):
        entry = entries[p]
        try:
            value = entry[str(ids[p])]
            x = float(value["logprob"] if isinstance(value, dict) else value)
        except (KeyError, TypeError, ValueError) as e:
            raise _Retryable(f"{url}: position {p} lacks the logprob of token {ids[p]}") from e
        if math.isnan(x) or x > 1e-6:
            raise _Retryable(f"{url}: position {p} has an invalid logprob {x}")
        out[k] = x
    return out
