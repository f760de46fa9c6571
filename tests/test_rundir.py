"""Run directories: a new run never deletes an old one unasked, and --resume refuses a config
that would continue a different run."""

from __future__ import annotations

import json

import pytest

from crossopd.run.config import TrainConfig
from crossopd.run.load import heldout_rows
from crossopd.run.rundir import RunDirError, config_changes, prepare

pytestmark = pytest.mark.core


def _run(tmp_path, **changes):
    cfg = TrainConfig(output_dir=str(tmp_path))
    for k, v in changes.items():
        setattr(cfg, k, v)
    return cfg.to_dict()


def test_new_run_refuses_a_directory_holding_a_run(tmp_path):
    prepare(tmp_path, _run(tmp_path), resume=False, overwrite=False)  # empty: fine
    (tmp_path / "metrics.jsonl").write_text('{"step": 1}\n')
    (tmp_path / "checkpoints" / "step_0000001").mkdir(parents=True)
    with pytest.raises(RunDirError, match="--resume.*--overwrite"):
        prepare(tmp_path, _run(tmp_path), resume=False, overwrite=False)
    assert (tmp_path / "metrics.jsonl").exists() and (tmp_path / "checkpoints").exists()
    prepare(tmp_path, _run(tmp_path), resume=False, overwrite=True)
    assert not (tmp_path / "metrics.jsonl").exists() and not (tmp_path / "checkpoints").exists()
    assert json.loads((tmp_path / "config.json").read_text())["output_dir"] == str(tmp_path)


def test_trl_checkpoints_count_as_a_run(tmp_path):
    (tmp_path / "checkpoint-2").mkdir()
    with pytest.raises(RunDirError, match="checkpoint-2"):
        prepare(tmp_path, _run(tmp_path), resume=False, overwrite=False)


def test_resume_refuses_changes_that_make_another_run(tmp_path):
    prepare(tmp_path, _run(tmp_path), resume=False, overwrite=False)
    with pytest.raises(RunDirError, match=r"batch_size: 8 -> 4.*data.path"):
        new = _run(tmp_path, batch_size=4)
        new["data"]["path"] = "other.jsonl"
        prepare(tmp_path, new, resume=True, overwrite=False)
    # longer runs, other eval/checkpoint cadence, another teacher URL: the same run
    ok = _run(tmp_path, steps=20, eval_every=5, checkpoint_every=2)
    ok["teacher"]["urls"] = ["http://elsewhere:8000"]
    prepare(tmp_path, ok, resume=True, overwrite=False)
    assert json.loads((tmp_path / "config.json").read_text())["steps"] == 20
    with pytest.raises(RunDirError, match="choose one"):
        prepare(tmp_path, ok, resume=True, overwrite=True)


def test_keys_of_another_version_are_not_compared():
    assert config_changes({"a": 1, "old_key": 2}, {"a": 1, "new_key": 3}) == []
    assert config_changes({"optim": {"lr": 1e-5}}, {"optim": {"lr": 2e-5}}) == \
        ["optim.lr: 1e-05 -> 2e-05"]


def test_small_files_hold_out_at_most_a_quarter():
    with pytest.warns(UserWarning, match="holding out 5"):
        assert heldout_rows(20, 16, "mine.jsonl") == 5
    assert heldout_rows(100, 16, "mine.jsonl") == 16
    with pytest.warns(UserWarning):
        assert heldout_rows(3, 16, "x") == 1
