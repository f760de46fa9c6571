"""Is a teacher server there, and does it serve the model we expect? Asked before any model
loads, so a wrong port or name fails in seconds with one line (``/v1/models``, as vLLM and
``serve-teacher`` answer it)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Sequence
from http.client import HTTPException

from crossopd.teachers import TeacherError


def served_models(url: str, api_key: str | None = None, timeout: float = 10.0) -> list[dict]:
    """The ``data`` list of ``GET {url}/v1/models``; ``TeacherError`` when nothing answers."""
    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    req = urllib.request.Request(base + "/v1/models", headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
    except urllib.error.HTTPError as e:
        hint = " (check teacher.api_key / CROSSOPD_API_KEY)" if e.code in (401, 403) else ""
        raise TeacherError(f"teacher at {base} answers /v1/models with HTTP {e.code}{hint}") \
            from e
    except (OSError, HTTPException, ValueError) as e:
        reason = getattr(e, "reason", e)
        raise TeacherError(f"no teacher answers at {base} ({reason}): start it (crossopd "
                           "serve-teacher or vllm serve) or fix teacher.urls") from e
    data = doc.get("data") if isinstance(doc, dict) else None
    if not isinstance(data, list):
        raise TeacherError(f"{base}/v1/models did not return a model list: is it a teacher?")
    return data


def check_teacher_server(urls: Sequence[str], served_name: str | None,
                         api_key: str | None = None) -> dict:
    """Every URL answers and serves ``served_name`` (when given). Returns what the first URL
    serves: ``{"url", "models", "max_model_len"}``."""
    found = None
    for url in urls:
        models = served_models(url, api_key)
        ids = [str(m.get("id")) for m in models]
        if served_name and served_name not in ids:
            raise TeacherError(f"teacher at {url} serves {', '.join(ids) or 'no model'}, not "
                               f"{served_name!r}: set teacher.served_name to one of those")
        if found is None:
            model = next((m for m in models if not served_name or m.get("id") == served_name),
                         models[0] if models else {})
            found = {"url": url, "models": ids, "max_model_len": model.get("max_model_len")}
    return found or {}
