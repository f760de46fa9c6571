"""crossopd on verl: cross-family OPD in verl's own trainer, as a plugin that edits nothing in
verl.

- ``plugin`` (the ``verl.plugins`` entry point, loaded on ``import verl``) registers the
  ``crossopd`` distillation loss (``loss``): crossopd's PPO-clip with dual clip and token mean.
- ``worker`` holds the agent-loop manager and worker whose teacher step is crossopd's: bridge,
  teacher scoring of the response bytes, DPCA, credit on the rollout log-probs; the targets go
  into ``teacher_logprobs`` and tokens without a signal leave ``response_mask``.
- ``targets`` is that teacher step as plain functions of one sample (no verl types).
- ``check`` (``python -m crossopd.integrations.verl.check``) compares all of it with the native
  step library on CPU.

docs/scale.md has the launch, verl's keys and crossopd's, and what has and has not run.
"""
