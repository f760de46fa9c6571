"""The machine a benchmark ran on, recorded in its JSON: floating-point results are bit-for-bit
the same only on one CPU model, so every result names it."""

from __future__ import annotations

import os
import platform
from pathlib import Path


def cpu_model() -> str:
    """``/proc/cpuinfo``'s model name with its family, model and stepping (a virtual machine
    often reports only the vendor's line name); ``platform.processor()`` elsewhere."""
    info: dict[str, str] = {}
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, sep, value = line.partition(":")
            if sep and key.strip() not in info:
                info[key.strip()] = value.strip()
    except OSError:
        return platform.processor() or platform.machine()
    name = info.get("model name", platform.processor() or platform.machine())
    ids = [f"{k} {info[k]}" for k in ("cpu family", "model", "stepping") if k in info]
    return f"{name} ({', '.join(ids)})" if ids else name


def machine() -> dict:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": cpu_model(), "cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch": torch.__version__, "gpu": gpu}
