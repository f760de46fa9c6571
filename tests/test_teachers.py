"""Teacher scoring: in-process HF (exact vs a naive log-softmax, bounded memory on Gemma), the
real HTTP server, and real network faults."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch

from crossopd.teachers import TeacherError
from crossopd.teachers.hf import HFTeacher
from crossopd.teachers.http import (
    HTTPTeacher,
    TeacherClientError,
    TeacherUnavailable,
    parse_retry_after,
)

from conftest import free_port, wait_ready

HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def smol_teacher():
    return HFTeacher.from_pretrained("smollm2", device="cpu", logits_budget_bytes=2**20)


def _naive(model, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return model(input_ids=ids, attention_mask=mask).logits.float().log_softmax(-1)


def test_chunked_scoring_equals_naive_log_softmax(smol_teacher):
    rng = np.random.default_rng(0)
    seqs = [rng.integers(3, 49152, size=n).tolist() for n in (12, 40, 7)]
    spans = [(1, 12), (10, 40), (3, 6)]
    got = smol_teacher.score(seqs, spans)
    # the same right-padded batch, scored the naive way: full [batch, length, vocab] log-softmax
    ids = torch.zeros(3, 40, dtype=torch.long)
    mask = torch.zeros(3, 40, dtype=torch.long)
    for r, s in enumerate(seqs):
        ids[r, : len(s)] = torch.tensor(s)
        mask[r, : len(s)] = 1
    lp = _naive(smol_teacher.model, ids, mask)
    for r, (s, (a, b)) in enumerate(zip(seqs, spans)):
        ref = lp[r, torch.arange(a - 1, b - 1), torch.tensor(s[a:b])].double().numpy()
        assert got[r].shape == (b - a,)
        # 1e-5 plus float32 rounding of log-probs around -20 (one ulp there is ~2e-6)
        np.testing.assert_allclose(got[r], ref, atol=1e-5, rtol=1e-6)


def test_batching_does_not_change_scores(smol_teacher):
    seqs = [[1, 9, 8, 7, 6, 5, 4], [1, 22, 33], list(range(100, 160))]
    spans = [(1, 7), (1, 3), (20, 60)]
    batched = smol_teacher.score(seqs, spans)
    alone = [smol_teacher.score([s], [sp])[0] for s, sp in zip(seqs, spans)]
    for x, y in zip(batched, alone):
        np.testing.assert_allclose(x, y, atol=5e-4)


def test_bad_spans_are_rejected(smol_teacher):
    with pytest.raises(ValueError, match="position 0 has no context"):
        smol_teacher.score([[1, 2, 3]], [(0, 2)])


def _vm_hwm_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise RuntimeError("no VmHWM")


def test_gemma_scoring_memory_is_bounded():
    """1024 scored positions on a 262k vocabulary: a naive log-softmax needs ~1 GiB for the
    logits alone (twice with the log-softmax); the chunked head stays far below."""
    teacher = HFTeacher.from_pretrained("gemma3-270m", device="cpu",
                                        logits_budget_bytes=32 * 2**20)
    seq = np.random.default_rng(1).integers(10, 200_000, size=1025).tolist()
    teacher.score([seq[:20]], [(1, 20)])  # warm-up allocations
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak-RSS counter
    base = _vm_hwm_kib()
    out = teacher.score([seq], [(1, 1025)])[0]
    peak_mib = (_vm_hwm_kib() - base) / 1024
    naive_mib = 1024 * 262144 * 4 / 2**20
    print(f"peak RSS growth {peak_mib:.0f} MiB (naive logits alone: {naive_mib:.0f} MiB)")
    assert np.isfinite(out).all() and (out <= 0).all()
    assert peak_mib < 400, peak_mib
    # and the values are right: compare the first positions with the naive computation
    with torch.inference_mode():
        lp = teacher.model(torch.tensor([seq[:33]])).logits.float().log_softmax(-1)[0]
    ref = lp[torch.arange(0, 32), torch.tensor(seq[1:33])].double().numpy()
    np.testing.assert_allclose(out[:32], ref, atol=1e-4)


# ------------------------------------------------------------------------------------ HTTP

@pytest.fixture(scope="session")
def teacher_server():
    port = free_port()
    proc = subprocess.Popen(
        # one request per forward pass: scores exactly equal to in-process ones, whatever the
        # client's concurrent requests (batched requests differ by float rounding)
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", "smollm2",
         "--port", str(port), "--device", "cpu", "--max-batch-requests", "1"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", 180)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.kill()
        proc.wait(timeout=30)


def test_eval_benchmark_refuses_a_scoring_only_server_in_one_line(teacher_server, tmp_path,
                                                                  capsys):
    """serve-teacher scores and does not generate: a URL MODEL pointing at it is told where
    generation runs instead."""
    from crossopd.cli.main import main

    assert main(["eval", teacher_server + "/v1", "--benchmark", "gsm8k", "--limit", "1",
                 "--out", str(tmp_path / "x.jsonl")]) == 2
    err = [x for x in capsys.readouterr().err.splitlines() if x.strip() and "generating" not in x]
    assert len(err) == 1 and "HTTP 404" in err[0] and "vllm serve" in err[0]


def test_http_scores_equal_in_process(teacher_server, smol_teacher):
    rng = np.random.default_rng(2)
    seqs = [rng.integers(3, 49152, size=n).tolist() for n in (5, 30, 17, 64)]
    spans = [(1, 5), (4, 30), (16, 17), (1, 64)]
    client = HTTPTeacher(teacher_server, model="smollm2", timeout=60)
    remote = client.score(seqs, spans)
    # the server scores every prompt position of one request; do the same here, then slice
    local = [smol_teacher.score([s], [(1, len(s))])[0][a - 1 : b - 1]
             for s, (a, b) in zip(seqs, spans)]
    for r, loc in zip(remote, local):
        np.testing.assert_allclose(r, loc, atol=1e-5, rtol=1e-6)
    # the OpenAI-style base URL (what `vllm serve` and serve-teacher print) works the same
    via_v1 = HTTPTeacher(teacher_server + "/v1/", model="smollm2", timeout=60).score(seqs, spans)
    for r, v in zip(remote, via_v1):
        np.testing.assert_array_equal(r, v)


def test_http_client_errors_are_not_retried(teacher_server):
    client = HTTPTeacher(teacher_server, model="not-this-model", retries=3, backoff=5)
    t0 = time.time()
    with pytest.raises(TeacherError, match="HTTP 404"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert time.time() - t0 < 5  # no backoff sleeps for a 4xx


@pytest.fixture()
def fault_server():
    procs = []

    def start(mode: str) -> tuple[str, subprocess.Popen]:
        port = free_port()
        proc = subprocess.Popen([sys.executable, str(HERE / "fault_server.py"), mode, str(port)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        procs.append(proc)
        return f"http://127.0.0.1:{port}", proc

    yield start
    for p in procs:
        p.kill()
        p.wait(timeout=10)


@pytest.mark.parametrize("mode,message,attempts", [
    ("http500", "HTTP 500", 2),  # a 500 is retried once: it is usually the same bug again
    ("malformed", "malformed JSON", 3),
    ("short", "prompt_logprobs for a 4-token prompt", 3),
    ("slow", "(timed out|TimeoutError)", 3),
])
def test_http_faults_end_in_clear_error(fault_server, mode, message, attempts):
    url, _ = fault_server(mode)
    client = HTTPTeacher(url, timeout=0.5, retries=2, backoff=0.05)
    t0 = time.time()
    with pytest.raises(TeacherError,
                       match=f"after {attempts} attempts; last error: .*{message}"):
        client.score([[1, 2, 3, 4]], [(1, 4)])
    assert time.time() - t0 < 10


def test_a_server_up_but_refusing_every_request_runs_out_the_patience(fault_server):
    """503 to every request while /v1/models answers: the teacher looks up to its probe, so the
    patience once never ran out and the run retried forever. It is bounded like a server that
    is down."""
    url, _ = fault_server("http503")
    client = HTTPTeacher(url, timeout=1, retries=1, backoff=0.05, patience_s=2)
    t0 = time.time()
    with pytest.raises(TeacherError, match="stayed unavailable for 2 s \\(teacher.patience_s\\)"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert time.time() - t0 < 30


def test_connection_refused(fault_server):
    client = HTTPTeacher(f"http://127.0.0.1:{free_port()}", timeout=1, retries=2, backoff=0.05)
    with pytest.raises(TeacherError, match="after 3 attempts.*(refused|URLError)"):
        client.score([[1, 2]], [(1, 2)])


def test_server_killed_mid_request(fault_server):
    url, proc = fault_server("slow")
    client = HTTPTeacher(url, timeout=20, retries=2, backoff=0.05)
    import threading

    threading.Timer(0.5, proc.kill).start()
    t0 = time.time()
    with pytest.raises(TeacherError, match="after 3 attempts"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert time.time() - t0 < 10  # the kill is noticed; no waiting for the 20 s timeout


def test_load_balancing_survives_a_dead_url(fault_server):
    good, _ = fault_server("ok")
    dead = f"http://127.0.0.1:{free_port()}"
    client = HTTPTeacher([dead, good], timeout=2, retries=2, backoff=0.01)
    out = client.score([[1, 2, 3, 4]] * 6, [(1, 4)] * 6)
    assert all(np.array_equal(o, [-1.0, -1.0, -1.0]) for o in out)


def test_in_process_nan_logprobs_are_an_error_naming_the_sequence(tmp_path):
    """A teacher whose forward gives NaN fails loudly, as the HTTP path does, instead of turning
    the sequence into silently unaligned tokens."""
    from transformers import LlamaConfig, LlamaForCausalLM

    model = LlamaForCausalLM(LlamaConfig(vocab_size=40, hidden_size=16, intermediate_size=32,
                                         num_hidden_layers=1, num_attention_heads=2,
                                         num_key_value_heads=1, max_position_embeddings=64))
    with torch.no_grad():  # token 5's embedding is NaN: only sequences containing it break
        model.model.embed_tokens.weight[5] = float("nan")
    teacher = HFTeacher(model)
    (ok,) = teacher.score([[1, 2, 3]], [(1, 3)])
    assert np.isfinite(ok).all()
    with pytest.raises(TeacherError, match="sequence 1"):
        teacher.score([[1, 2, 3], [4, 5, 6, 7]], [(1, 3), (1, 4)])


def _small(arch: str):
    import transformers

    cfg_cls = getattr(transformers, f"{arch}Config")
    model_cls = getattr(transformers, f"{arch}ForCausalLM")
    extra = {"Cohere": {"logit_scale": 0.3}, "Granite": {"logits_scaling": 4.0},
             "Gemma2": {"final_logit_softcapping": 5.0, "head_dim": 8}}.get(arch, {})
    torch.manual_seed(0)
    cfg = cfg_cls(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                  num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=64,
                  **extra)
    return model_cls(cfg).eval()


@pytest.mark.parametrize("arch", ["Llama", "Cohere", "Granite", "Gemma2"])
def test_scoring_reproduces_the_models_own_logits(arch):
    """Heads that scale or soft-cap their logits (Cohere's logit_scale, Granite's
    logits_scaling, Gemma's soft-capping) are scored as the model's own forward scores them."""
    from crossopd.models.scoring import score_sequences

    model = _small(arch)
    seq = [3, 17, 40, 9, 22, 5, 61, 30]
    (ours,) = score_sequences(model, [seq], [(1, len(seq))])
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([seq])).logits[0, :-1].float()
    ref = torch.log_softmax(logits, -1).gather(1, torch.tensor(seq[1:])[:, None])[:, 0]
    np.testing.assert_allclose(ours.detach().numpy(), ref.numpy(), atol=1e-4)


def test_a_head_crossopd_cannot_reproduce_is_refused():
    from crossopd.models.scoring import check_head

    model = _small("Llama")
    forward = model.forward

    def scaled(*args, **kwargs):  # an output transformation crossopd does not know about
        out = forward(*args, **kwargs)
        out.logits = out.logits * 3.0
        return out

    model.forward = scaled
    with pytest.raises(ValueError, match="cannot reproduce"):
        check_head(model)


# ------------------------------------------------------------- HTTP client retry rules
def _posts(url: str) -> int:
    return json.loads(urllib.request.urlopen(url + "/count", timeout=5).read())["posts"]


def test_client_honours_retry_after(fault_server):
    url, _ = fault_server("retry_after")  # 429 + Retry-After: 1, then answers
    client = HTTPTeacher(url, timeout=5, retries=3, backoff=0.01)
    t0 = time.time()
    (out,) = client.score([[1, 2, 3]], [(1, 3)])
    assert time.time() - t0 >= 1.0  # not the 0.01 s backoff
    assert np.array_equal(out, [-1.0, -1.0]) and _posts(url) == 2


def test_client_does_not_retry_4xx(fault_server):
    url, _ = fault_server("http400")
    client = HTTPTeacher(url, timeout=5, retries=5, backoff=0.01)
    with pytest.raises(TeacherClientError, match="HTTP 400"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert _posts(url) == 1


def test_deterministic_500_is_retried_once(fault_server):
    url, _ = fault_server("http500")
    client = HTTPTeacher(url, timeout=5, retries=5, backoff=0.01)
    with pytest.raises(TeacherUnavailable, match="after 2 attempts.*retried once"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert _posts(url) == 2


def test_timed_out_request_is_not_resent_to_the_same_url(fault_server):
    urls = [fault_server("slow")[0] for _ in range(2)]
    client = HTTPTeacher(urls, timeout=0.5, retries=5, backoff=0.01)
    with pytest.raises(TeacherUnavailable, match="timed out at every URL"):
        client.score([[1, 2, 3]], [(1, 3)])
    assert [_posts(u) for u in urls] == [1, 1]


class _CountingSlots:
    def __init__(self, n: int) -> None:
        self.sem = threading.BoundedSemaphore(n)
        self.lock = threading.Lock()
        self.held = self.peak = 0

    def acquire(self, timeout: float | None = None) -> bool:
        ok = self.sem.acquire(timeout=timeout)
        if ok:
            with self.lock:
                self.held += 1
                self.peak = max(self.peak, self.held)
        return ok

    def release(self) -> None:
        with self.lock:
            self.held -= 1
        self.sem.release()


def test_concurrent_retries_are_capped(fault_server):
    url, _ = fault_server("http503")  # always 503, Retry-After: 0
    client = HTTPTeacher(url, timeout=5, retries=3, backoff=0.05, concurrency=8, max_retrying=2)
    client.retry_slots = slots = _CountingSlots(2)
    with pytest.raises(TeacherUnavailable, match="HTTP 503"):
        client.score([[1, 2, 3]] * 8, [(1, 3)] * 8)
    assert 1 <= slots.peak <= 2
    # 8 first tries; retries only by the requests holding a slot before the first gives up
    assert _posts(url) <= 8 + 2 * 3 + 2


def test_backoff_is_jittered_capped_and_respects_retry_after():
    client = HTTPTeacher("http://127.0.0.1:9", backoff=0.5, max_backoff=4.0)
    waits = [client.delay(a) for a in range(8) for _ in range(20)]
    assert all(0.25 <= w <= 4.0 for w in waits) and len(set(waits)) > 100
    assert all(2.0 <= client.delay(a) <= 4.0 for a in range(3, 30))
    assert all(client.delay(0, retry_after=7) >= 7 for _ in range(20))
    assert client.delay(0, retry_after=10**6) <= client.max_retry_after + 1
    assert parse_retry_after("3") == 3 and parse_retry_after("soon") is None
    assert abs(parse_retry_after("Thu, 01 Jan 1970 00:01:40 GMT", now=40.0) - 60) < 1e-6


def test_api_key_is_sent_but_never_shown(fault_server, monkeypatch):
    url, _ = fault_server("echo_auth")  # a 400 page quoting the Authorization header
    key = "sk-live-0123456789abcdef"
    with pytest.raises(TeacherClientError) as err:
        HTTPTeacher(url, api_key=key, retries=0).score([[1, 2]], [(1, 2)])
    assert key not in str(err.value) and "Bearer ***" in str(err.value)
    monkeypatch.setenv("CROSSOPD_API_KEY", key)  # the default comes from the environment
    client = HTTPTeacher(url, retries=0)
    assert key not in repr(client)
    with pytest.raises(TeacherClientError) as err:
        client.score([[1, 2]], [(1, 2)])
    assert key not in str(err.value) and "Bearer ***" in str(err.value)


def test_api_key_reaches_serve_teacher_and_stays_out_of_config(tiny, tmp_path, monkeypatch):
    from crossopd.run.config import load_config
    from crossopd.step.settings import resolve_api_key

    port = free_port()
    key = "sk-serve-4242"
    proc = subprocess.Popen(
        [sys.executable, "-m", "crossopd", "serve-teacher", "--model", tiny["student"],
         "--port", str(port), "--device", "cpu", "--served-model-name", "tiny"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "CROSSOPD_API_KEY": key},
    )
    try:
        wait_ready(proc, f"http://127.0.0.1:{port}/health", 120)
        url = f"http://127.0.0.1:{port}"
        with pytest.raises(TeacherClientError, match="HTTP 401.*API key") as err:
            HTTPTeacher(url, model="tiny", api_key="").score([[1, 2, 3]], [(1, 3)])
        assert key not in str(err.value)
        ok = HTTPTeacher(url, model="tiny", api_key=key)
        assert ok.max_length == 511  # /v1/models with the key
        assert ok.score([[1, 2, 3]], [(1, 3)])[0].shape == (2,)
    finally:
        proc.kill()
        out = proc.communicate(timeout=30)[0]
    assert key not in out
    # the training config: literal keys are redacted on disk, env:NAME is kept
    cfg = load_config(None, ["teacher.urls=http://x:1", "teacher.tokenizer=smollm2",
                             f"teacher.api_key={key}"])
    assert resolve_api_key(cfg.teacher.api_key) == key
    assert key not in json.dumps(cfg.to_dict())
    monkeypatch.setenv("TEACHER_KEY", key)
    cfg = load_config(None, ["teacher.urls=http://x:1", "teacher.tokenizer=smollm2",
                             "teacher.api_key=env:TEACHER_KEY"])
    assert cfg.to_dict()["teacher"]["api_key"] == "env:TEACHER_KEY"
    assert resolve_api_key(cfg.teacher.api_key) == key
    monkeypatch.setenv("CROSSOPD_API_KEY", key)
    assert resolve_api_key(None) == key
