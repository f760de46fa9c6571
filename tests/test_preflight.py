"""Mistakes a newcomer makes fail in seconds, before any model loads, with one line that says
what to do: typos in bundled names, a teacher URL nobody answers, a wrong served name, a base
teacher without a plain template. A teacher that is still starting is waited for (up to
teacher.patience_s, with status lines); what waiting cannot fix is not."""

from __future__ import annotations

import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crossopd.cli.main import main
from crossopd.teachers import TeacherError, probe
from crossopd.teachers.probe import check_teacher_server

from conftest import free_port


@pytest.fixture(scope="module")
def models_server():
    """A real HTTP server on 127.0.0.1 answering /v1/models as vLLM does."""
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            body = json.dumps({"object": "list", "data": [
                {"id": "google/gemma-3-270m", "object": "model", "max_model_len": 2048}]})
            self.send_response(200 if self.path == "/v1/models" else 404)
            self.send_header("Content-Type", "application/json")
            self.end_headers()
            self.wfile.write(body.encode())

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def answering():
    """``answering(codes)``: a real HTTP server on 127.0.0.1 whose n-th ``/v1/models`` answer
    is HTTP ``codes[n]`` (the last code repeats; 200 is a model list). Returns its URL."""
    servers: list[ThreadingHTTPServer] = []

    def start(codes: list[int]) -> str:
        seen = []

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                code = codes[min(len(seen), len(codes) - 1)]
                seen.append(code)
                body = json.dumps({"object": "list", "data": [
                    {"id": "tiny", "object": "model", "max_model_len": 512}]}
                    if code == 200 else {"error": "not ready"})
                self.send_response(code)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

        server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()


def _fails_fast(capsys, args: list[str], expected: str, seconds: float = 15.0) -> str:
    t0 = time.time()
    assert main(args) == 2
    assert time.time() - t0 < seconds
    err = capsys.readouterr().err.strip()
    errors = [line for line in err.splitlines() if ": error: " in line]
    assert "Traceback" not in err and len(errors) == 1, err  # status lines aside, one line
    assert expected in errors[0], err
    return errors[0]


def test_probe_reports_models_and_context(models_server):
    info = check_teacher_server([models_server + "/v1"], "google/gemma-3-270m")
    assert info == {"url": models_server + "/v1", "models": ["google/gemma-3-270m"],
                    "max_model_len": 2048}
    with pytest.raises(TeacherError, match="serves google/gemma-3-270m, not 'gemma3'"):
        check_teacher_server([models_server], "gemma3")


def test_starting_teacher_is_waited_for(answering):
    url = answering([503, 503, 503, 200])  # a proxy in front of a server that is loading
    lines: list[str] = []
    info = check_teacher_server([url], "tiny", patience_s=30, poll_s=0.05, status=lines.append)
    assert info["max_model_len"] == 512
    assert lines == [f"waiting for teacher {url} (HTTP 503), 0 s of 30 s (teacher.patience_s)"]


def test_nobody_listening_is_waited_for_then_fails(capsys):
    url = f"http://127.0.0.1:{free_port()}"
    t0 = time.monotonic()
    with pytest.raises(TeacherError) as e:
        check_teacher_server([url], "tiny", patience_s=2, poll_s=0.2)
    assert 2 <= time.monotonic() - t0 < 6
    message = str(e.value)
    assert f"no teacher came up at {url} within 2 s (connection refused)" in message
    for fix in ("start it", "fix teacher.urls", "raise teacher.patience_s"):
        assert fix in message
    err = capsys.readouterr().err.splitlines()  # the default status: one line on stderr, now
    assert err == [f"crossopd: waiting for teacher {url} (connection refused), 0 s of 2 s "
                   "(teacher.patience_s)"]


def test_status_line_repeats_while_waiting(monkeypatch):
    monkeypatch.setattr(probe, "STATUS_EVERY_S", 0.3)
    lines: list[str] = []
    with pytest.raises(TeacherError):
        check_teacher_server([f"http://127.0.0.1:{free_port()}"], None, patience_s=1.2,
                             poll_s=0.1, status=lines.append)
    assert 3 <= len(lines) <= 6, lines  # at once, then every STATUS_EVERY_S, not every poll


@pytest.mark.parametrize("codes,name,expected", [
    ([401], "tiny", "HTTP 401 (check teacher.api_key"),  # waiting does not fix a wrong key
    ([500], "tiny", "HTTP 500"),  # nor a server bug
    ([200], "other", "serves tiny, not 'other'"),  # nor a wrong name
])
def test_answers_that_waiting_cannot_fix_fail_at_once(answering, codes, name, expected):
    lines: list[str] = []
    t0 = time.monotonic()
    with pytest.raises(TeacherError, match=re.escape(expected)):
        check_teacher_server([answering(codes)], name, patience_s=60, status=lines.append)
    assert time.monotonic() - t0 < 5 and lines == []


def test_zero_patience_fails_at_once(answering):
    lines: list[str] = []
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(TeacherError, match=f"no teacher answers at {url} .*refused"):
        check_teacher_server([url], None, status=lines.append)
    with pytest.raises(TeacherError, match="HTTP 503"):
        check_teacher_server([answering([503, 200])], None, patience_s=0, status=lines.append)
    assert lines == []


@pytest.mark.parametrize("key,typo,right", [("student.model", "smolm2", "smollm2"),
                                            ("teacher.model", "gemma-3-270m", "gemma3-270m")])
def test_bundled_name_typo(capsys, key, typo, right):
    other = "teacher.model=gemma3-270m" if key == "student.model" else "student.model=smollm2"
    _fails_fast(capsys, ["train", f"{key}={typo}", other], f"did you mean '{right}'?", 5)


@pytest.mark.parametrize("patience,expected", [(0, "no teacher answers at"),
                                               (2, "within 2 s (connection refused)")])
def test_teacher_url_nobody_answers(capsys, tmp_path, patience, expected):
    _fails_fast(capsys, ["train", f"teacher.urls=[http://127.0.0.1:{free_port()}]",
                         "teacher.tokenizer=gemma3-270m", f"output_dir={tmp_path}",
                         "device=cpu", f"teacher.patience_s={patience}"], expected)


def test_wrong_served_name(capsys, tmp_path, models_server):
    _fails_fast(capsys, ["train", f"teacher.urls=[{models_server}]",
                         "teacher.served_name=gemma-3-270m", "teacher.tokenizer=gemma3-270m",
                         f"output_dir={tmp_path}", "device=cpu"],
                "set teacher.served_name to one of those")


def test_base_teacher_without_plain_template(capsys, tmp_path):
    _fails_fast(capsys, ["train", "teacher.model=gemma3-270m", f"output_dir={tmp_path}",
                         "device=cpu"], "teacher.plain_template and teacher.stop")


def test_existing_run_directory_is_refused(capsys, tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    _fails_fast(capsys, ["train", "teacher.model=gemma3-270m", f"output_dir={tmp_path}",
                         "teacher.plain_template=Q: {prompt}\\nA:", "teacher.stop=\\n\\nQ:"],
                "--overwrite", 5)
    assert (tmp_path / "metrics.jsonl").read_text() == '{"step": 1}\n'
