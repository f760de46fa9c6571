"""Builds the teacher pairs and student that ship with crossopd for ``bench learn``'s quick and
standard presets into ``src/crossopd/bench/learn_teachers/`` (what ``--retrain-teachers`` does
into the cache). Run it when model, tokenizer or training code changes, with ``VERSION`` in
``bench/learn_teachers.py`` bumped, and commit the directory.

    python scripts/ship_learn_teachers.py
"""

from __future__ import annotations

import json

from crossopd.bench.learn import PRESETS, splits
from crossopd.bench.learn_teachers import SHIPPED, build_artifacts


def main() -> None:
    preset = PRESETS["standard"]
    build_artifacts(preset, preset.teacher_pairs, SHIPPED, splits(preset))
    manifest = json.loads((SHIPPED / "manifest.json").read_text())
    print(json.dumps(manifest["trained"], indent=1))


if __name__ == "__main__":
    main()
