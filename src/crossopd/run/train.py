"""``crossopd train``: one run of the engine the config names, under the one run lifecycle
(``crossopd.run.lifecycle``), and what the command prints at the end."""

from __future__ import annotations

from crossopd.run.config import TrainConfig
from crossopd.run.lifecycle import train_run
from crossopd.step.sides import StudentSide, TeacherSide


def train(cfg: TrainConfig, resume: bool = False, progress: bool = True,
          overwrite: bool = False,
          sides: tuple[StudentSide, dict[str, TeacherSide]] | None = None) -> dict:
    """Run ``cfg`` to its last step. ``resume``: continue the run in ``output_dir`` from its
    newest checkpoint; ``overwrite``: start over in an ``output_dir`` that holds a run (else
    refused); ``sides``: an already built student and teachers instead of loading them."""
    return train_run(cfg, resume=resume, progress=progress, overwrite=overwrite, sides=sides)


def render_result(result: dict) -> str:
    """What ``crossopd train`` and ``crossopd demo`` print at the end of a run."""
    lines = []
    if result["heldout_kl_before"] is not None:
        lines.append(f"{'held-out':<26} {'before':>8} {'after':>8}")
        rows = [("reverse KL per byte", "heldout_kl"), ("stop rate", "heldout_stop_rate")]
        if result.get("metric"):
            rows.insert(1, (result["metric"], "heldout_metric"))
        for label, key in rows:
            line = f"{label:<26} {result[key + '_before']:>8.4f} {result[key + '_after']:>8.4f}"
            if key == "heldout_metric" and "heldout_metric_change_se" in result:
                change = result["heldout_metric_after"] - result["heldout_metric_before"]
                se = result["heldout_metric_change_se"]
                line += f"   change {change:+.3f} (paired SE {se:.3f})"
            lines.append(line)
    if result.get("final_eval"):
        e = result["final_eval"]
        lines.append(f"alignment: coverage {e['coverage']:.4f}, 1:1 chunk share "
                     f"{e['one_to_one_share']:.3f}, stop rate {e['stop_rate']:.3f}"
                     + (f", accuracy {e['accuracy']:.3f}" if "accuracy" in e else ""))
    if result.get("overflowed_sequences"):
        lines.append(f"warning: {result['overflowed_sequences']} training sequences overflowed "
                     "the teacher's context and got no signal (metrics.jsonl: "
                     "overflowed_sequences)")
    if result.get("final"):
        lines.append(f"student: {result['final']} (a Hugging Face model directory)")
    lines.append(f"report: {result['report']}")
    return "\n".join(lines)
