"""Engines: thin adapters that run the step library (``crossopd.step``) inside a training loop,
under the one run lifecycle (``crossopd.run.lifecycle``); registered in
``crossopd.run.registry``."""
