"""The training recipe: config and its checks, loading the sides, the run directory,
checkpoints, trackers, the report, the lifecycle every engine runs under, the engine registry."""
