"""Equal stretches of two byte strings that differ (a lossy normaliser, an ``<unk>``).

Used by ``align`` (chunks only inside equal stretches) and by ``ByteVocab.encode_bytes``
(re-spelling what a tokenizer's normaliser changed).
"""

from __future__ import annotations

import difflib

import numpy as np


def equal_blocks(a: bytes, b: bytes) -> np.ndarray:
    """Equal stretches ``(a_start, b_start, size)`` of two byte strings, in order, as an
    int64 array of shape ``[n, 3]``.

    Common prefix and suffix are taken directly so the O(n^2)-worst diff only sees the
    differing middle.
    """
    n = min(len(a), len(b))
    x = np.frombuffer(a, dtype=np.uint8)
    y = np.frombuffer(b, dtype=np.uint8)
    neq = np.flatnonzero(x[:n] != y[:n])
    pre = int(neq[0]) if neq.size else n
    neq_suf = np.flatnonzero(x[len(a) - n :][::-1] != y[len(b) - n :][::-1])
    suf = int(neq_suf[0]) if neq_suf.size else n
    suf = min(suf, n - pre)
    blocks = []
    if pre:
        blocks.append((0, 0, pre))
    mid = difflib.SequenceMatcher(
        None, a[pre : len(a) - suf], b[pre : len(b) - suf], autojunk=False
    )
    blocks += [(i + pre, j + pre, size) for i, j, size in mid.get_matching_blocks() if size]
    if suf:
        blocks.append((len(a) - suf, len(b) - suf, suf))
    return np.asarray(blocks, dtype=np.int64).reshape(-1, 3)
