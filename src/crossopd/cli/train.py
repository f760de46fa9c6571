"""``crossopd train`` and ``crossopd demo``: one run of the recipe, and the shipped demo run."""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any

from crossopd.models.hub import quiet_hf

DEMO_CONFIGS = {"gemma": "demo.yaml", "qwen": "demo_qwen.yaml"}


def demo_config_path(pair: str = "gemma") -> Path:
    """The shipped demo config of ``pair`` (what ``crossopd demo --pair PAIR`` runs; a config to
    copy). Held-out ``crossopd eval`` of a model from no run reads the Gemma one, whose teacher
    is the lighter."""
    from importlib.resources import files

    return Path(str(files("crossopd").joinpath("configs", DEMO_CONFIGS[pair])))


def cmd_train(args: argparse.Namespace) -> int:
    from crossopd.run.config import load_config, render_config_keys
    from crossopd.run.train import render_result, train

    if args.help_config:
        print(render_config_keys(), file=args.stdout)
        return 0
    config, overrides = args.config, list(args.overrides)
    if config is not None and "=" in config and not Path(config).exists():
        config, overrides = None, [config, *overrides]  # only overrides were given
    cfg = load_config(config, overrides)
    progress = not args.no_progress and not args.json
    quiet_hf()
    result = train(cfg, resume=args.resume, progress=progress, overwrite=args.overwrite)
    if int(os.environ.get("RANK", 0)) != 0:
        return 0  # one process reports
    print(json.dumps(result) if args.json else render_result(result), file=args.stdout)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Cross-family OPD on the bundled models: SmolLM2-135M learns from
    Qwen2.5-Coder-1.5B-Instruct (or, with ``--pair gemma``, from Gemma 3 270M base)."""
    from crossopd.run.config import load_config
    from crossopd.run.train import render_result, train

    cfg = load_config(demo_config_path(args.pair), list(args.overrides))
    quiet_hf()
    result = train(cfg, progress=not args.json, overwrite=True)  # the demo reruns from scratch
    keys = ("heldout_kl_before", "heldout_kl_after", "metric", "heldout_metric_before",
            "heldout_metric_after", "heldout_metric_change_se", "heldout_metric_se_before",
            "heldout_metric_se_after", "heldout_stop_rate_before", "heldout_stop_rate_after",
            "steps", "coverage", "report")
    out = {k: result.get(k) for k in keys}
    if args.json:
        print(json.dumps(out), file=args.stdout)
    else:
        print(render_result(result), file=args.stdout)
    return 0


def add_train_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``train`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    t = sub.add_parser("train", help="the OPD training recipe",
                       description="Train a student on-policy from a teacher of any family. "
                       "CONFIG is a YAML file (see docs/config.md; src/crossopd/configs/ has a "
                       "commented example); key=value overrides use dotted keys, e.g. "
                       "optim.lr=1e-5 rollout.max_new_tokens=128. engine=native (default) is "
                       "crossopd's own loop; engine=trl runs TRL's GRPOTrainer and works under "
                       "`torchrun -m crossopd train` and `accelerate launch -m crossopd train` "
                       "(docs/scale.md).")
    t.add_argument("config", nargs="?", help="YAML config file (optional: every key but the "
                   "teacher has a default)")
    t.add_argument("overrides", nargs="*", help="key=value overrides")
    t.add_argument("--resume", action="store_true", help="continue from the last checkpoint "
                   "(native: checkpoints/step_N; trl: checkpoint-N)")
    t.add_argument("--overwrite", action="store_true", help="start over in an output_dir that "
                   "holds a run (deletes its metrics and checkpoints; without it such a "
                   "directory is refused)")
    t.add_argument("--no-progress", action="store_true", help="no progress bar: one line per "
                   "step instead")
    t.add_argument("--json", action="store_true", help="print the result as one JSON object")
    t.add_argument("--help-config", action="store_true", help="list every config key with its "
                   "type, default and help, and exit")
    t.set_defaults(func=cmd_train)
    return t


def add_demo_parser(sub: Any) -> argparse.ArgumentParser:
    """The ``demo`` subparser on ``sub`` (an ``add_subparsers`` result)."""
    d = sub.add_parser("demo", help="short real cross-family OPD run on the bundled models",
                       description="Student SmolLM2-135M-Instruct learns from teacher "
                       "Qwen2.5-Coder-1.5B-Instruct (another family: its own tokenizer and chat "
                       "template; a system prompt only the teacher sees) to answer counting "
                       "questions about its prompt; prints held-out accuracy (with its paired "
                       "standard error), stop rate and reverse KL per byte before and after, "
                       "alignment statistics and the report path. About 5 minutes on 2 CPU "
                       "cores, the first run included (configs/demo_qwen.yaml). --pair gemma: "
                       "the teacher is Gemma 3 270M base (plain template, three worked "
                       "examples; configs/demo.yaml).")
    d.add_argument("overrides", nargs="*", help="key=value config overrides (e.g. steps=4)")
    d.add_argument("--pair", choices=sorted(DEMO_CONFIGS), default="qwen",
                   help="the teacher: qwen (Qwen2.5-Coder-1.5B-Instruct, the default) or gemma "
                   "(Gemma 3 270M base)")
    d.add_argument("--json", action="store_true", help="print one JSON object")
    d.set_defaults(func=cmd_demo)
    return d
