"""The documented commands run as written: the quickstart's blocks marked `tested` (on the
bundled models, CPU), in a scratch directory."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

DOCS = Path(__file__).parents[1] / "docs"


def marked_blocks(text: str) -> list[tuple[str, str, str]]:
    """(file name or '', language, code) for every block preceded by ``<!-- tested... -->``."""
    pattern = r"<!-- tested(?::\s*(\S+))? -->\s*```(\w+)\n(.*?)```"
    return [(m.group(1) or "", m.group(2), m.group(3))
            for m in re.finditer(pattern, text, flags=re.S)]


def test_quickstart_cpu_blocks_run_as_written(tmp_path):
    blocks = marked_blocks((DOCS / "quickstart.md").read_text(encoding="utf-8"))
    assert [lang for _, lang, _ in blocks] == ["yaml", "bash"]
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    for name, _lang, code in blocks:
        if name:
            (tmp_path / name).write_text(code)
            continue
        proc = subprocess.run(["bash", "-euo", "pipefail", "-c", code], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=900)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        out = proc.stdout
        assert "teacher log-probs of 3 sample answers" in out  # doctor --score
        # --no-progress: a line per step, on stderr beside the status lines
        assert "step 1/2:" in proc.stderr and "step 2/2:" in proc.stderr
        assert "reverse KL per byte" in out and "response:" in out  # crossopd eval
        assert "Loading weights" not in proc.stderr  # no third-party progress bars
    run = tmp_path / "runs" / "my_run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 3
    assert (run / "final" / "tokenizer_config.json").exists()


def test_scale_opd_trainer_python_block_runs_as_written(tmp_path):
    """docs/scale.md's `OPDTrainer` example on the bundled models."""
    ((name, lang, code),) = marked_blocks((DOCS / "scale.md").read_text(encoding="utf-8"))
    assert lang == "python"
    (tmp_path / name).write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, name], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "'opd/coverage'" in proc.stdout and "'opd/signal_tokens'" in proc.stdout


def test_config_two_teachers_block_runs_as_written(tmp_path):
    """docs/config.md's two-teacher YAML on the bundled models, through `crossopd train`."""
    ((name, lang, code),) = marked_blocks((DOCS / "config.md").read_text(encoding="utf-8"))
    assert lang == "yaml"
    (tmp_path / name).write_text(code)
    env = {**os.environ, "OMP_NUM_THREADS": "2", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run([sys.executable, "-m", "crossopd", "train", name, "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    import json

    rows = [json.loads(x) for x in (tmp_path / "runs" / "two_teachers" / "metrics.jsonl")
            .read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["teachers/gemma/sequences"] == r["teachers/smol/sequences"] == 4 for r in rows)
    assert rows[-1]["teachers/smol/one_to_one_share"] == 1.0
