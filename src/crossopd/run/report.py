"""The end-of-run report: PNG plots of the metrics files and one ``report.html`` beside them,
laid out to fit a browser window (long responses wrap; no column is squeezed to a few
characters) and showing where a step's time goes, the samples with their grades and the
benchmark accuracy when the run has ``eval_benchmark``."""

from __future__ import annotations

import html
import json
from pathlib import Path

from crossopd.evaluation.graders import answer_correct
from crossopd.files import read_jsonl

# a step's phases in the order they run (metrics rows carry time/<phase>_s)
PHASES = ("rollout", "bridge", "teacher", "student_logps", "align_credit", "update")
STYLE = """body{font-family:system-ui,sans-serif;margin:1.5em;max-width:1200px}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(340px,1fr));gap:8px}
.plots img{width:100%;height:auto}
table{border-collapse:collapse;width:100%;table-layout:fixed;margin-bottom:1em}
td,th{border:1px solid #ddd;padding:3px 8px;vertical-align:top;text-align:left;
overflow-wrap:anywhere}
table.kv{width:auto;table-layout:auto} table.kv td{max-width:40em}
pre{background:#f6f6f6;padding:.6em;margin:0;white-space:pre-wrap;overflow-wrap:anywhere;
max-height:24em;overflow-y:auto}
.ok{color:#067d17;font-weight:600} .no{color:#b00020;font-weight:600}"""


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt, *plt.subplots(figsize=(6, 3.4), dpi=110)


def _save(plt, fig, ax, path: Path, title: str, xlabel: str, ylabel: str,
          ncol: int = 1) -> None:
    ax.set_title(title)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, ncol=ncol, loc="upper left")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], ylabel: str) -> bool:
    series = [(name, x, y) for name, x, y in series if x]
    if not series:
        return False
    plt, fig, ax = _figure()
    for name, x, y in series:
        ax.plot(x, y, marker="o", markersize=3, label=name)
    _save(plt, fig, ax, path, title, "step", ylabel)
    return True


def _time_plot(path: Path, metrics: list[dict]) -> bool:
    """Seconds per phase of each step, stacked: the bar's height is the step's time, so the
    phases that cost time show, however fast the others are."""
    phases = [p for p in PHASES if any(f"time/{p}_s" in m for m in metrics)]
    if not phases:
        return False
    plt, fig, ax = _figure()
    steps = [m["step"] for m in metrics]
    bottom = [0.0] * len(metrics)
    for p in phases:
        secs = [float(m.get(f"time/{p}_s") or 0.0) for m in metrics]
        ax.bar(steps, secs, bottom=bottom, label=p.replace("_", " "), width=0.8)
        bottom = [b + s for b, s in zip(bottom, secs)]
    ax.set_ylim(0, max(max(bottom), 1e-9) * 1.35)  # head room for the legend
    _save(plt, fig, ax, path, "Where a step's time goes", "step", "seconds", ncol=3)
    return True


def _col(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def _esc(x: object) -> str:
    return html.escape(str(x))


def _grade(ok: bool | None) -> str:
    if ok is None:
        return ""
    return '<span class="ok">correct</span>' if ok else '<span class="no">wrong</span>'


def _fmt(v: object, spec: str) -> str:
    return format(v, spec) if isinstance(v, (int, float)) else "–"


def _eval_table(evals: list[dict]) -> str:
    bench = next((e["benchmark"] for e in evals if e.get("benchmark")), None)
    head = ("<tr><th>step</th><th>reverse KL / byte</th><th>stop rate</th><th>accuracy</th>"
            "<th>coverage</th>" + (f"<th>{_esc(bench)} accuracy (± s.e., n)</th>" if bench
                                   else "") + "</tr>")
    rows = []
    for e in evals:
        cells = [e["step"], _fmt(e.get("kl_per_byte"), ".4f"), _fmt(e.get("stop_rate"), ".3f"),
                 _fmt(e.get("accuracy"), ".3f"), _fmt(e.get("coverage"), ".4f")]
        if bench:
            se = e.get("benchmark_stderr")
            cells.append(f"{_fmt(e.get('benchmark_accuracy'), '.3f')} ± {_fmt(se, '.3f')}, "
                         f"n = {e.get('benchmark_n', '–')}")
        rows.append("<tr>" + "".join(f"<td>{c}</td>" for c in cells) + "</tr>")
    return f"<table>{head}{''.join(rows)}</table>"


def _samples_table(evals: list[dict]) -> str:
    rows = []
    for e in (evals[:1] + evals[-1:] if len(evals) > 1 else evals):
        for x in e.get("samples", []):
            answer = x.get("answer")
            ok = answer_correct(x["response"], str(answer)) if answer else None
            rows.append(f"<tr><td>{e['step']}</td><td>{_esc(x['prompt'])}</td>"
                        f"<td><pre>{_esc(x['response'])}</pre></td>"
                        f"<td>{_esc(answer or '')}</td><td>{_grade(ok)}</td></tr>")
    return ('<table><colgroup><col style="width:4em"><col style="width:30%"><col>'
            '<col style="width:8em"><col style="width:6em"></colgroup><tr><th>step</th>'
            "<th>prompt</th><th>student response</th><th>answer</th><th>grade</th></tr>"
            + "".join(rows) + "</table>")


def _benchmark_samples(out_dir: Path, shown: int = 5) -> str:
    """The first items of the first and last benchmark evaluation, with their grades."""
    files = sorted((out_dir / "benchmark").glob("step_*.jsonl"))
    rows = []
    for path in (files[:1] + files[-1:] if len(files) > 1 else files):
        step = int(path.stem.split("_")[1])
        for r in read_jsonl(path)[:shown]:
            question = r.get("question", "(not shown: this benchmark's text is not republished)")
            rows.append(f"<tr><td>{step}</td><td>{_esc(r['id'])}</td><td>{_esc(question)}</td>"
                        f"<td><pre>{_esc(r['responses'][0])}</pre></td>"
                        f"<td>{_esc(r['extracted'][0] or '–')} / {_esc(r['reference'])}</td>"
                        f"<td>{_grade(r['correct'][0])}</td></tr>")
    if not rows:
        return ""
    return ('<h2>Benchmark samples, first and last evaluation</h2><table><colgroup>'
            '<col style="width:4em"><col style="width:8em"><col style="width:28%"><col>'
            '<col style="width:9em"><col style="width:6em"></colgroup><tr><th>step</th>'
            "<th>item</th><th>question</th><th>response</th><th>answer / reference</th>"
            "<th>grade</th></tr>" + "".join(rows) + "</table>")


def teacher_names(metrics: list[dict]) -> list[str]:
    """The teachers of a run with several (its ``teachers/<name>/...`` metrics), in order."""
    seen: dict[str, None] = {}
    for row in metrics[:1]:
        for key in row:
            if key.startswith("teachers/"):
                seen[key.split("/")[1]] = None
    return list(seen)


def write_report(out_dir: Path) -> Path:
    """Plots and ``report.html`` in ``out_dir`` from its metrics.jsonl and eval.jsonl."""
    out_dir = Path(out_dir)
    metrics = read_jsonl(out_dir / "metrics.jsonl")
    evals = read_jsonl(out_dir / "eval.jsonl")
    names = teacher_names(metrics)  # a run with several teachers: one line per teacher
    plots = {
        "kl.png": ("Reverse KL per byte (student vs teacher)", [
            ("train (rollouts)", *_col(metrics, "kl_per_byte")),
            ("held-out eval", *_col(evals, "kl_per_byte")),
            *((f"train, {n}", *_col(metrics, f"teachers/{n}/kl_per_byte")) for n in names),
            *((f"held-out, {n}", *_col(evals, f"teachers/{n}/kl_per_byte")) for n in names)],
            "nats / byte"),
        "coverage.png": ("Alignment", [
            ("coverage", *_col(metrics, "coverage")),
            ("1:1 chunk share", *_col(metrics, "one_to_one_share")),
            *((f"coverage, {n}", *_col(metrics, f"teachers/{n}/coverage")) for n in names)],
            "fraction"),
        "eval.png": ("Held-out evaluation", [
            ("stop rate", *_col(evals, "stop_rate")),
            ("accuracy", *_col(evals, "accuracy")),
            ("benchmark accuracy", *_col(evals, "benchmark_accuracy"))], "fraction"),
    }
    made = [name for name, (title, series, ylabel) in plots.items()
            if _plot(out_dir / name, title, series, ylabel)]
    if _time_plot(out_dir / "time.png", metrics):
        made.append("time.png")
    config = (out_dir / "config.json").read_text() if (out_dir / "config.json").exists() else "{}"
    last = metrics[-1] if metrics else {}
    rows = "".join(f"<tr><td>{_esc(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>"
                   for k, v in last.items())
    page = f"""<!doctype html><html><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1"><title>crossopd run</title>
<style>{STYLE}</style></head><body>
<h1>crossopd OPD run</h1><p>{_esc(out_dir)}: {len(metrics)} steps logged.</p>
<div class="plots">{"".join(f'<img src="{n}" alt="{n}">' for n in made)}</div>
<h2>Held-out evaluations</h2>{_eval_table(evals)}
<h2>Samples, first and last evaluation</h2>{_samples_table(evals)}
{_benchmark_samples(out_dir)}
<h2>Last step</h2><table class="kv">{rows}</table>
<h2>Config</h2><pre>{_esc(json.dumps(json.loads(config), indent=2))}</pre>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
