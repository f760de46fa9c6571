"""The engine registry: ``engine: NAME`` in a config runs ``ENGINES[NAME]``, a ``module:Class``
imported on use, so an engine's framework loads only when it runs and the run layer never
imports an engine. A new engine is one module with a class that follows
``crossopd.run.lifecycle.Engine`` plus one line here."""

from __future__ import annotations

import importlib
from typing import Any

ENGINES: dict[str, str] = {
    "native": "crossopd.engines.native:NativeEngine",  # crossopd's own loop, the reference
    "trl": "crossopd.engines.trl:TRLEngine",  # TRL's GRPOTrainer (needs the trl extra)
}


def engine_for(name: str) -> Any:
    """A fresh engine of the registered ``name``."""
    module, cls = ENGINES[name].split(":")
    return getattr(importlib.import_module(module), cls)()
