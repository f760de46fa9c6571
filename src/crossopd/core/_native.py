"""The compiled fast path (``_dpca.c``): DPCA on equal bytes and credit on fully aligned pairs.

The numpy code in ``align`` and ``credit`` is the reference and the fallback: without a C
compiler at install time, or with ``CROSSOPD_NATIVE=0``, everything still works.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import crossopd.core._dpca as _dpca  # a module (compiled), not a name
except ImportError:  # pragma: no cover - only without a C compiler at install time
    _dpca = None

dpca: Any = _dpca


def native_available() -> bool:
    return dpca is not None and os.environ.get("CROSSOPD_NATIVE", "1") != "0"
