"""``crossopd serve-teacher``: the vLLM-compatible completions subset over the in-process teacher.

Speaks what ``HTTPTeacher`` (and vLLM's OpenAI server) speak for scoring: ``POST
/v1/completions`` with ``prompt`` as token ids, ``max_tokens`` (0 or 1) and ``prompt_logprobs``;
the response's ``choices[i].prompt_logprobs`` is ``[null, {str(token_id): {"logprob": x,
"rank": null, "decoded_token": null}}, ...]`` with the realised token at every position. This
server scores; it does not generate (``max_tokens`` > 1 is refused with HTTP 400).
"""


import threading
import time
import uuid
from typing import Any

from crossopd.teachers.hf import HFTeacher


def create_app(teacher: HFTeacher, model_name: str) -> Any:
    from fastapi import FastAPI, HTTPException
    from pydantic import BaseModel

    class CompletionRequest(BaseModel):
        model: str | None = None
        prompt: list[int] | list[list[int]]
        max_tokens: int = 1
        prompt_logprobs: int | None = None
        temperature: float | None = None

    app = FastAPI(title="crossopd teacher", version="1")
    lock = threading.Lock()  # one forward pass at a time; requests queue here

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/v1/models")
    def list_models() -> dict:
        return {"object": "list", "data": [{"id": model_name, "object": "model",
                                            "max_model_len": teacher.max_length}]}

    @app.post("/v1/completions")
    def completions(req: CompletionRequest) -> dict:
        if req.model is not None and req.model != model_name:
            raise HTTPException(404, f"model {req.model!r} is not served here; use {model_name!r}")
        if req.max_tokens > 1:
            raise HTTPException(400, "serve-teacher scores prompts only: use max_tokens 0 or 1")
        if req.prompt_logprobs is None:
            raise HTTPException(400, "set prompt_logprobs (0 gives the realised token's logprob)")
        prompts = req.prompt if req.prompt and isinstance(req.prompt[0], list) else [req.prompt]
        for p in prompts:
            if not p:
                raise HTTPException(400, "empty prompt")
            if teacher.max_length and len(p) > teacher.max_length:
                raise HTTPException(
                    400, f"prompt of {len(p)} tokens exceeds the context of {teacher.max_length}"
                )
            if min(p) < 0 or max(p) >= teacher.vocab_size:
                raise HTTPException(400, f"token ids must lie in [0, {teacher.vocab_size})")
        scored = [p for p in prompts if len(p) > 1]
        with lock:
            logps = teacher.score(scored, [(1, len(p)) for p in scored]) if scored else []
        it = iter(logps)
        choices = []
        for idx, p in enumerate(prompts):
            lp = next(it) if len(p) > 1 else []
            entries: list[Any] = [None] + [
                {str(t): {"logprob": float(x), "rank": None, "decoded_token": None}}
                for t, x in zip(p[1:], lp)
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

    return app


def serve(model: str, host: str = "127.0.0.1", port: int = 8000, device: str | None = None,
          max_batch_tokens: int = 8192, name: str | None = None) -> None:
    import uvicorn

    teacher = HFTeacher.from_pretrained(model, device=device, max_batch_tokens=max_batch_tokens)
    app = create_app(teacher, name or model)
    print(f"crossopd teacher {name or model} on http://{host}:{port}/v1 "
          f"(context {teacher.max_length})", flush=True)
    uvicorn.run(app, host=host, port=port, log_level="warning")
