"""The end-of-run report: PNG plots of the metrics files and one ``report.html`` beside them."""

from __future__ import annotations

import html
import json
from pathlib import Path

from crossopd.files import read_jsonl


def _plot(path: Path, title: str, series: list[tuple[str, list, list]], ylabel: str) -> bool:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = [(name, x, y) for name, x, y in series if x]
    if not series:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.4), dpi=110)
    for name, x, y in series:
        ax.plot(x, y, marker="o", markersize=3, label=name)
    ax.set_title(title)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return True


def _col(rows: list[dict], key: str) -> tuple[list, list]:
    pts = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
    return [p[0] for p in pts], [p[1] for p in pts]


def write_report(out_dir: Path) -> Path:
    out_dir = Path(out_dir)
    metrics = read_jsonl(out_dir / "metrics.jsonl")
    evals = read_jsonl(out_dir / "eval.jsonl")
    plots = {
        "kl.png": ("Reverse KL per byte (student vs teacher)", [
            ("train (rollouts)", *_col(metrics, "kl_per_byte")),
            ("held-out eval", *_col(evals, "kl_per_byte"))], "nats / byte"),
        "coverage.png": ("Alignment", [
            ("coverage", *_col(metrics, "coverage")),
            ("1:1 chunk share", *_col(metrics, "one_to_one_share"))], "fraction"),
        "eval.png": ("Held-out evaluation", [
            ("stop rate", *_col(evals, "stop_rate")),
            ("accuracy", *_col(evals, "accuracy"))], "fraction"),
        "throughput.png": ("Throughput per phase", [
            (k.split("/")[1].replace("_tok_per_s", ""), *_col(metrics, k))
            for k in ("time/rollout_tok_per_s", "time/teacher_tok_per_s",
                      "time/align_credit_tok_per_s", "time/update_tok_per_s")],
            "student tokens / s"),
    }
    made = [name for name, (title, series, ylabel) in plots.items()
            if _plot(out_dir / name, title, series, ylabel)]
    config = (out_dir / "config.json").read_text() if (out_dir / "config.json").exists() else "{}"
    last = metrics[-1] if metrics else {}
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{v:.4g}</td></tr>" if isinstance(v, float)
                   else f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in last.items())
    eval_rows = "".join(
        f"<tr><td>{e['step']}</td><td>{e['kl_per_byte']:.4f}</td><td>{e['stop_rate']:.3f}</td>"
        f"<td>{e.get('accuracy', float('nan')):.3f}</td><td>{e['coverage']:.4f}</td></tr>"
        for e in evals)
    samples = "".join(
        f"<tr><td>{e['step']}</td><td>{html.escape(x['prompt'])}</td>"
        f"<td><pre>{html.escape(x['response'])}</pre></td>"
        f"<td>{html.escape(str(x.get('answer') or ''))}</td></tr>"
        for e in (evals[:1] + evals[-1:] if len(evals) > 1 else evals)
        for x in e.get("samples", []))
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>crossopd run</title>
<style>body{{font-family:system-ui,sans-serif;margin:2em}} img{{max-width:48%;margin:4px}}
table{{border-collapse:collapse}} td,th{{border:1px solid #ddd;padding:2px 8px}}
pre{{background:#f6f6f6;padding:1em}}</style></head><body>
<h1>crossopd OPD run</h1><p>{html.escape(str(out_dir))}: {len(metrics)} steps logged.</p>
{"".join(f'<img src="{n}" alt="{n}">' for n in made)}
<h2>Held-out evaluations</h2><table><tr><th>step</th><th>reverse KL / byte</th>
<th>stop rate</th><th>accuracy</th><th>coverage</th></tr>{eval_rows}</table>
<h2>Samples, first and last evaluation</h2><table><tr><th>step</th><th>prompt</th>
<th>student response</th><th>answer</th></tr>{samples}</table>
<h2>Last step</h2><table>{rows}</table>
<h2>Config</h2><pre>{html.escape(json.dumps(json.loads(config), indent=2))}</pre>
</body></html>"""
    path = out_dir / "report.html"
    path.write_text(page, encoding="utf-8")
    return path
