"""Is a teacher server there, and does it serve the model we expect? Asked before any model
loads, so a wrong port or name fails in seconds with one line (``/v1/models``, as vLLM and
``serve-teacher`` answer it). A teacher that is still starting (``vllm serve ... &`` launched
just before training) is waited for, up to a patience."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from http.client import HTTPException

from crossopd.teachers import TeacherError, status_line

# Statuses a server that is starting, restarting or overloaded gives (a proxy in front of a
# pod that is not ready answers 502/503/504; a shared gateway 429), so waiting can fix them.
# Any other 5xx (500: a bug in the server) and every other 4xx (401/403: a wrong key, 404: a
# wrong path) come back the same however long one waits. The scoring client retries the same set.
RETRY_STATUSES = frozenset({408, 429, 502, 503, 504})
STATUS_EVERY_S = 15.0  # how often a waiting status line repeats


class TeacherNotReady(TeacherError):
    """Nothing answers at the URL yet, or it answers as a starting or overloaded server does:
    waiting can help. ``reason`` is short, for a status line ("connection refused", "HTTP
    503")."""

    def __init__(self, message: str, reason: str) -> None:
        super().__init__(message)
        self.reason = reason


def _short_reason(e: BaseException) -> str:
    """``connection refused`` rather than ``<urlopen error [Errno 111] Connection refused>``."""
    cause = getattr(e, "reason", e)
    text = getattr(cause, "strerror", None) or str(cause) or type(cause).__name__
    return text[:1].lower() + text[1:]


def served_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict]:
    """The ``data`` list of ``GET {url}/v1/models``; ``TeacherNotReady`` while nothing answers
    or the server answers a status in ``RETRY_STATUSES``, ``TeacherError`` otherwise."""
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(base + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:  # before OSError: HTTPError is one
        hint = " (check teacher.api_key / CROSSOPD_API_KEY)" if e.code in (401, 403) else ""
        message = f"teacher at {base} answers /v1/models with HTTP {e.code}{hint}"
        if e.code in RETRY_STATUSES:
            raise TeacherNotReady(message, f"HTTP {e.code}") from e
        raise TeacherError(message) from e
    except (OSError, HTTPException) as e:  # refused, unreachable, timed out, cut off
        reason = getattr(e, "reason", e)
        raise TeacherNotReady(f"no teacher answers at {base} ({reason}): start it (crossopd "
                              "serve-teacher or vllm serve) or fix teacher.urls",
                              _short_reason(e)) from e
    except ValueError as e:  # a 200 that is not JSON: something else listens there
        raise TeacherError(f"no teacher answers at {base} ({e}): start it (crossopd "
                           "serve-teacher or vllm serve) or fix teacher.urls") from e
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise TeacherError(f"{base}/v1/models did not return a model list: is it a teacher?")
    return data


def check_teacher_server(urls: Sequence[str], served_name: str | None,
                         api_key: str | None = None, patience_s: float = 0.0, *,
                         status: Callable[[str], None] = status_line,
                         poll_s: float = 2.0) -> dict:
    """Every URL answers and serves ``served_name`` (when given). Returns what the first URL
    serves: ``{"url", "models", "max_model_len"}``.

    A URL that is not up yet (``TeacherNotReady``) is probed every ``poll_s`` until
    ``patience_s`` seconds after the call, with a line to ``status`` at once, when the URL or
    the reason changes, and every ``STATUS_EVERY_S``; then ``TeacherError``. The patience is
    one budget for all URLs (replicas load side by side, not one after another). A server
    that answers but serves another model, or refuses the key, fails at once: waiting would
    not change its answer. ``patience_s=0``: one probe per URL, failing at once."""
    start = time.monotonic()
    found = None
    for url in urls:
        models = _wait_until_up(url, api_key, patience_s, start, status, poll_s)
        ids = [str(m.get("id")) for m in models]
        if served_name and served_name not in ids:
            raise TeacherError(f"teacher at {url} serves {', '.join(ids) or 'no model'}, not "
                               f"{served_name!r}: set teacher.served_name to one of those")
        if found is None:
            model = next((m for m in models if not served_name or m.get("id") == served_name),
                         models[0] if models else {})
            found = {"url": url, "models": ids, "max_model_len": model.get("max_model_len")}
    return found or {}


def _wait_until_up(url: str, api_key: str | None, patience_s: float, start: float,
                   status: Callable[[str], None], poll_s: float) -> list[dict]:
    """``served_models(url)`` once it answers, probing until ``start + patience_s``."""
    last: tuple[str, float] | None = None  # (reason, time) of the last status line
    while True:
        remaining = start + patience_s - time.monotonic()
        try:
            # a probe never outlasts the patience by much; a listening socket that is not
            # served yet (vLLM binds its port before the weights load) hangs until the timeout
            return served_models(url, api_key,
                                 timeout=10.0 if not patience_s else max(1.0, min(10.0, remaining)))
        except TeacherNotReady as e:
            now = time.monotonic()
            waited = now - start
            if waited >= patience_s:
                if not patience_s:
                    raise  # fail-fast: the probe's own one-line message
                raise TeacherError(
                    f"no teacher came up at {url} within {waited:.0f} s ({e.reason}): start it "
                    "(crossopd serve-teacher or vllm serve), fix teacher.urls, or raise "
                    f"teacher.patience_s (now {patience_s:g} s) if it loads slowly") from e
            if last is None or last[0] != e.reason or now - last[1] >= STATUS_EVERY_S:
                status(f"waiting for teacher {url} ({e.reason}), {waited:.0f} s of "
                       f"{patience_s:g} s (teacher.patience_s)")
                last = (e.reason, now)
            time.sleep(max(0.0, min(poll_s, start + patience_s - now)))
