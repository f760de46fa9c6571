"""Benchmarks (``crossopd bench ...``): they build on the step library, never on the recipe."""
