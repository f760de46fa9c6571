"""Mistakes a newcomer makes fail in seconds, before any model loads, with one line that says
what to do: typos in bundled names, a teacher URL nobody answers, a wrong served name, a base
teacher without a plain template."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from crossopd.cli import main
from crossopd.teachers import TeacherError
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


@pytest.mark.parametrize("key,typo,right", [("student.model", "smolm2", "smollm2"),
                                            ("teacher.model", "gemma-3-270m", "gemma3-270m")])
def test_bundled_name_typo(capsys, key, typo, right):
    other = "teacher.model=gemma3-270m" if key == "student.model" else "student.model=smollm2"
    _fails_fast(capsys, ["train", f"{key}={typo}", other], f"did you mean '{right}'?", 5)


def test_teacher_url_nobody_answers(capsys, tmp_path):
    _fails_fast(capsys, ["train", f"teacher.urls=[http://127.0.0.1:{free_port()}]",
                         "teacher.tokenizer=gemma3-270m", f"output_dir={tmp_path}",
                         "device=cpu"], "no teacher answers at")


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
