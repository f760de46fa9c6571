"""Evaluation: held-out evaluation against the teachers, the benchmarks and their runs, the one
answer checker and the summaries."""
