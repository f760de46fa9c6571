"""Engines: thin adapters that run the step library (``crossopd.opd``) inside a training loop,
under the one run lifecycle (``crossopd.lifecycle``, where they are registered)."""
