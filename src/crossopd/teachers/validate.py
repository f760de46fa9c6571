"""Strict parsing of serve-teacher's request bodies: every malformed body becomes a short
``RequestError`` (HTTP 4xx) whose message never quotes the input.

Error pages that echo the input let a 500 KB body produce a 27 MB answer, and an encoder that
cannot write NaN turns a client's mistake into an HTTP 500; so the body is parsed here, by hand,
with positions and limits in the messages and never the values themselves.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

# vLLM caps prompt_logprobs at its max_logprobs (20 by default); the same range here
MAX_PROMPT_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses: ``status`` is the HTTP code, the message is safe to send."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True)
class ServeLimits:
    """What one request may ask for (CLI flags of ``serve-teacher``)."""

    max_prompts: int = 64  # prompts per request
    max_request_tokens: int = 65536  # tokens per request, all prompts together
    max_body_bytes: int = 8 * 2**20  # request body size

    def __post_init__(self) -> None:
        for name in ("max_prompts", "max_request_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1")


@dataclass(frozen=True)
class ScoreRequest:
    prompts: list[list[int]]
    tokens: int


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    x = float(text)
    if not math.isfinite(x):  # "1e999" parses as inf
        raise ValueError("number out of range")
    return x


def check_content_type(content_type: str | None) -> None:
    """JSON only; a missing header is accepted as JSON (as FastAPI and vLLM do)."""
    if not content_type:
        return
    media = content_type.split(";", 1)[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise RequestError(415, "send the body as JSON (Content-Type: application/json)")


def parse_json(raw: bytes) -> Any:
    """Strict JSON: UTF-8, no NaN/Infinity, finite numbers, bounded nesting."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise RequestError(400, "the body is not UTF-8") from None
    try:
        return json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise RequestError(400, "the body nests too deeply") from None
    except ValueError:  # JSONDecodeError, NaN/Infinity, 1e999, integers of >4300 digits
        raise RequestError(400, "the body is not valid JSON (NaN, Infinity and numbers "
                                "beyond float range are not JSON)") from None


def _is_int(x: Any) -> bool:
    return type(x) is int  # bool is an int subclass; 3.0 and "1" are not token ids


def _token_list(value: Any, where: str, vocab_size: int, room: int, limit: int) -> list[int]:
    """``room``: tokens the request may still add before it passes ``limit``."""
    if not isinstance(value, list):
        raise RequestError(400, f"{where} must be a list of token ids")
    if not value:
        raise RequestError(400, f"{where} is empty")
    if len(value) > room:
        raise RequestError(413, f"request has more than {limit} tokens; this server takes at "
                                f"most {limit} per request")
    for k, t in enumerate(value):
        if not _is_int(t):
            raise RequestError(400, f"{where}[{k}] must be an integer token id")
        if not 0 <= t < vocab_size:
            raise RequestError(400, f"{where}[{k}]: token ids must lie in [0, {vocab_size})")
    return value


def parse_prompts(value: Any, limits: ServeLimits, vocab_size: int,
                  context: int | None) -> ScoreRequest:
    """``prompt``: token ids, or a list of token-id lists (strings are not tokenized here)."""
    if isinstance(value, str) or (isinstance(value, list) and value
                                  and isinstance(value[0], str)):
        raise RequestError(400, "prompt must be token ids: serve-teacher does not tokenize text")
    if not isinstance(value, list) or not value:
        raise RequestError(400, "prompt must be a non-empty list of token ids (or of lists)")
    if isinstance(value[0], list):
        if len(value) > limits.max_prompts:
            raise RequestError(413, f"request has {len(value)} prompts; this server takes at "
                                    f"most {limits.max_prompts} per request")
        prompts, room = [], limits.max_request_tokens
        for i, p in enumerate(value):
            prompts.append(_token_list(p, f"prompt[{i}]", vocab_size, room,
                                       limits.max_request_tokens))
            room -= len(p)
    else:
        prompts = [_token_list(value, "prompt", vocab_size, limits.max_request_tokens,
                               limits.max_request_tokens)]
    for i, p in enumerate(prompts):
        if context and len(p) > context:
            raise RequestError(400, f"prompt {i} has {len(p)} tokens; the context is {context}")
    return ScoreRequest(prompts=prompts, tokens=sum(len(p) for p in prompts))


def parse_request(raw: bytes, content_type: str | None, limits: ServeLimits, vocab_size: int,
                  context: int | None, model_name: str) -> ScoreRequest:
    """The prompts of a ``/v1/completions`` scoring request, or a ``RequestError``."""
    check_content_type(content_type)
    body = parse_json(raw)
    if not isinstance(body, dict):
        raise RequestError(400, "the body must be a JSON object")
    model = body.get("model")
    if model is not None:
        if not isinstance(model, str):
            raise RequestError(400, "model must be a string")
        if model != model_name:  # the name asked for is not repeated: it may be huge
            raise RequestError(404, f"that model is not served here; this server serves "
                                    f"{model_name!r}")
    max_tokens = body.get("max_tokens", 1)
    if not _is_int(max_tokens) or max_tokens not in (0, 1):
        raise RequestError(400, "max_tokens must be the integer 0 or 1: serve-teacher scores "
                                "prompts, it does not generate")
    if "prompt_logprobs" not in body or body["prompt_logprobs"] is None:
        raise RequestError(400, "set prompt_logprobs (0 gives the realised token's logprob)")
    k = body["prompt_logprobs"]
    if not _is_int(k) or not 0 <= k <= MAX_PROMPT_LOGPROBS:
        raise RequestError(400, f"prompt_logprobs must be an integer in [0, "
                                f"{MAX_PROMPT_LOGPROBS}]")
    temperature = body.get("temperature")
    if temperature is not None and (isinstance(temperature, bool)
                                    or not isinstance(temperature, (int, float))
                                    or temperature < 0):
        raise RequestError(400, "temperature must be a finite number >= 0, or null")
    if body.get("stream") not in (None, False):
        raise RequestError(400, "stream is not supported by serve-teacher")
    n = body.get("n", 1)
    if not _is_int(n) or n != 1:
        raise RequestError(400, "n must be 1")
    if "prompt" not in body:
        raise RequestError(400, "prompt is missing")
    return parse_prompts(body["prompt"], limits, vocab_size, context)
