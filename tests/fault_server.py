"""A real HTTP server on 127.0.0.1 that misbehaves on purpose, for the HTTP teacher's fault tests.

Usage: python fault_server.py MODE PORT, MODE one of: http500, malformed, slow, short, ok.
'ok' answers a well-formed prompt_logprobs response with logprob -1.0 for every token.
"""

from __future__ import annotations

import json
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

MODE = sys.argv[1]


class Handler(BaseHTTPRequestHandler):
    def log_message(self, *args):  # keep test output quiet
        pass

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        ids = body["prompt"]
        if MODE == "http500":
            return self._send(500, b'{"error": "boom"}')
        if MODE == "malformed":
            return self._send(200, b'{"choices": [{"prompt_logprobs": [null, {"1": ')
        if MODE == "slow":
            time.sleep(30)
        entries = [None] + [{str(t): {"logprob": -1.0}} for t in ids[1:]]
        if MODE == "short":
            entries = entries[:-1]
        self._send(200, json.dumps({"choices": [{"prompt_logprobs": entries}]}).encode())

    def _send(self, code: int, payload: bytes) -> None:
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)


if __name__ == "__main__":
    server = ThreadingHTTPServer(("127.0.0.1", int(sys.argv[2])), Handler)
    print("ready", flush=True)
    server.serve_forever()
