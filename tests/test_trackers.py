"""``report_to``: every engine's metrics rows and held-out evaluations reach TensorBoard and W&B
(offline), read back from what those libraries wrote."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from crossopd.run.config import ConfigError, load_config

from conftest import PLAIN


def _overrides(tiny: dict, out: Path, *extra: str) -> list[str]:
    return [f"student.model={tiny['student']}", f"teacher.model={tiny['teacher']}",
            *(f"teacher.{k}={v}" for k, v in PLAIN.items()), "device=cpu",
            "rollout.samples_per_prompt=2", "rollout.max_new_tokens=8", "batch_size=2",
            "steps=2", "data.heldout_size=4", "eval_prompts=2", f"output_dir={out}", *extra]


def _rows(path: Path) -> list[dict]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def _event_scalars(log_dir: Path) -> dict[str, dict[int, float]]:
    """Every scalar in the TensorBoard event files under ``log_dir``: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out: dict[str, dict[int, float]] = {}
    files = sorted(log_dir.rglob("events.out.tfevents.*"))
    assert files, f"no event files under {log_dir}"
    for f in files:
        acc = EventAccumulator(str(f), size_guidance={"scalars": 0})
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            out.setdefault(tag, {}).update({e.step: e.value for e in acc.Scalars(tag)})
    return out


def _numbers(row: dict) -> dict[str, float]:
    return {k: float(v) for k, v in row.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def _check_tensorboard(out: Path) -> dict[str, dict[int, float]]:
    """Every number of every metrics row and evaluation is in the event files, at its step."""
    tb = _event_scalars(out / "tensorboard")
    for prefix, path in (("opd/", out / "metrics.jsonl"), ("eval/", out / "eval.jsonl")):
        rows = _rows(path)
        assert rows
        for row in rows:
            for key, value in _numbers(row).items():
                assert tb[prefix + key][row["step"]] == pytest.approx(value, rel=1e-6, abs=1e-6)
    return tb


@pytest.mark.parametrize("engine", ["native", "trl"])
def test_tensorboard_scalars_equal_the_metrics_files(tiny, tmp_path, engine, monkeypatch):
    from crossopd.run.train import train

    monkeypatch.delenv("TENSORBOARD_LOGGING_DIR", raising=False)
    out = tmp_path / engine
    cfg = load_config(None, _overrides(tiny, out, f"engine={engine}", "report_to=[tensorboard]"))
    train(cfg, progress=False)
    tb = _check_tensorboard(out)
    assert {0, 2} <= set(tb["eval/kl_per_byte"])  # before and after training
    if engine == "trl":  # TRL's own per-optimizer-step keys, in the same directory
        losses = {r["step"]: r["loss"] for r in _rows(out / "metrics.jsonl")}
        assert tb["train/loss"] == pytest.approx(losses)
        import os

        assert "TENSORBOARD_LOGGING_DIR" not in os.environ  # this run's value did not outlive it


def _wandb_history(run_file: Path) -> list[dict]:
    """The history rows of an offline W&B run, read from its ``.wandb`` transaction log (a
    LevelDB-style log of protobuf ``Record``s: a 7-byte header, then 32 KiB blocks of chunks
    with a 7-byte header each: CRC, length, type full/first/middle/last)."""
    import struct

    from wandb.proto import wandb_internal_pb2 as pb

    data, block = run_file.read_bytes(), 32768
    assert data.startswith(b":W&B")
    records, part, off = [], b"", 7
    while off < len(data):
        end = (off // block + 1) * block
        if end - off < 7:  # a block's tail too short for a header is padding
            off = end
            continue
        _, length, kind = struct.unpack("<IHB", data[off:off + 7])
        if length == 0 and kind == 0:
            off = end
            continue
        chunk, off = data[off + 7:off + 7 + length], off + 7 + length
        part = chunk if kind in (1, 2) else part + chunk
        if kind in (1, 4):
            records.append(part)
    rows = []
    for raw in records:
        record = pb.Record()
        record.ParseFromString(raw)
        if record.WhichOneof("record_type") == "history":
            rows.append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                         for i in record.history.item})
    return rows


def test_wandb_offline_run_records_the_same_keys(tiny, tmp_path, monkeypatch):
    """An offline W&B run gets every metrics row and evaluation, at its OPD step."""
    from crossopd.run.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "run"
    train(load_config(None, _overrides(tiny, out, "report_to=[wandb]")), progress=False)
    runs = sorted((out / "wandb").glob("offline-run-*/*.wandb"))
    assert len(runs) == 1
    history = _wandb_history(runs[0])
    for prefix, path in (("opd/", out / "metrics.jsonl"), ("eval/", out / "eval.jsonl")):
        for row in _rows(path):
            logged = [h for h in history if h.get("opd/step") == row["step"]
                      and any(k.startswith(prefix) and k != "opd/step" for k in h)]
            assert len(logged) == 1, (prefix, row["step"])
            for key, value in _numbers(row).items():
                assert logged[0][prefix + key] == pytest.approx(value, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("report_to, engine, message", [
    ("[mlflow]", "native", r"report_to: mlflow needs engine: trl"),
    ("[tensorbord]", "trl",
     r"unknown tracker\(s\) tensorbord; transformers supports .*tensorboard"),
    ("[none, wandb]", "native", r"none with other trackers"),
])
def test_bad_report_to_is_one_line(report_to, engine, message):
    with pytest.raises(ConfigError, match=message):
        load_config(None, ["teacher.model=gemma3-270m", f"engine={engine}",
                           f"report_to={report_to}", "rollout.samples_per_prompt=2"])
