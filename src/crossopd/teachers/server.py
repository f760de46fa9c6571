"""``crossopd serve-teacher``: the vLLM-compatible completions subset over the in-process teacher.

Speaks what ``HTTPTeacher`` (and vLLM's OpenAI server) speak for scoring: ``POST
/v1/completions`` with ``prompt`` as token ids, ``max_tokens`` (0 or 1) and ``prompt_logprobs``;
the response's ``choices[i].prompt_logprobs`` is ``[null, {str(token_id): {"logprob": x,
"rank": null, "decoded_token": null}}, ...]`` with the realised token at every position. This
server scores; it does not generate (``max_tokens`` > 1 is refused with HTTP 400).

Built to be shared: bodies are parsed strictly (``crossopd.teachers.validate``: short 4xx
answers that never quote the input), requests are limited in size, wait in a bounded queue
(HTTP 429 with ``Retry-After`` when full) and are scored in shared forward passes by one worker
thread (``crossopd.teachers.batching``). The routes (``crossopd.teachers.routes``) are async and
never score, so ``/health`` answers under any load. ``api_key`` makes ``/v1/*`` require
``Authorization: Bearer KEY``.
"""

import asyncio
import contextlib
import ipaddress
import logging
from typing import Any

from crossopd.teachers.batching import BatchQueue, score_prompts
from crossopd.teachers.serve_stats import ServeStats
from crossopd.teachers.validate import ServeLimits

log = logging.getLogger("crossopd.serve")

API_KEY_ENV = "CROSSOPD_API_KEY"
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


def create_app(teacher: Any, model_name: str, *, api_key: str | None = None,
               limits: ServeLimits | None = None, max_queue: int = 256,
               max_batch_tokens: int | None = None, max_batch_requests: int = 64,
               log_every_s: float = 60.0) -> Any:
    """The ASGI app. ``teacher`` needs ``score``, ``vocab_size`` and ``max_length``."""
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from crossopd.teachers.routes import Routes, error_response

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

    routes = Routes(teacher, model_name, queue, stats, api_key=api_key, limits=limits)
    app.get("/health")(routes.health)
    app.get("/v1/models")(routes.models)
    app.post("/v1/completions")(routes.completions)
    return app


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
