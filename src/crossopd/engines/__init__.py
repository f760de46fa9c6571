"""Engines: thin adapters that run the step library (``crossopd.opd``) inside a training loop,
under the one run lifecycle (``crossopd.lifecycle``).

``ENGINES`` is the registration: ``engine: NAME`` in a config runs ``ENGINES[NAME]``, a
``module:Class`` imported on use (so an engine's framework loads only when it runs). A new
engine is one module with a class that follows ``crossopd.lifecycle.Engine`` plus one line here.
"""

ENGINES: dict[str, str] = {
    "native": "crossopd.engines.native:NativeEngine",  # crossopd's own loop, the reference
    "trl": "crossopd.engines.trl:TRLEngine",  # TRL's GRPOTrainer (needs the trl extra)
}
