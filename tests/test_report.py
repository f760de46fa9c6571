"""The run report as a person sees it: rendered in headless Chromium (installed by `make
install`), it must fit the window (no sideways scrolling, however long a response) and every
image must load. A training run with ``eval_benchmark`` puts the benchmark's accuracy in
eval.jsonl, the result and the report."""

from __future__ import annotations

import html
import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from crossopd.run.report import write_report

from conftest import PLAIN

WIDTH = 1024
PROBE = """<script>window.addEventListener("load", () => {
  const d = document.documentElement;
  const missing = [...document.images].filter(i => !(i.complete && i.naturalWidth > 0))
    .map(i => i.getAttribute("src"));
  const r = document.createElement("pre"); r.id = "probe";
  r.textContent = JSON.stringify({scroll: d.scrollWidth, inner: window.innerWidth,
                                  images: document.images.length, missing});
  document.body.appendChild(r);
});</script>"""


def chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.fail("headless Chromium is missing: `make install` installs it (apt-get install "
                    "chromium)")
    return exe


def page_problems(page: Path) -> list[str]:
    """What is wrong with ``page`` in a WIDTH-pixel Chromium window: wider than the window,
    images that did not load."""
    probe = page.with_name("probe_" + page.name)
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", PROBE + "</body>"),
                     encoding="utf-8")
    out = subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--window-size={WIDTH},800", "--virtual-time-budget=10000", "--dump-dom",
         probe.as_uri()], capture_output=True, text=True, timeout=120)
    m = re.search(r'<pre id="probe">(.*?)</pre>', out.stdout, re.S)
    assert m, f"chromium rendered nothing: {out.stderr[-2000:]}"
    r = json.loads(html.unescape(m.group(1)))
    problems = []
    if r["scroll"] > r["inner"]:
        problems.append(f"page is {r['scroll']} px wide in a {r['inner']} px window")
    problems += [f"image {src} is missing" for src in r["missing"]]
    if r["images"] == 0:
        problems.append("no images")
    return problems


def test_the_check_catches_a_wide_page_and_a_missing_image(tmp_path):
    (tmp_path / "ok.png").write_bytes(_png())
    page = tmp_path / "bad.html"
    page.write_text('<html><body><img src="ok.png"><img src="gone.png"><pre>'
                    + "x" * 3000 + "</pre></body></html>")
    problems = page_problems(page)
    assert any("wide" in p for p in problems) and "image gone.png is missing" in problems
    assert not any("ok.png" in p for p in problems)


def _png() -> bytes:
    import matplotlib

    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _synthetic_run(out: Path) -> None:
    """A run directory with what makes pages overflow: unbroken long responses and prompts."""
    out.mkdir()
    phases = {f"time/{p}_s": s for p, s in (("rollout", 3.0), ("teacher", 2.0), ("update", 5.0),
                                             ("align_credit", 0.001))}
    rows = [{"step": i, "loss": 0.1, "kl_per_byte": 0.3 / i, "coverage": 1.0,
             "one_to_one_share": 0.8, **phases} for i in range(1, 4)]
    (out / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    sample = {"prompt": "How many? " + "long" * 300, "response": "y" * 5000 + "\n" + "z " * 900,
              "answer": "5"}
    evals = [{"step": s, "kl_per_byte": 0.3, "stop_rate": 0.5, "accuracy": 0.5,
              "coverage": 1.0, "samples": [sample], "benchmark": "gsm8k", "benchmark_n": 2,
              "benchmark_accuracy": 0.5, "benchmark_stderr": 0.5} for s in (0, 3)]
    (out / "eval.jsonl").write_text("".join(json.dumps(e) + "\n" for e in evals))
    (out / "benchmark").mkdir()
    rec = {"id": "gsm8k-0", "question": "q" * 4000, "reference": "18",
           "responses": ["\\boxed{18}" + "w" * 4000], "extracted": ["18"], "correct": [True]}
    for s in (0, 3):
        (out / "benchmark" / f"step_{s:07d}.jsonl").write_text(json.dumps(rec) + "\n")
    (out / "config.json").write_text(json.dumps({"output_dir": str(out), "x": "v" * 3000}))


def test_report_fits_the_window_and_shows_time_grades_and_benchmark(tmp_path):
    out = tmp_path / "run"
    _synthetic_run(out)
    page = write_report(out)
    assert page_problems(page) == []
    text = page.read_text(encoding="utf-8")
    assert "time.png" in text and (out / "time.png").stat().st_size > 1000
    assert "gsm8k accuracy" in text and "0.500 ± 0.500, n = 2" in text
    assert 'class="ok">correct' in text  # the benchmark sample's grade
    assert 'class="no">wrong' in text  # the held-out sample's: "5" is not in its response


def test_training_with_eval_benchmark(tiny, tmp_path, monkeypatch):
    from crossopd.evaluation import benchmark_runs as benchmark_eval
    from crossopd.run.config import load_config
    from crossopd.run.train import train

    # responses of 8 tokens, not the benchmark's 1024: the tiny models only need to answer
    real = benchmark_eval.sampling_for
    monkeypatch.setattr(benchmark_eval, "sampling_for",
                        lambda bench, **kw: real(bench, max_new_tokens=8, **kw))

    bench = tmp_path / "mini.jsonl"
    bench.write_text("".join(json.dumps({"question": f"{a}+{a}?", "answer": str(2 * a)}) + "\n"
                             for a in range(1, 4)))
    cfg = {"student": {"model": tiny["student"]}, "teacher": {"model": tiny["teacher"], **PLAIN},
           "data": {"path": "bundled:arith", "heldout_size": 2}, "rollout": {"max_new_tokens": 8},
           "steps": 1, "batch_size": 2, "eval_prompts": 2, "output_dir": str(tmp_path / "run"),
           "device": "cpu", "eval_benchmark": str(bench), "eval_benchmark_limit": 2}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    result = train(load_config(path), progress=False)
    evals = [json.loads(x) for x in (tmp_path / "run" / "eval.jsonl").read_text().splitlines()]
    assert [e["benchmark_n"] for e in evals] == [2, 2]
    assert all(e["benchmark"] == "mini.jsonl" and 0 <= e["benchmark_accuracy"] <= 1
               for e in evals)
    assert result["benchmark"] == "mini.jsonl" and result["benchmark_n"] == 2
    assert {"benchmark_accuracy_before", "benchmark_accuracy_after", "benchmark_stderr_before",
            "benchmark_stderr_after"} <= set(result)
    files = sorted((tmp_path / "run" / "benchmark").glob("step_*.jsonl"))
    assert [f.name for f in files] == ["step_0000000.jsonl", "step_0000001.jsonl"]
    page = Path(result["report"])
    assert "mini.jsonl accuracy" in page.read_text() and page_problems(page) == []
