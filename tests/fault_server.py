"""A real HTTP server on 127.0.0.1 that misbehaves on purpose, for the HTTP teacher's fault tests.

Usage: python fault_server.py MODE PORT, MODE one of: http500, malformed, slow, short, ok,
retry_after (HTTP 429 with Retry-After: 1 to the first request, then ok), http400, http503
(always 503, Retry-After: 0), ok_first:N (ok to the first N requests, then always 503), echo_auth
(HTTP 400 quoting the Authorization header). 'ok' answers a well-formed prompt_logprobs response
with logprob -1.0 for every token. GET /v1/models lists one model; GET /count answers how
many POSTs arrived.
"""

from __future__ import annotations

import json
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1]
POSTS = 0
COUNT_LOCK = threading.Lock()


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_GET(self):
        if self.path.startswith("/v1/models"):  # what a startup probe asks
            return self._send(200, json.dumps({"data": [{"id": "fault"}]}).encode())
        self._send(200, json.dumps({"posts": POSTS}).encode())

    def do_POST(self):
        global POSTS
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with COUNT_LOCK:
            POSTS += 1
            first, count = POSTS == 1, POSTS
        ids = body["prompt"]
        if MODE == "http500":
            return self._send(500, b'{"error": "boom"}')
        if MODE == "http400":
            return self._send(400, b'{"error": "bad request"}')
        if MODE == "echo_auth":  # a careless server that quotes request headers in errors
            return self._send(400, json.dumps({"error": self.headers["Authorization"]}).encode())
        if MODE == "http503" or (MODE.startswith("ok_first:") and count > int(MODE[9:])):
            return self._send(503, b'{"error": "busy"}', {"Retry-After": "0"})
        if MODE == "retry_after" and first:
            return self._send(429, b'{"error": "queue full"}', {"Retry-After": "1"})
        if MODE == "malformed":
            return self._send(200, b'{"choices": [{"prompt_logprobs": [null, {"1": ')
        if MODE == "slow":
            time.sleep(30)
        entries = [None] + [{str(t): {"logprob": -1.0}} for t in ids[1:]]
        if MODE == "short":
            entries = entries[:-1]
        self._send(200, json.dumps({"choices": [{"prompt_logprobs": entries}]}).encode())

    def _send(self, code: int, payload: bytes, headers: dict | None = None) -> None:
        self.send_response(code)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    print("ready", flush=True)
    server.serve_forever()
