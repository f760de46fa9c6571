"""``crossopd serve-teacher``: a teacher over HTTP, speaking the vLLM-compatible completions
subset that crossopd's HTTP teacher (and ``vllm serve``) speak."""

from __future__ import annotations

import argparse
import os
from typing import Any


def cmd_serve_teacher(args: argparse.Namespace) -> int:
    from crossopd.teachers.server import API_KEY_ENV, serve
    from crossopd.teachers.validate import ServeLimits

    # the environment is the safer place for the key: a flag shows in `ps`
    api_key = args.api_key or os.environ.get(API_KEY_ENV) or None
    limits = ServeLimits(max_prompts=args.max_prompts, max_request_tokens=args.max_request_tokens,
                         max_body_bytes=args.max_body_bytes)
    serve(args.model, host=args.host, port=args.port, device=args.device,
          max_batch_tokens=args.max_batch_tokens, name=args.name, api_key=api_key,
          limits=limits, max_queue=args.max_queue, max_batch_requests=args.max_batch_requests,
          log_every_s=args.log_every, log_level=args.log_level)
    return 0


def add_serve_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``serve`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    st = sub.add_parser("serve-teacher", help="serve a teacher over HTTP (vLLM-compatible subset)",
                        description="Serve POST /v1/completions with prompt_logprobs for token-id "
                        "prompts, scoring with an in-process Hugging Face model. Point "
                        "HTTPTeacher (or the training config) at http://HOST:PORT.")
    st.add_argument("--model", required=True, help="HF model dir, hub id, .gguf file or bundled "
                    "name (smollm2, gemma3-270m)")
    st.add_argument("--port", type=int, default=8000)
    st.add_argument("--host", default="127.0.0.1")
    st.add_argument("--device", default=None, help="cpu, cuda, ... (default: cuda if available)")
    st.add_argument("--max-batch-tokens", type=int, default=8192,
                    help="token budget of one forward pass; waiting requests are grouped up to "
                    "it (default 8192)")
    st.add_argument("--served-model-name", "--name", dest="name", default=None,
                    help="served model name, as vLLM's flag (default: --model)")
    st.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on "
                    "/v1/* (default: $CROSSOPD_API_KEY; /health stays open)")
    st.add_argument("--max-prompts", type=int, default=64,
                    help="prompts per request (default 64; more: HTTP 413)")
    st.add_argument("--max-request-tokens", type=int, default=65536,
                    help="tokens per request, all prompts together (default 65536; more: 413)")
    st.add_argument("--max-body-bytes", type=int, default=8 * 2**20,
                    help="request body size (default 8 MiB; more: HTTP 413)")
    st.add_argument("--max-queue", type=int, default=256,
                    help="requests waiting to be scored (default 256; more: HTTP 429 with "
                    "Retry-After)")
    st.add_argument("--max-batch-requests", type=int, default=64,
                    help="requests grouped into one forward pass (default 64; 1: each request "
                    "scored alone, so its scores never depend on what else was queued)")
    st.add_argument("--log-every", type=float, default=60.0, metavar="SECONDS",
                    help="one summary line (requests, tokens, latency, errors) per interval "
                    "(default 60; 0: none)")
    st.add_argument("--log-level", default="info", choices=["debug", "info", "warning"],
                    help="debug: one line per request")
    st.set_defaults(func=cmd_serve_teacher)
    return st
