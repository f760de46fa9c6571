"""serve-teacher under hostile input and load: real server processes on 127.0.0.1 over a tiny
random model (loads in seconds), plus the request parser and the batching queue in process."""

from __future__ import annotations

import http.client
import json
import math
import signal
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.teachers.batching import BatchQueue, Job, QueueFull, score_prompts
from crossopd.teachers.hf import HFTeacher
from crossopd.teachers.server import exposure_warning
from crossopd.teachers.validate import RequestError, ServeLimits, parse_request

from conftest import free_port

KEY = "sk-test-5f0c1d9e7a"
VOCAB = 49152  # the tiny models use SmolLM2's tokenizer
MAX_PROMPTS, MAX_TOKENS, MAX_BODY = 8, 4096, 2**20
SMALL = 2048  # an error page must stay small whatever came in



def _start(model: str, log: Path, *extra: str, env: dict | None = None):
    port = free_port()
    out = log.open("w")
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", model, "--port",
         str(port), "--device", "cpu", *extra],
        stdout=out, stderr=subprocess.STDOUT, env=env,
    )
    end = time.time() + 120
    while time.time() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited: {log.read_text()}")
        try:
            if _request(port, "GET", "/health", timeout=1)[0] == 200:
                return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise RuntimeError("server not ready")


def _request(port: int, method: str, path: str, body: bytes | None = None,
             headers: dict | None = None, timeout: float = 60) -> tuple[int, bytes, dict]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, resp.read(), dict(resp.getheaders())
    finally:
        conn.close()


def _post(port: int, body, key: str | None = KEY, content_type: str | None = "application/json",
          timeout: float = 60) -> tuple[int, bytes, dict]:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {}
    if content_type:
        headers["Content-Type"] = content_type
    if key:
        headers["Authorization"] = f"Bearer {key}"
    return _request(port, "POST", "/v1/completions", raw, headers, timeout)


@pytest.fixture(scope="module")
def server(tiny, tmp_path_factory):
    """One shared server: API key, queue of 1, small limits, a summary line every second."""
    log = tmp_path_factory.mktemp("serve") / "server.log"
    proc, port = _start(tiny["student"], log, "--api-key", KEY, "--max-queue", "1",
                        "--max-prompts", str(MAX_PROMPTS), "--max-request-tokens",
                        str(MAX_TOKENS), "--max-body-bytes", str(MAX_BODY), "--log-every", "1",
                        "--served-model-name", "tiny")
    try:
        yield {"port": port, "log": log, "proc": proc}
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _healthy(port: int) -> None:
    status, body, _ = _request(port, "GET", "/health", timeout=5)
    assert status == 200 and json.loads(body) == {"status": "ok"}


def _valid(n: int = 5) -> dict:
    return {"model": "tiny", "prompt": list(range(1, n + 1)), "max_tokens": 1,
            "prompt_logprobs": 0, "temperature": 0.0}


# ----------------------------------------------------------------------------- auth
def test_api_key_required_and_never_logged(server):
    port = server["port"]
    for key in (None, "wrong", KEY + "x"):
        status, body, _ = _post(port, _valid(), key=key)
        assert status == 401 and len(body) < SMALL
        assert KEY.encode() not in body
    assert _request(port, "GET", "/v1/models")[0] == 401
    status, body, _ = _request(port, "GET", "/v1/models",
                               headers={"Authorization": f"Bearer {KEY}"})
    assert status == 200 and json.loads(body)["data"][0]["id"] == "tiny"
    _healthy(port)  # /health stays open
    status, body, _ = _post(port, _valid())
    assert status == 200
    entries = json.loads(body)["choices"][0]["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 5
    time.sleep(1.5)  # a summary line is written
    text = server["log"].read_text()
    assert "scored" in text and KEY not in text


# ------------------------------------------------------------------- hostile input
def test_each_hostile_class_gets_a_small_4xx(server):
    port = server["port"]
    big_model = b'{"model": "' + b"m" * (5 * 2**20) + b'", "prompt": [1, 2], ' \
        b'"prompt_logprobs": 0}'
    cases = [
        (b'{"prompt": [1, 2, NaN], "prompt_logprobs": 0}', 400),
        (b'{"prompt": [1, 2], "prompt_logprobs": 0, "temperature": Infinity}', 400),
        (b'{"prompt": [1, 2], "prompt_logprobs": 0, "temperature": 1e999}', 400),
        (b'\xff\xfe{"prompt": [1]}', 400),
        (b"[" * 100_000, 400),
        (json.dumps({"prompt": ["x"] * 100_000, "prompt_logprobs": 0}).encode(), 400),
        (big_model, 413),
    ]
    for ids in ([1, 3.0], [1, True], [1, "1"], [1, -1], [1, VOCAB], [1, 10**30], [[1, [2]]],
                [], [[]], [[1, 2], []], "hello", [[1, 2], 3]):
        cases.append((json.dumps({"prompt": ids, "prompt_logprobs": 0}).encode(), 400))
    for k in (-1, 21, 10**18, "0", 0.0, True, None):
        cases.append((json.dumps({"prompt": [1, 2], "prompt_logprobs": k}).encode(), 400))
    for m in (-5, 2, "1", 1.0, True):
        cases.append((json.dumps({**_valid(), "max_tokens": m}).encode(), 400))
    for t in ("0", -1, True, [0]):
        cases.append((json.dumps({**_valid(), "temperature": t}).encode(), 400))
    for body in (b"[1, 2]", b"3", b'"prompt"', b"", b"{"):
        cases.append((body, 400))
    cases.append((json.dumps({**_valid(), "model": "x" * 10_000}).encode(), 404))
    cases.append((json.dumps({"prompt": [[1, 2]] * (MAX_PROMPTS + 1),
                              "prompt_logprobs": 0}).encode(), 413))
    cases.append((json.dumps({"prompt": [[1] * 600] * MAX_PROMPTS,
                              "prompt_logprobs": 0}).encode(), 413))
    for raw, expected in cases:
        status, body, _ = _post(port, raw)
        assert (status, raw[:60]) == (expected, raw[:60])
        assert len(body) < SMALL, (status, body[:200])
        assert json.loads(body)["code"] == status
    for ctype in ("text/plain", "application/octet-stream", "application/x-www-form-urlencoded"):
        status, body, _ = _post(port, b'\xff\xfe\x00junk', content_type=ctype)
        assert status == 415 and len(body) < SMALL
    status, body, _ = _post(port, {"prompt": [[1, 2]] * (MAX_PROMPTS + 1), "prompt_logprobs": 0})
    assert f"at most {MAX_PROMPTS}" in json.loads(body)["message"]
    status, body, _ = _post(port, {"prompt": [1] * (MAX_TOKENS + 1), "prompt_logprobs": 0})
    assert status == 413 and str(MAX_TOKENS) in json.loads(body)["message"]
    _healthy(port)


def test_a_50_mb_body_gets_a_short_413(server):
    raw = b'{"model": "' + b"x" * (50 * 2**20) + b'"}'
    t0 = time.time()
    status, body, _ = _post(server["port"], raw)
    assert status == 413 and len(body) < SMALL and str(MAX_BODY) in body.decode()
    assert time.time() - t0 < 30
    _healthy(server["port"])


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False,
                                                                          allow_infinity=False)
    | st.text(max_size=20),
    lambda kids: st.lists(kids, max_size=6) | st.dictionaries(st.text(max_size=8), kids,
                                                              max_size=4),
    max_leaves=30,
)


def _ids(v) -> bool:
    return isinstance(v, list) and bool(v) and all(type(x) is int and 0 <= x < VOCAB for x in v)


def _valid_prompt(v) -> bool:
    return _ids(v) or (isinstance(v, list) and bool(v) and all(_ids(p) for p in v))


# each mutation makes a valid body invalid in one way
bad_fields = st.one_of(
    st.tuples(st.just("prompt"), json_values.filter(lambda v: not _valid_prompt(v))),
    st.tuples(st.just("prompt"), st.lists(st.integers(-(2**40), -1) | st.integers(VOCAB, 2**62),
                                          min_size=1, max_size=5)),
    st.tuples(st.just("prompt"), st.lists(st.lists(st.integers(0, 5), max_size=2), min_size=1,
                                          max_size=3).map(lambda v: [*v, [[1]]])),
    st.tuples(st.just("prompt_logprobs"), json_values.filter(
        lambda v: not (type(v) is int and 0 <= v <= 20))),
    st.tuples(st.just("max_tokens"), json_values.filter(lambda v: not (type(v) is int
                                                                       and v in (0, 1)))),
    st.tuples(st.just("temperature"), json_values.filter(
        lambda v: v is not None and not (type(v) in (int, float) and v >= 0))),
    st.tuples(st.just("model"), json_values.filter(lambda v: v is not None and v != "tiny")),
)


@settings(max_examples=60, deadline=None)
@given(field=bad_fields, raw=st.binary(max_size=200), nan=st.sampled_from(
    [b"NaN", b"-Infinity", b"Infinity", b"1e400"]), kind=st.integers(0, 3),
    ctype=st.sampled_from(["application/json", "application/json; charset=utf-8", None]))
def test_random_hostile_bodies_always_get_a_small_4xx(server, field, raw, nan, kind, ctype):
    port = server["port"]
    if kind == 0:  # one field of a valid body made wrong
        body = json.dumps({**_valid(), field[0]: field[1]}).encode()
    elif kind == 1:  # arbitrary bytes, usually not UTF-8, never a JSON object
        body = b"\xff" + raw
    elif kind == 2:  # a non-JSON constant where a number goes
        body = json.dumps({**_valid(), "prompt": [1, 2, 0]}).encode().replace(b"0]", nan + b"]")
    else:  # random JSON that is not an object
        body = json.dumps([field[1]]).encode()
    status, reply, _ = _post(port, body, content_type=ctype)
    assert 400 <= status < 500, (status, body[:80], reply[:200])
    assert len(reply) < SMALL
    _healthy(port)


# -------------------------------------------------------------------- load, queue
def test_full_queue_answers_429_with_retry_after_and_health_stays_fast(server):
    port = server["port"]
    rng = np.random.default_rng(0)
    body = {"model": "tiny", "prompt": rng.integers(0, VOCAB, (MAX_PROMPTS, 500)).tolist(),
            "prompt_logprobs": 0, "max_tokens": 1}
    health_s: list[float] = []
    stop = threading.Event()

    def probe() -> None:
        while not stop.is_set():
            t0 = time.time()
            _healthy(port)
            health_s.append(time.time() - t0)
            time.sleep(0.05)

    prober = threading.Thread(target=probe)
    prober.start()
    try:
        with ThreadPoolExecutor(6) as pool:
            answers = list(pool.map(lambda _: _post(port, body), range(6)))
    finally:
        stop.set()
        prober.join()
    codes = sorted(a[0] for a in answers)
    assert set(codes) <= {200, 429} and codes.count(200) >= 1 and codes.count(429) >= 1, codes
    for status, reply, headers in answers:
        if status == 429:
            assert int(headers["retry-after"]) >= 1 and len(reply) < SMALL
    assert max(health_s) < 1.0, max(health_s)  # scoring never blocks the event loop


def test_a_disconnected_clients_request_is_dropped_unscored(server):
    port = server["port"]
    rng = np.random.default_rng(1)
    big = json.dumps({"prompt": rng.integers(0, VOCAB, (MAX_PROMPTS, 500)).tolist(),
                      "prompt_logprobs": 0}).encode()
    first = threading.Thread(target=_post, args=(port, big))
    first.start()  # holds the worker for about a second
    time.sleep(0.3)
    with socket.create_connection(("127.0.0.1", port)) as s:  # queued, then abandoned
        s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                  b"application/json\r\nAuthorization: Bearer " + KEY.encode() +
                  b"\r\nContent-Length: " + str(len(big)).encode() + b"\r\n\r\n" + big)
        time.sleep(0.1)
    first.join()
    time.sleep(2.5)  # summary lines every second
    text = server["log"].read_text()
    assert any("dropped" in line and "dropped 0" not in line for line in text.splitlines()), text


# ------------------------------------------------------------ batching, in process
def test_batched_requests_score_as_one_at_a_time(tiny):
    teacher = HFTeacher.from_pretrained(tiny["student"], device="cpu")
    rng = np.random.default_rng(3)
    requests = [[rng.integers(0, VOCAB, n).tolist()] for n in (7, 40, 1, 19)]
    requests.append([rng.integers(0, VOCAB, 12).tolist(), rng.integers(0, VOCAB, 30).tolist()])
    calls: list[int] = []

    def scorer(prompts):
        calls.append(len(prompts))
        return score_prompts(teacher, prompts)

    queue = BatchQueue(scorer, max_batch_tokens=8192, max_queue=16)
    results: dict[int, list] = {}
    events = [threading.Event() for _ in requests]
    for i, prompts in enumerate(requests):  # all waiting before the worker starts
        def done(res, err, i=i):
            results[i] = res if err is None else err
            events[i].set()
        queue.submit(Job(prompts=prompts, tokens=sum(map(len, prompts)), done=done))
    queue.start()
    assert all(e.wait(60) for e in events)
    queue.stop()
    assert calls == [6]  # five requests, one forward pass
    for i, prompts in enumerate(requests):
        for p, got in zip(prompts, results[i]):
            alone = score_prompts(teacher, [p])[0]
            assert got.shape == (len(p) - 1,)
            # float32 rounding only: a padded batch runs other kernels than a lone prompt
            np.testing.assert_allclose(got, alone, atol=5e-5, rtol=0)


def test_queue_bounds_budget_and_cancellation():
    scored: list[list[int]] = []
    gate = threading.Event()

    def scorer(prompts):
        gate.wait(10)
        scored.extend(len(p) for p in prompts)
        return [np.zeros(len(p) - 1) for p in prompts]

    queue = BatchQueue(scorer, max_batch_tokens=10, max_queue=3)
    done = []
    jobs = [Job(prompts=[[1] * n], tokens=n, done=lambda r, e: done.append(e)) for n in (6, 4,
                                                                                          5)]
    for j in jobs:
        queue.submit(j)
    with pytest.raises(QueueFull) as full:
        queue.submit(Job(prompts=[[1, 2]], tokens=2, done=lambda r, e: None))
    assert full.value.retry_after >= 1
    jobs[1].cancelled = True  # its client left: it frees its slot and is never scored
    queue.submit(Job(prompts=[[1, 2, 3]], tokens=3, done=lambda r, e: done.append(e)))
    queue.start()
    gate.set()
    queue.stop(10)
    assert scored == [6, 5, 3]  # 6 alone (6 + 5 > 10), then 5 + 3 share a pass
    assert queue.dropped == 1 and done == [None, None, None]


def test_one_request_per_pass_when_asked():
    calls: list[int] = []

    def scorer(prompts):
        calls.append(len(prompts))
        return [np.zeros(len(p) - 1) for p in prompts]

    queue = BatchQueue(scorer, max_batch_tokens=1000, max_queue=8, max_batch_requests=1)
    for prompts in ([[1, 2]], [[3, 4], [5, 6]], [[7, 8]]):
        queue.submit(Job(prompts=prompts, tokens=4, done=lambda r, e: None))
    queue.start()
    queue.stop(10)
    assert calls == [1, 2, 1]  # requests never share a pass; a request's own prompts do


def test_a_failing_request_does_not_fail_its_batch_mates():
    def scorer(prompts):
        if any(p[0] == 13 for p in prompts):
            raise RuntimeError("non-finite log-probs")
        return [np.zeros(len(p) - 1) for p in prompts]

    queue = BatchQueue(scorer, max_batch_tokens=100, max_queue=8)
    out: dict[int, object] = {}
    for i, first in enumerate((1, 13, 2)):
        queue.submit(Job(prompts=[[first, 5]], tokens=2,
                         done=lambda r, e, i=i: out.__setitem__(i, e)))
    queue.start()
    queue.stop(10)
    assert out[0] is None and out[2] is None and isinstance(out[1], RuntimeError)


# ------------------------------------------------------------------- parser, units
def test_parser_limits_and_messages_never_quote_input():
    limits = ServeLimits(max_prompts=2, max_request_tokens=10, max_body_bytes=100)
    secret = "Z" * 40
    bodies = [
        {"prompt": [1, 2], "prompt_logprobs": 0, "model": secret},
        {"prompt": [1, secret], "prompt_logprobs": 0},
        {"prompt": [[1], [2], [3]], "prompt_logprobs": 0},
        {"prompt": [[1] * 6, [2] * 6], "prompt_logprobs": 0},
        {"prompt": secret, "prompt_logprobs": 0},
    ]
    statuses = []
    for b in bodies:
        with pytest.raises(RequestError) as e:
            parse_request(json.dumps(b).encode(), "application/json", limits, 50, 8, "m")
        assert secret not in e.value.message
        statuses.append(e.value.status)
    assert statuses == [404, 400, 413, 413, 400]
    ok = parse_request(b'{"prompt": [[1, 2], [3]], "prompt_logprobs": 0, "max_tokens": 0}',
                       None, limits, 50, 8, "m")
    assert ok.prompts == [[1, 2], [3]] and ok.tokens == 3
    with pytest.raises(RequestError, match="context is 8"):
        parse_request(b'{"prompt": [1, 1, 1, 1, 1, 1, 1, 1, 1], "prompt_logprobs": 0}',
                      None, limits, 50, 8, "m")
    assert math.isfinite(parse_request(b'{"prompt": [1], "prompt_logprobs": 20, '
                                       b'"temperature": 0.7}', None, limits, 50, 8, "m").tokens)


def test_binding_beyond_loopback_without_a_key_warns():
    assert exposure_warning("0.0.0.0", None) and "--api-key" in exposure_warning("0.0.0.0", None)
    assert exposure_warning("10.1.2.3", None) and exposure_warning("myhost", None)
    for host in ("127.0.0.1", "localhost", "::1", "127.0.0.2"):
        assert exposure_warning(host, None) is None
    assert exposure_warning("0.0.0.0", "k") is None


# -------------------------------------------------------------------- shutdown
def test_sigterm_finishes_in_flight_requests(tiny, tmp_path):
    log = tmp_path / "server.log"
    proc, port = _start(tiny["student"], log, "--log-every", "0")
    try:
        rng = np.random.default_rng(2)
        body = {"prompt": rng.integers(0, VOCAB, (16, 500)).tolist(), "prompt_logprobs": 0}
        answers: list = []
        client = threading.Thread(target=lambda: answers.append(_post(port, body, key=None)))
        client.start()
        time.sleep(0.5)  # the request is being scored
        proc.send_signal(signal.SIGTERM)
        client.join(60)
        assert answers and answers[0][0] == 200, answers
        choices = json.loads(answers[0][1])["choices"]
        assert len(choices) == 16 and len(choices[0]["prompt_logprobs"]) == 500
        # uvicorn re-raises the signal once it has shut down cleanly: death by SIGTERM, not 0
        assert proc.wait(timeout=30) in (0, -signal.SIGTERM)
        assert "final: 1 scored" in log.read_text()  # the lifespan shutdown ran, worker drained
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=30)


# ---------------------------------------------------------------------- bench serve
def test_bench_serve_runs_both_phases_without_errors(tiny, tmp_path):
    from crossopd.bench.serve import bench_serve, render_serve

    result = bench_serve(model=tiny["student"], seconds=2.0, clients=3, prompt_tokens=32,
                         device="cpu", out_dir=tmp_path)
    one, many = result["phases"]["one_at_a_time"], result["phases"]["concurrent"]
    assert result["errors"] == 0 and one["requests"] > 0 and many["requests"] > 0
    assert one["clients"] == 1 and many["clients"] == 3
    assert many["health_max_s"] < 1.0 and result["peak_rss_mb"] > 0
    assert result["batching_speedup"] > 0 and "tok/s" in render_serve(result)
    json.dumps(result)  # one JSON object
