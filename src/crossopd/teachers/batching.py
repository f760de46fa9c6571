"""serve-teacher's scoring queue: one worker thread, requests grouped into forward passes.

Requests wait in a bounded queue; the worker takes as many waiting requests as fit the token
budget and scores them in one ``teacher.score`` call, so concurrent clients share forward passes
instead of taking turns behind a lock. The event loop never scores, which keeps ``/health``
answering however long the queue is. A request whose client has gone is dropped when the worker
reaches it, before any forward pass is spent on it.
"""

from __future__ import annotations

import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

# done(result, error): exactly one of them is None; called on the worker thread
Done = Callable[[list[np.ndarray] | None, BaseException | None], None]
Scorer = Callable[[Sequence[Sequence[int]]], list[np.ndarray]]


class QueueFull(Exception):
    """The queue holds ``max_queue`` waiting requests; ``retry_after`` is a whole-second hint."""

    def __init__(self, retry_after: int) -> None:
        super().__init__(f"queue full; retry after {retry_after} s")
        self.retry_after = retry_after


@dataclass
class Job:
    prompts: list[list[int]]
    tokens: int
    done: Done
    cancelled: bool = False  # set from the event loop when the client disconnects
    enqueued: float = field(default_factory=time.monotonic)


def score_prompts(teacher: object, prompts: Sequence[Sequence[int]]) -> list[np.ndarray]:
    """Log-probs of every position 1..n-1 of each prompt (a 1-token prompt has none)."""
    scored = [i for i, p in enumerate(prompts) if len(p) > 1]
    out = [np.empty(0, dtype=np.float64) for _ in prompts]
    if scored:
        logps = teacher.score([prompts[i] for i in scored],  # type: ignore[attr-defined]
                              [(1, len(prompts[i])) for i in scored])
        for i, lp in zip(scored, logps):
            out[i] = lp
    return out


class BatchQueue:
    def __init__(self, score: Scorer, max_batch_tokens: int = 8192, max_queue: int = 256,
                 max_batch_requests: int = 64) -> None:
        if min(max_queue, max_batch_tokens, max_batch_requests) < 1:
            raise ValueError("max_queue, max_batch_tokens and max_batch_requests must be >= 1")
        self.score = score
        self.max_batch_tokens = max_batch_tokens
        # 1: every request is scored alone, so its log-probs never depend on what else was
        # queued (a padded batch runs other kernels: results differ by float rounding)
        self.max_batch_requests = max_batch_requests
        self.max_queue = max_queue
        self.pending: deque[Job] = deque()
        self.cond = threading.Condition()
        self.closing = False
        self.busy = False
        self.dropped = 0  # jobs whose client left before they were scored
        self.batches = 0
        self.tokens_per_s = 0.0  # moving average, for the Retry-After hint
        self.thread = threading.Thread(target=self._run, name="crossopd-scorer", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.cond:
            if self.closing:
                raise QueueFull(retry_after=5)
            self._purge()
            if len(self.pending) >= self.max_queue:
                raise QueueFull(self._retry_after())
            self.pending.append(job)
            self.cond.notify()

    def waiting(self) -> int:
        with self.cond:
            return sum(not j.cancelled for j in self.pending)

    def stop(self, timeout: float | None = None) -> None:
        """Score what is queued (in-flight requests still get their answers), then end."""
        with self.cond:
            self.closing = True
            self.cond.notify_all()
        if self.thread.is_alive():
            self.thread.join(timeout)

    def _purge(self) -> None:
        # a cancelled job may sit anywhere in the queue; it must not hold a slot
        if any(j.cancelled for j in self.pending):
            kept = [j for j in self.pending if not j.cancelled]
            self.dropped += len(self.pending) - len(kept)
            self.pending = deque(kept)

    def _retry_after(self) -> int:
        queued = sum(j.tokens for j in self.pending)
        if self.tokens_per_s <= 0:
            return 1
        return int(min(30, max(1, math.ceil(queued / self.tokens_per_s))))

    def _take(self) -> list[Job]:
        batch: list[Job] = []
        tokens = 0
        while self.pending:
            job = self.pending[0]
            if job.cancelled:
                self.pending.popleft()
                self.dropped += 1
                continue
            if batch and (tokens + job.tokens > self.max_batch_tokens
                          or len(batch) >= self.max_batch_requests):
                break
            batch.append(self.pending.popleft())
            tokens += job.tokens
        return batch

    def _run(self) -> None:
        while True:
            with self.cond:
                while not self.pending and not self.closing:
                    self.cond.wait()
                batch = self._take()
                if not batch:
                    if self.closing and not self.pending:
                        return
                    continue
                self.busy = True
            t0 = time.monotonic()
            self._score(batch)
            elapsed = max(time.monotonic() - t0, 1e-6)
            with self.cond:
                self.busy = False
                self.batches += 1
                rate = sum(j.tokens for j in batch) / elapsed
                self.tokens_per_s = rate if self.tokens_per_s <= 0 else \
                    0.8 * self.tokens_per_s + 0.2 * rate

    def _score(self, batch: list[Job]) -> None:
        prompts = [p for job in batch for p in job.prompts]
        try:
            results = self.score(prompts)
        except Exception as e:  # the worker must outlive any one batch
            if len(batch) == 1:
                _notify(batch[0], None, e)
                return
            for job in batch:  # one bad request must not fail the others batched with it
                self._score([job])
            return
        k = 0
        for job in batch:
            _notify(job, results[k : k + len(job.prompts)], None)
            k += len(job.prompts)


def _notify(job: Job, result: list[np.ndarray] | None, error: BaseException | None) -> None:
    try:
        job.done(result, error)
    except Exception:  # a broken callback (event loop gone at shutdown) must not stop the worker
        pass
