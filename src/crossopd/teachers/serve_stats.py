"""serve-teacher's request log: one summary line per interval instead of one line per request
(a busy server would spend its time, and its disk, logging)."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

log = logging.getLogger("crossopd.serve")


class ServeStats:
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.since = time.monotonic()
        self.latencies: list[float] = []  # scored requests of this interval
        self.tokens = 0
        self.codes: dict[int, int] = {}
        self.total_requests = 0

    def record(self, status: int, tokens: int, latency_s: float) -> None:
        with self.lock:
            self.codes[status] = self.codes.get(status, 0) + 1
            self.total_requests += 1
            if status == 200:
                self.tokens += tokens
                self.latencies.append(latency_s)

    def summary(self, queue: Any = None, reset: bool = True) -> str | None:
        """The line for the interval so far, or None when nothing came in."""
        with self.lock:
            if not self.codes:
                if reset:  # an idle interval must not dilute the next line's rates
                    self.since = time.monotonic()
                return None
            span = max(time.monotonic() - self.since, 1e-9)
            lat = np.asarray(self.latencies)
            ok = self.codes.get(200, 0)
            parts = [f"{ok} scored ({self.tokens} tokens, {self.tokens / span:.0f} tok/s) in "
                     f"{span:.0f} s"]
            if lat.size:
                parts.append(f"latency p50 {np.percentile(lat, 50):.2f} s, p99 "
                             f"{np.percentile(lat, 99):.2f} s")
            others = {k: v for k, v in sorted(self.codes.items()) if k != 200}
            if others:
                parts.append("other answers " + ", ".join(f"{k}: {v}" for k, v in others.items()))
            if queue is not None:
                parts.append(f"queue {queue.waiting()}, dropped {queue.dropped}")
            if reset:
                self.since, self.latencies, self.tokens, self.codes = time.monotonic(), [], 0, {}
            return "; ".join(parts)

    def log_summary(self, queue: Any = None, final: bool = False) -> None:
        line = self.summary(queue)
        if line:
            log.info("%s%s", "final: " if final else "", line)
