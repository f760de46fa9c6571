"""``crossopd serve-teacher``: the vLLM-compatible completions subset over the in-process teacher.

Speaks what ``HTTPTeacher`` (and vLLM's OpenAI server) speak for scoring: ``POST
/v1/completions`` with ``prompt`` as token ids, ``max_tokens`` (0 or 1) and ``prompt_logprobs``;
the response's ``choices[i].prompt_logprobs`` is ``[null, {str(token_id): {"logprob": x,
"rank": null, "decoded_token": null}}, ...]`` with the realised token at every position. This
server scores; it does not generate (``max_tokens`` > 1 is refused with HTTP 400).

Built to be shared: bodies are parsed strictly (``crossopd.teachers.validate``: short 4xx
answers that never quote the input), requests are limited in size, wait in a bounded queue
(HTTP 429 with ``Retry-After`` when full) and are scored in shared forward passes by one worker
thread (``crossopd.teachers.batching``). Handlers are async and never score, so ``/health``
answers under any load. ``api_key`` makes ``/v1/*`` require ``Authorization: Bearer KEY``.
"""

import asyncio
import contextlib
import hmac
import ipaddress
import logging
import time
import uuid
from typing import Any

from crossopd.teachers.batching import BatchQueue, Job, QueueFull, score_prompts
from crossopd.teachers.serve_stats import ServeStats
from crossopd.teachers.validate import RequestError, ServeLimits, parse_request

log = logging.getLogger("crossopd.serve")

API_KEY_ENV = "CROSSOPD_API_KEY"
# an oversized body is read and thrown away up to this size so the client can read the 413
# (closing on unread data makes the kernel send RST, which can destroy the answer in flight)
DRAIN_LIMIT = 64 * 2**20
DISCONNECT_POLL_S = 0.25

_REASONS = {400: "BadRequestError", 401: "AuthenticationError", 404: "NotFoundError",
            413: "RequestTooLarge", 415: "UnsupportedMediaType", 429: "TooManyRequests",
            500: "InternalServerError", 503: "ServiceUnavailable"}


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Any:
    """A small vLLM-style error body; ``message`` is always the server's own text."""
    from fastapi.responses import JSONResponse

    return JSONResponse({"object": "error", "message": message,
                         "type": _REASONS.get(status, "Error"), "code": status},
                        status_code=status, headers=headers)


def exposure_warning(host: str, api_key: str | None) -> str | None:
    """The warning to print when ``host`` reaches beyond this machine and no key is set."""
    if api_key:
        return None
    if host == "localhost":
        return None
    try:
        if ipaddress.ip_address(host).is_loopback:
            return None
    except ValueError:
        pass  # a host name other than localhost: it may resolve to anything
    return (f"WARNING: serving on {host} without an API key: anyone who can reach this port "
            f"can use the teacher. Set --api-key or {API_KEY_ENV} (clients then send "
            "'Authorization: Bearer KEY'), or bind 127.0.0.1.")


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


def create_app(teacher: Any, model_name: str, *, api_key: str | None = None,
               limits: ServeLimits | None = None, max_queue: int = 256,
               max_batch_tokens: int | None = None, max_batch_requests: int = 64,
               log_every_s: float = 60.0) -> Any:
    """The ASGI app. ``teacher`` needs ``score``, ``vocab_size`` and ``max_length``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    limits = limits or ServeLimits()
    budget = max_batch_tokens or getattr(teacher, "max_batch_tokens", 8192)
    queue = BatchQueue(lambda prompts: score_prompts(teacher, prompts),
                       max_batch_tokens=budget, max_queue=max_queue,
                       max_batch_requests=max_batch_requests)
    stats = ServeStats()

    @contextlib.asynccontextmanager
    async def lifespan(app: Any):
        queue.start()
        reporter = asyncio.create_task(_report(stats, queue, log_every_s))
        try:
            yield
        finally:
            reporter.cancel()
            # uvicorn has finished the in-flight requests by now; the worker ends once empty
            await asyncio.to_thread(queue.stop, 60.0)
            stats.log_summary(queue, final=True)

    app = FastAPI(title="crossopd teacher", version="1", lifespan=lifespan,
                  docs_url=None, redoc_url=None, openapi_url=None)
    app.state.queue = queue
    app.state.stats = stats

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> Any:
        return error_response(exc.status_code, str(exc.detail)[:200])

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> Any:
        return error_response(400, "invalid request")  # no route takes a model; never echo

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> Any:
        log.error("internal error: %s", type(exc).__name__)
        return error_response(500, "internal server error")

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    async def list_models(request: Request) -> Any:
        if not authorized(request.headers.get("authorization"), api_key):
            return error_response(401, "missing or wrong API key (send 'Authorization: "
                                       "Bearer KEY')")
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "max_model_len": teacher.max_length}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        t0 = time.monotonic()
        try:
            ok = authorized(request.headers.get("authorization"), api_key)
            raw = await read_body(request, 0 if not ok else limits.max_body_bytes)
            if not ok:
                raise RequestError(401, "missing or wrong API key (send 'Authorization: "
                                        "Bearer KEY')")
            if raw is None:
                raise RequestError(413, f"the body is over {limits.max_body_bytes} bytes, the "
                                        "limit of this server (--max-body-bytes)")
            req = parse_request(raw, request.headers.get("content-type"), limits,
                                teacher.vocab_size, teacher.max_length, model_name)
        except ClientDisconnect:
            stats.record(499, 0, time.monotonic() - t0)
            return error_response(400, "client disconnected")
        except RequestError as e:
            stats.record(e.status, 0, time.monotonic() - t0)
            return error_response(e.status, e.message)

        loop = asyncio.get_running_loop()
        fut: asyncio.Future = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            loop.call_soon_threadsafe(_settle, fut, result, error)

        job = Job(prompts=req.prompts, tokens=req.tokens, done=done)
        try:
            queue.submit(job)
        except QueueFull as e:
            stats.record(429, 0, time.monotonic() - t0)
            return error_response(429, f"the queue is full ({max_queue} requests waiting); "
                                       f"retry after {e.retry_after} s",
                                  headers={"Retry-After": str(e.retry_after)})
        while not fut.done():
            await asyncio.wait({fut}, timeout=DISCONNECT_POLL_S)
            if not fut.done() and await request.is_disconnected():
                job.cancelled = True  # the worker drops it unless it is already scoring it
                stats.record(499, req.tokens, time.monotonic() - t0)
                return error_response(400, "client disconnected")
        if fut.exception() is not None:
            stats.record(500, req.tokens, time.monotonic() - t0)
            log.error("scoring failed: %s", fut.exception())
            return error_response(500, f"scoring failed: {str(fut.exception())[:200]}")
        body = completion_body(req.prompts, fut.result(), model_name)
        elapsed = time.monotonic() - t0
        stats.record(200, req.tokens, elapsed)
        log.debug("scored %d prompts, %d tokens in %.3f s", len(req.prompts), req.tokens,
                  elapsed)
        return body

    return app


def _settle(fut: asyncio.Future, result: Any, error: BaseException | None) -> None:
    if fut.done():
        return
    if error is not None:
        fut.set_exception(error)
    else:
        fut.set_result(result)


async def _report(stats: ServeStats, queue: BatchQueue, every_s: float) -> None:
    while every_s > 0:
        await asyncio.sleep(every_s)
        stats.log_summary(queue)


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          max_batch_tokens: int = 8192, name: str | None = None, api_key: str | None = None,
          limits: ServeLimits | None = None, max_queue: int = 256, max_batch_requests: int = 64,
          log_every_s: float = 60.0, log_level: str = "info") -> None:
    """Load ``model`` and serve it until SIGTERM/SIGINT (in-flight requests are finished)."""
    import uvicorn

    from crossopd.teachers.hf import HFTeacher

    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    log.addHandler(handler)
    log.setLevel(log_level.upper())
    log.propagate = False
    warning = exposure_warning(host, api_key)
    if warning:
        log.warning(warning)
    teacher = HFTeacher.from_pretrained(model, device=device, max_batch_tokens=max_batch_tokens)
    app = create_app(teacher, name or model, api_key=api_key, limits=limits, max_queue=max_queue,
                     max_batch_tokens=max_batch_tokens, max_batch_requests=max_batch_requests,
                     log_every_s=log_every_s)
    print(f"crossopd teacher {name or model} on http://{host}:{port}/v1 "
          f"(context {teacher.max_length}{', API key required' if api_key else ''})", flush=True)
    # access logs off: one line per request drowns a busy server; ServeStats summarises instead
    uvicorn.run(app, host=host, port=port, log_level="warning", access_log=False)
