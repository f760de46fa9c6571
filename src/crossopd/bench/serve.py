"""``crossopd bench serve``: serve-teacher under load, and what request batching buys.

Starts ``crossopd serve-teacher`` on the bundled teacher in a subprocess on a free 127.0.0.1
port, then runs two phases of the same length with the same kind of request (one prompt of
random token ids per request, as ``HTTPTeacher`` sends): one client at a time, then N
concurrent clients. Each phase reports requests/s, scored tokens/s, p50/p99 latency and errors
(anything but HTTP 200, which must stay 0); the concurrent phase also times ``/health`` while
the queue is full. Peak RSS is the server's ``VmHWM`` after each phase.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import numpy as np

from crossopd.bench.machine import machine

PRESETS = {  # seconds per phase, concurrent clients, tokens per request
    "quick": {"seconds": 20.0, "clients": 8, "prompt_tokens": 128},
    "full": {"seconds": 60.0, "clients": 16, "prompt_tokens": 256},
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_status_kib(pid: int, field: str) -> int | None:
    """``VmHWM`` (peak RSS) or ``VmRSS`` of a process in KiB, from /proc (Linux)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


def start_server(model: str, port: int, device: str | None, log_path: Path,
                 ready_timeout_s: float = 600.0) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "crossopd", "serve-teacher", "--model", model,
           "--port", str(port), "--log-every", "0"]
    if device:
        cmd += ["--device", device]
    # no key: the bench client must not depend on the caller's environment
    env = {k: v for k, v in os.environ.items() if k != "CROSSOPD_API_KEY"}
    log = log_path.open("w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    end = time.monotonic() + ready_timeout_s
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise RuntimeError(f"serve-teacher exited with {proc.returncode}: "
                               f"{log_path.read_text()[-2000:]}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return proc
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"serve-teacher not ready after {ready_timeout_s:.0f} s")


def post(url: str, ids: list[int], timeout: float = 300.0) -> int:
    """One scoring request; the HTTP status (0 for a connection error or a bad answer)."""
    body = json.dumps({"prompt": ids, "max_tokens": 1, "prompt_logprobs": 0,
                       "temperature": 0.0}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            doc = json.loads(resp.read())
        ok = len(doc["choices"][0]["prompt_logprobs"]) == len(ids)
        return resp.status if ok else 0
    except urllib.error.HTTPError as e:
        return e.code
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return 0


def run_phase(url: str, clients: int, seconds: float, prompt_tokens: int, vocab: int,
              seed: int = 0, probe_health: bool = False) -> dict:
    """``clients`` closed-loop clients for ``seconds``; requests in flight at the deadline
    finish and count (the wall time runs until the last one)."""
    latencies: list[float] = []
    codes: dict[int, int] = {}
    lock = threading.Lock()
    deadline = time.monotonic() + seconds

    def client(k: int) -> None:
        rng = np.random.default_rng(seed * 1000 + k)
        while time.monotonic() < deadline:
            ids = rng.integers(10, vocab, prompt_tokens).tolist()
            t0 = time.monotonic()
            status = post(url, ids)
            with lock:
                codes[status] = codes.get(status, 0) + 1
                if status == 200:
                    latencies.append(time.monotonic() - t0)

    health: list[float] = []
    stop = threading.Event()

    def prober() -> None:
        while not stop.is_set():
            t0 = time.monotonic()
            try:
                urllib.request.urlopen(url + "/health", timeout=10).read()
                health.append(time.monotonic() - t0)
            except OSError:
                health.append(float("inf"))
            stop.wait(0.2)

    start = time.monotonic()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    if probe_health:
        threads.append(threading.Thread(target=prober))
    for t in threads:
        t.start()
    for t in threads[:clients]:
        t.join()
    wall = time.monotonic() - start
    stop.set()
    for t in threads[clients:]:
        t.join()
    lat = np.asarray(latencies) if latencies else np.asarray([np.nan])
    done = len(latencies)
    row = {
        "clients": clients,
        "seconds": round(wall, 2),
        "requests": done,
        "requests_per_s": round(done / wall, 3),
        "tokens_per_s": round(done * prompt_tokens / wall, 1),
        "p50_latency_s": round(float(np.percentile(lat, 50)), 3),
        "p99_latency_s": round(float(np.percentile(lat, 99)), 3),
        "errors": sum(v for k, v in codes.items() if k != 200),
        "statuses": {str(k): v for k, v in sorted(codes.items())},
    }
    if probe_health:
        row["health_max_s"] = round(max(health), 3) if health else None
    return row


def bench_serve(quick: bool = False, model: str = "gemma3-270m", clients: int | None = None,
                seconds: float | None = None, prompt_tokens: int | None = None,
                device: str | None = None, out_dir: str | Path | None = None,
                progress: Callable[[str], None] | None = None) -> dict:
    preset = dict(PRESETS["quick" if quick else "full"])
    for key, value in (("clients", clients), ("seconds", seconds),
                       ("prompt_tokens", prompt_tokens)):
        if value is not None:
            preset[key] = value
    say = progress or (lambda m: None)
    out = Path(out_dir or "runs/bench_serve")
    out.mkdir(parents=True, exist_ok=True)
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    say(f"starting serve-teacher --model {model} on {url}")
    proc = start_server(model, port, device, out / "server.log")
    try:
        load_s = time.monotonic() - t0
        vocab = 32000  # ids every tokenizer has; the forward pass costs the same for any ids
        say("warm-up")
        run_phase(url, 2, 3.0, preset["prompt_tokens"], vocab, seed=99)
        rows = {}
        for name, n in (("one_at_a_time", 1), ("concurrent", preset["clients"])):
            say(f"{name}: {n} client(s) for {preset['seconds']:.0f} s")
            rows[name] = run_phase(url, n, preset["seconds"], preset["prompt_tokens"], vocab,
                                   seed=len(rows), probe_health=n > 1)
            rows[name]["peak_rss_mb"] = round((proc_status_kib(proc.pid, "VmHWM") or 0) / 1024)
            rows[name]["rss_mb"] = round((proc_status_kib(proc.pid, "VmRSS") or 0) / 1024)
            say(render_row(name, rows[name]))
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
    one, many = rows["one_at_a_time"], rows["concurrent"]
    return {
        "model": model,
        "preset": "quick" if quick else "full",
        "settings": preset,
        "server_load_s": round(load_s, 1),
        "phases": rows,
        "batching_speedup": round(many["tokens_per_s"] / max(one["tokens_per_s"], 1e-9), 2),
        "errors": one["errors"] + many["errors"],
        "peak_rss_mb": max(one["peak_rss_mb"], many["peak_rss_mb"]),
        "machine": machine(),
    }


def render_row(name: str, row: dict) -> str:
    extra = f", /health max {row['health_max_s']:.2f} s" if "health_max_s" in row else ""
    return (f"{name:>14}: {row['clients']:>2} client(s)  {row['requests_per_s']:6.2f} req/s  "
            f"{row['tokens_per_s']:8.1f} tok/s  p50 {row['p50_latency_s']:.2f} s  p99 "
            f"{row['p99_latency_s']:.2f} s  errors {row['errors']}  peak RSS "
            f"{row['peak_rss_mb']} MB{extra}")


def render_serve(result: dict) -> str:
    lines = [f"bench serve: {result['model']}, {result['settings']['prompt_tokens']}-token "
             f"requests, {result['settings']['seconds']:.0f} s per phase"]
    lines += [render_row(k, v) for k, v in result["phases"].items()]
    lines.append(f"batching speedup (tokens/s, concurrent / one at a time): "
                 f"{result['batching_speedup']:.2f}x; errors {result['errors']}")
    return "\n".join(lines)
