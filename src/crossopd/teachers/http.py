"""HTTP teacher: an OpenAI-compatible ``/v1/completions`` endpoint with vLLM's prompt_logprobs.

Works against ``vllm serve`` and ``crossopd serve-teacher``. Requests run concurrently over
several URLs (round-robin), each with a timeout. What is retried, and how often:

- connection errors, HTTP 429/502/503/504/408 and malformed or mis-shaped answers: up to
  ``retries`` times, each retry on the next URL of the pool;
- any other HTTP 5xx (a 500 is usually the same bug again): once;
- a timeout: the server may still be computing the request, so with a URL pool it is not sent
  to a URL where it already timed out (it fails once it has timed out everywhere); with one URL
  it is retried like a connection error;
- HTTP 4xx (but 408/429): never; ``TeacherClientError`` at once, with the server's message.

Waits are capped exponential backoff with jitter (between half and all of ``backoff * 2**n``,
at most ``max_backoff``), and at least the server's ``Retry-After`` on 429/503. At most
``max_retrying`` requests are in their retry phase at once (the others wait for a slot), so a
struggling server is not hit by every request's retries together. After the last try a
``TeacherUnavailable`` says what failed where. The API key is sent as ``Authorization: Bearer``
and never appears in errors or logs.
"""

from __future__ import annotations

import email.utils
import itertools
import json
import math
import os
import random
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from http.client import HTTPException

import numpy as np

from crossopd.teachers import TeacherError, check_spans, status_line
from crossopd.teachers.probe import RETRY_STATUSES, served_models

API_KEY_ENV = "CROSSOPD_API_KEY"
DEAD_URL_S = 30.0  # how long a URL that refused connections is skipped


class TeacherClientError(TeacherError):
    """The server refused the request itself (HTTP 4xx): retrying cannot help."""


class TeacherUnavailable(TeacherError):
    """The teacher did not answer usefully within the retries (down, overloaded, broken).
    ``transient``: it was down, overloaded or timing out, so waiting (``patience_s``) can help;
    a repeated 5xx or a broken answer is not."""

    def __init__(self, message: str, transient: bool = False) -> None:
        super().__init__(message)
        self.transient = transient


class _Failure(Exception):
    """One failed attempt. ``kind``: "retry" (transient), "server" (5xx that may be
    deterministic) or "timeout"."""

    def __init__(self, message: str, kind: str = "retry", retry_after: float | None = None):
        super().__init__(message)
        self.kind = kind
        self.retry_after = retry_after


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a ``Retry-After`` header (delta-seconds or an HTTP date); None if absent
    or unreadable."""
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


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
        api_key: str | None = None,
        max_backoff: float = 30.0,
        max_retrying: int = 2,
        max_retry_after: float = 300.0,
        patience_s: float = 0.0,
        on_wait: Callable[[str], None] | None = None,
    ) -> None:
        """``patience_s``: how long ``score`` waits for a teacher that is down or overloaded
        (probing ``/v1/models`` with capped backoff) before giving up; ``on_wait`` gets the
        status lines (default: stderr)."""
        # a base URL with or without the OpenAI-style /v1 suffix (what `vllm serve` prints)
        self.urls = [u.rstrip("/").removesuffix("/v1")
                     for u in ([urls] if isinstance(urls, str) else urls)]
        if not self.urls:
            raise ValueError("HTTPTeacher needs at least one URL")
        for u in self.urls:
            if not u.startswith(("http://", "https://")):
                raise ValueError(f"teacher URL {u!r} must start with http:// or https://")
        if max_retrying < 1:
            raise ValueError("max_retrying must be at least 1")
        self.model = model
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self.max_backoff = max_backoff
        self.max_retry_after = max_retry_after
        self.concurrency = concurrency
        self.context = max_length  # the server's max_model_len; read from /v1/models if None
        # None: the environment's key; "" sends none. Kept off repr and out of every message.
        self._api_key = os.environ.get(API_KEY_ENV) if api_key is None else api_key
        # requests in their retry phase hold a slot; replaceable (tests count its holders)
        self.retry_slots: threading.Semaphore = threading.BoundedSemaphore(max_retrying)
        # processes of one run start on different URLs of the pool, so they spread the load
        self._next_start = itertools.count(first_url)
        self._lock = threading.Lock()
        self._rng = random.Random()
        self.patience_s = patience_s
        self.on_wait = on_wait or status_line
        self._dead: dict[str, float] = {}  # URL -> monotonic time until which it is skipped

    @property
    def max_length(self) -> int | None:
        """The longest prompt the server scores: vLLM refuses ``prompt + max_tokens >
        max_model_len`` and a scoring request asks for one token."""
        if self.context is None:
            self.context = self._server_context()
        return None if self.context is None else self.context - 1

    def _headers(self) -> dict[str, str]:
        headers = {"Content-Type": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        return headers

    def _scrub(self, text: str) -> str:
        # a server that echoes request headers into its error page must not leak the key
        return text.replace(self._api_key, "***") if self._api_key else text

    def _server_context(self) -> int | None:
        """``max_model_len`` from ``/v1/models`` (vLLM and serve-teacher report it)."""
        for url in self.urls:
            try:
                models = served_models(url, self._api_key, timeout=30)
            except TeacherError:
                continue
            lengths = [m.get("max_model_len") for m in models
                       if isinstance(m, dict) and (not self.model or m.get("id") == self.model)]
            if lengths and isinstance(lengths[0], int):
                return lengths[0]
        return None

    def _first_url_index(self) -> int:
        with self._lock:
            return next(self._next_start)

    def _post(self, url: str, body: dict) -> dict:
        req = urllib.request.Request(url + "/v1/completions", data=json.dumps(body).encode(),
                                     headers=self._headers())
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as e:
            detail = self._scrub(e.read()[:300].decode("utf-8", "replace"))
            message = f"HTTP {e.code} from {url}: {detail}"
            if e.code in RETRY_STATUSES:
                raise _Failure(message, retry_after=parse_retry_after(
                    e.headers.get("Retry-After") if e.headers else None)) from e
            if e.code >= 500:
                raise _Failure(message, kind="server") from e
            if e.code in (401, 403):
                message += (f" (the server wants an API key: set teacher.api_key or "
                            f"{API_KEY_ENV})")
            raise TeacherClientError(message) from e
        except (urllib.error.URLError, TimeoutError, ConnectionError, HTTPException, OSError) as e:
            reason = getattr(e, "reason", e)
            kind = "timeout" if isinstance(e, TimeoutError) or isinstance(reason, TimeoutError) \
                else "down"
            raise _Failure(f"{type(e).__name__} talking to {url}: {e}", kind=kind) from e
        try:
            return json.loads(raw)
        except ValueError as e:
            raise _Failure(f"malformed JSON from {url}: {raw[:120]!r}") from e

    def _pick(self, first: int, attempt: int, timed_out: set[str]) -> str:
        n, now = len(self.urls), time.monotonic()
        for skip_dead in (True, False):  # dead URLs only when no live one is left
            for k in range(n):
                url = self.urls[(first + attempt + k) % n]
                if skip_dead and self._dead.get(url, 0.0) > now:
                    continue
                if n == 1 or url not in timed_out:
                    return url
        return self.urls[(first + attempt) % n]  # unreachable: the caller gives up first

    def _mark_dead(self, url: str, error: str) -> None:
        """A URL that refuses connections is skipped for a while; the pool goes on without it."""
        if len(self.urls) == 1:
            return
        with self._lock:
            fresh = self._dead.get(url, 0.0) <= time.monotonic()
            self._dead[url] = time.monotonic() + DEAD_URL_S
        if fresh:
            self.on_wait(f"teacher URL {url} does not answer ({error}): using the other "
                         f"{len(self.urls) - 1} URL(s) for {DEAD_URL_S:.0f} s")

    def delay(self, attempt: int, retry_after: float | None = None) -> float:
        """Seconds to wait before retry ``attempt + 1``: jittered so that requests which failed
        together do not come back together, and never shorter than the server asked."""
        cap = min(self.max_backoff, self.backoff * 2**attempt)
        wait = cap / 2 + self._rng.uniform(0, cap / 2)
        if retry_after is not None:
            asked = min(retry_after, self.max_retry_after)
            wait = max(wait, asked + self._rng.uniform(0, min(1.0, 0.1 * asked)))
        return wait

    def _score_one(self, index: int, ids: list[int], span: tuple[int, int],
                   abort: threading.Event | None = None) -> np.ndarray:
        body = {"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0, "temperature": 0.0}
        if self.model:
            body["model"] = self.model
        errors: list[str] = []
        timed_out: set[str] = set()
        server_errors = 0
        first = self._first_url_index()  # requests start round-robin; a retry moves on
        holding = False
        try:
            for attempt in itertools.count():
                url = self._pick(first, attempt, timed_out)
                try:
                    return _parse(self._post(url, body), ids, span, url)
                except _Failure as f:
                    errors.append(str(f))
                    if f.kind == "timeout":
                        timed_out.add(url)
                    if f.kind == "down":
                        self._mark_dead(url, str(f))
                    server_errors += f.kind == "server"
                    note = self._give_up(attempt, server_errors, timed_out)
                    if note is not None:
                        raise TeacherUnavailable(
                            f"teacher request {index} ({len(ids)} tokens) failed after "
                            f"{attempt + 1} attempts; last error: {errors[-1]}{note}",
                            transient=f.kind in ("down", "timeout", "retry")) from f
                    if not holding:
                        holding = self._acquire_slot(abort)
                    if abort is not None and abort.is_set():
                        raise TeacherUnavailable(
                            f"teacher request {index} abandoned (another request of the "
                            f"batch failed); its last error: {errors[-1]}") from None
                    time.sleep(self.delay(attempt, f.retry_after))
        finally:
            if holding:
                self.retry_slots.release()
        raise AssertionError("unreachable")

    def _give_up(self, attempt: int, server_errors: int, timed_out: set[str]) -> str | None:
        """None to retry; else a note for the error message ("" when retries ran out)."""
        if server_errors > 1:
            return " (an HTTP 5xx other than 502/503/504 is retried once)"
        if len(self.urls) > 1 and len(timed_out) == len(self.urls):
            return " (timed out at every URL; not re-sent to a URL still computing it)"
        if attempt >= self.retries:
            return ""
        return None

    def _acquire_slot(self, abort: threading.Event | None) -> bool:
        while not self.retry_slots.acquire(timeout=0.1):
            if abort is not None and abort.is_set():
                return False
        return True

    def score(
        self, sequences: Sequence[Sequence[int]], spans: Sequence[tuple[int, int]]
    ) -> list[np.ndarray]:
        """Log-probs for every sequence. While the teacher is down or overloaded this waits up
        to ``patience_s`` (then ``TeacherUnavailable``); scores already received are kept, so
        nothing is sent twice once the teacher is back."""
        check_spans(sequences, spans)
        done: dict[int, np.ndarray] = {}
        since: float | None = None  # when the teacher last stopped making progress
        while True:
            before = len(done)
            try:
                self._score_into(done, sequences, spans)
                return [done[i] for i in range(len(sequences))]
            except TeacherUnavailable as e:
                if not (self.patience_s and e.transient):
                    raise
                if since is None or len(done) > before:
                    since = time.monotonic()
                # a server that answers its probe but refuses every request (503 over and
                # over) is as unavailable as one that is down: the patience bounds both
                if time.monotonic() - since >= self.patience_s or \
                        not self._wait_for_teacher(since, str(e)):
                    raise TeacherUnavailable(
                        f"{e} -- the teacher stayed unavailable for {self.patience_s:.0f} s "
                        "(teacher.patience_s)", transient=True) from e

    def _score_into(self, done: dict[int, np.ndarray], sequences: Sequence[Sequence[int]],
                    spans: Sequence[tuple[int, int]]) -> None:
        abort = threading.Event()  # one request failing for good ends the others' retries
        first_error: list[TeacherError] = []

        def one(i: int, seq: Sequence[int], span: tuple[int, int]) -> None:
            try:
                done[i] = self._score_one(i, [int(t) for t in seq], span, abort)
            except TeacherError as e:
                if not abort.is_set():  # the cause, not a request abandoned because of it
                    first_error.append(e)
                abort.set()
                raise

        todo = [i for i in range(len(sequences)) if i not in done]
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = [pool.submit(one, i, sequences[i], tuple(spans[i])) for i in todo]
            errors = [f.exception() for f in futures]
        if any(errors):
            raise first_error[0] if first_error else next(e for e in errors if e)

    def _wait_for_teacher(self, since: float, error: str) -> bool:
        """Probe ``/v1/models`` with capped backoff until a URL answers (True) or the patience
        runs out (False), with a status line on every probe."""
        attempt = 0
        while True:
            for url in self.urls:
                try:
                    served_models(url, self._api_key, timeout=min(10.0, self.timeout))
                    self._dead.pop(url, None)
                    return True
                except TeacherError:
                    continue
            waited = time.monotonic() - since
            if waited >= self.patience_s:
                return False
            pause = min(self.delay(attempt), self.patience_s - waited)
            self.on_wait(f"teacher unavailable for {waited:.0f} s ({error[-160:]}); waiting up "
                         f"to {self.patience_s:.0f} s (teacher.patience_s), next probe in "
                         f"{pause:.0f} s")
            time.sleep(pause)
            attempt += 1


def _parse(doc: dict, ids: list[int], span: tuple[int, int], url: str) -> np.ndarray:
    """The realised tokens' log-probs for ``span``; any shape problem is retryable."""
    try:
        entries = doc["choices"][0]["prompt_logprobs"]
    except (KeyError, IndexError, TypeError) as e:
        raise _Failure(f"response from {url} has no choices[0].prompt_logprobs") from e
    if not isinstance(entries, list) or len(entries) != len(ids):
        got = len(entries) if isinstance(entries, list) else type(entries).__name__
        raise _Failure(f"{url} returned {got} prompt_logprobs for a {len(ids)}-token prompt")
    start, end = span
    out = np.empty(end - start, dtype=np.float64)
    for k, p in enumerate(range(start, end)):
        entry = entries[p]
        try:
            value = entry[str(ids[p])]
            x = float(value["logprob"] if isinstance(value, dict) else value)
        except (KeyError, TypeError, ValueError) as e:
            raise _Failure(f"{url}: position {p} lacks the logprob of token {ids[p]}") from e
        if math.isnan(x) or x > 1e-6:
            raise _Failure(f"{url}: position {p} has an invalid logprob {x}")
        out[k] = x
    return out
