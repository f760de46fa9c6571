"""The routes of ``crossopd serve-teacher``, one method each, over one teacher and its queue:
``/health``, ``/v1/models`` and ``/v1/completions`` (the scoring subset of vLLM's API). The app
around them (lifespan, error handlers) is ``crossopd.teachers.server``."""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
import uuid
from typing import Any

from starlette.requests import ClientDisconnect, Request

from crossopd.teachers.batching import BatchQueue, Job, QueueFull
from crossopd.teachers.serve_stats import ServeStats
from crossopd.teachers.validate import RequestError, ServeLimits, parse_request

log = logging.getLogger("crossopd.serve")

# an oversized body is read and thrown away up to this size so the client can read the 413
# (closing on unread data makes the kernel send RST, which can destroy the answer in flight)
DRAIN_LIMIT = 64 * 2**20
DISCONNECT_POLL_S = 0.25

_REASONS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            413: "RequestTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests",
            500: "InternalServerError", 503: "ServiceUnavailable"}
UNAUTHORIZED = "missing or wrong API key (send 'Authorization: Bearer KEY')"


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """A small vLLM-style error body; ``message`` is always the server's own text."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"object": "error", "message": message,
                         "type": _REASONS.get(status, "Error"), "code": status},
                        status_code=status, headers=headers)


def authorized(header: str | None, api_key: str | None) -> bool:
    if not api_key:
        return True
    # constant-time: the comparison must not reveal how much of a guess was right
    return header is not None and hmac.compare_digest(header.encode("utf-8", "replace"),
                                                      f"Bearer {api_key}".encode())


async def read_body(request: Any, limit: int) -> bytes | None:
    """The body, or None when it is over ``limit`` (read and discarded up to DRAIN_LIMIT)."""
    declared = request.headers.get("content-length")
    too_big = declared is not None and declared.isdigit() and int(declared) > limit
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            too_big = True
            chunks.clear()
        if too_big:
            if size > DRAIN_LIMIT:
                break
            continue
        chunks.append(chunk)
    return None if too_big else b"".join(chunks)


def completion_body(prompts: list[list[int]], logps: list[Any], model_name: str) -> dict:
    choices = []
    for idx, (p, lp) in enumerate(zip(prompts, logps)):
        entries: list[Any] = [None] + [
            {str(t): {"logprob": x, "rank": None, "decoded_token": None}}
            for t, x in zip(p[1:], lp.tolist())
        ]
        choices.append({"index": idx, "text": "", "logprobs": None, "finish_reason": "length",
                        "prompt_logprobs": entries})
    n = sum(len(p) for p in prompts)
    return {
        "id": f"cmpl-{uuid.uuid4().hex}",
        "object": "text_completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": choices,
        "usage": {"prompt_tokens": n, "completion_tokens": 0, "total_tokens": n},
    }


class Routes:
    """The handlers. ``teacher`` needs ``score``, ``vocab_size`` and ``max_length``; requests
    are scored by ``queue``'s worker, never in a handler, so ``/health`` answers under any
    load."""

    def __init__(self, teacher: Any, model_name: str, queue: BatchQueue, stats: ServeStats, *,
                 api_key: str | None = None, limits: ServeLimits | None = None) -> None:
        self.teacher, self.model_name, self.queue, self.stats = teacher, model_name, queue, stats
        self.api_key, self.limits = api_key, limits or ServeLimits()

    async def health(self) -> dict:
        return {"status": "ok"}

    async def models(self, request: Request) -> Any:
        if not authorized(request.headers.get("authorization"), self.api_key):
            return error_response(401, UNAUTHORIZED)
        return {"object": "list", "data": [{"id": self.model_name, "object": "model",
                                            "max_model_len": self.teacher.max_length}]}

    async def completions(self, request: Request) -> Any:
        t0 = time.monotonic()
        try:
            ok = authorized(request.headers.get("authorization"), self.api_key)
            raw = await read_body(request, 0 if not ok else self.limits.max_body_bytes)
            if not ok:
                raise RequestError(401, UNAUTHORIZED)
            if raw is None:
                raise RequestError(413, f"the body is over {self.limits.max_body_bytes} bytes, "
                                        "the limit of this server (--max-body-bytes)")
            req = parse_request(raw, request.headers.get("content-type"), self.limits,
                                self.teacher.vocab_size, self.teacher.max_length, self.model_name)
        except ClientDisconnect:
            self.stats.record(499, 0, time.monotonic() - t0)
            return error_response(400, "client disconnected")
        except RequestError as e:
            self.stats.record(e.status, 0, time.monotonic() - t0)
            return error_response(e.status, e.message)

        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, fut, result, error)

        job = Job(prompts=req.prompts, tokens=req.tokens, done=done)
        try:
            self.queue.submit(job)
        except QueueFull as e:
            self.stats.record(429, 0, time.monotonic() - t0)
            return error_response(429, f"the queue is full ({self.queue.max_queue} requests "
                                       f"waiting); retry after {e.retry_after} s",
                                  headers={"Retry-After": str(e.retry_after)})
        while not fut.done():
            await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if not fut.done() and await request.is_disconnected():
                job.cancelled = True  # the worker drops it unless it is already scoring it
                self.stats.record(499, req.tokens, time.monotonic() - t0)
                return error_response(400, "client disconnected")
        if fut.exception() is not None:
            self.stats.record(500, req.tokens, time.monotonic() - t0)
            log.error("scoring failed: %s", fut.exception())
            return error_response(500, f"scoring failed: {str(fut.exception())[:200]}")
        body = completion_body(req.prompts, fut.result(), self.model_name)
        elapsed = time.monotonic() - t0
        self.stats.record(200, req.tokens, elapsed)
        log.debug("scored %d prompts, %d tokens in %.3f s", len(req.prompts), req.tokens,
                  elapsed)
        return body


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)
