"""crossopd on verl: cross-family OPD in verl's own (v1) trainer, as a plugin that edits nothing
in verl.

- ``plugin`` (the ``verl.plugins`` entry point, loaded on ``import verl``) registers crossopd's
  loss, policy loss and advantage estimator (``loss``), a CPU platform (``cpu_platform``) and a
  CPU rollout (``cpu_rollout``).
- ``settings``: the launch's ``crossopd:`` section and every check a launch must pass.
- ``worker``: the agent-loop manager and worker whose teacher step (``teacher_step``) is
  crossopd's: bridge, teacher scoring of the response bytes, DPCA, credit on the rollout
  log-probs; tokens without a signal leave ``response_mask``.
- ``targets``: that teacher step as plain functions of one sample (no verl types): a single
  response, or a trajectory of assistant turns and tool results.
- ``tool_agent``: ``crossopd_tool_agent``, verl's tool agent loop handing the worker the
  conversation it kept (what the teacher's rendering of a trajectory needs).
- ``sampler``: verl's replay buffer reporting crossopd's per-step counts (``opd/...``).
- ``check`` (``python -m crossopd.integrations.verl.check``) compares the worker's step and the
  losses with the native step library; ``smoke`` (``python -m
  crossopd.integrations.verl.smoke``) runs a shipped launch, scaled down, through verl's own
  trainer on the CPU.

docs/scale.md has the launches, verl's keys and crossopd's, and what has and has not run.
"""
