"""Checkpoints survive faults: a damaged latest checkpoint falls back to the one before it, a
killed writer's temp directory is ignored, and a full disk leaves the previous checkpoint
intact with an error that says what to do."""

from __future__ import annotations

import subprocess

import pytest
import torch

from crossopd.run import checkpoint as ckpt


def _state(seed: int, width: int = 16):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=width, n_layer=1,
                                       n_head=2, bos_token_id=0, eos_token_id=0))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.tensor([[1, 2, 3]]), labels=torch.tensor([[1, 2, 3]])).loss.backward()
    opt.step()
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, opt, sched


def _weights(model) -> dict:
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_damaged_latest_checkpoint_falls_back(tmp_path):
    m1, o1, s1 = _state(1)
    ckpt.save(tmp_path, 1, m1, o1, s1, keep=3)
    first = _weights(m1)
    m2, o2, s2 = _state(2)
    latest = ckpt.save(tmp_path, 2, m2, o2, s2, keep=3)
    weights = latest / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # truncated
    model, opt, sched = _state(3)
    with pytest.warns(UserWarning, match="step_0000002 is damaged.*model.safetensors"):
        assert ckpt.restore_latest(tmp_path, model, opt, sched) == 1
    assert all(torch.equal(v, first[k]) for k, v in model.state_dict().items())
    (tmp_path / "checkpoints" / "step_0000001" / "trainer_state.pt").write_bytes(b"junk")
    with pytest.raises(RuntimeError, match="every checkpoint.*--overwrite"), \
            pytest.warns(UserWarning):
        ckpt.restore_latest(tmp_path, model, opt, sched)


def test_killed_writer_leaves_only_a_temp_dir(tmp_path):
    m, o, s = _state(1)
    ckpt.save(tmp_path, 1, m, o, s, keep=2)
    # what SIGKILL mid-write leaves: a temp sibling with some files
    tmp = tmp_path / "checkpoints" / "step_0000002.tmpab12"
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"partial")
    assert [p.name for p in ckpt.completed(tmp_path)] == ["step_0000001"]
    model, opt, sched = _state(2)
    assert ckpt.restore_latest(tmp_path, model, opt, sched) == 1


@pytest.fixture()
def small_disk(tmp_path):
    """A real 600 KiB filesystem (tmpfs); skipped where mounting is not permitted."""
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=600k", "tmpfs", str(mnt)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here: {r.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_disk_full_keeps_the_previous_checkpoint(small_disk):
    m, o, s = _state(1, width=48)
    first = ckpt.save(small_disk, 1, m, o, s, keep=2)
    size = sum(p.stat().st_size for p in first.iterdir())
    assert 300_000 < size < 600_000  # one fits, two do not
    with pytest.raises(RuntimeError, match=r"step 2 .*previous checkpoint \(step 1\) is intact"):
        ckpt.save(small_disk, 2, m, o, s, keep=2)
    assert [p.name for p in ckpt.completed(small_disk)] == ["step_0000001"]
    assert ckpt.verify(first) is None
    assert not list((small_disk / "checkpoints").glob("*.tmp*"))  # the partial write is gone
