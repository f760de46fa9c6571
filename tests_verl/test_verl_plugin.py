"""crossopd's verl plugin with verl 0.9.1's real classes, on CPU (run in .venv-verl: `make
test` does): registration through the entry point, the worker's teacher step and the loss
against the native step library, one-line errors, and the shipped launches composed by hydra
against verl's config classes."""

from __future__ import annotations

import json
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_entry_point_registers_the_loss_on_import_verl():
    """A fresh process: `import verl` alone must load the plugin (verl logs load errors only at
    debug level, so the registry is what tells)."""
    code = ("import verl; from verl.trainer.distillation.losses import "
            "DISTILLATION_LOSS_REGISTRY as R, get_distillation_loss_settings as s; "
            "print('crossopd' in R, s('crossopd').use_estimator)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split() == ["True", "True"], out.stderr[-2000:]


@pytest.mark.parametrize("data", [None, "examples/verl/multiturn_chat.jsonl"])
def test_worker_and_loss_match_the_native_step(data, capsys):
    """The worker's teacher step (verl's postprocessing and batching) gives the native step's
    targets and signal mask, and verl's distillation loss with loss_mode=crossopd is crossopd's
    policy loss: on the bundled prompts and on multi-turn chat prompts."""
    from crossopd.integrations.verl.check import main

    args = ["--limit", "6", "--json"] + (["--data", str(ROOT / data)] if data else [])
    code = main(args)
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ok"], r
    assert r["plugin_loaded"] and r["mask_equal"] and r["sequences"] == 6
    assert r["max_abs_diff_targets"] <= 1e-6 and r["max_abs_diff_loss"] <= 1e-9
    assert r["signal_tokens"] > 0


def _cfg(**sections):
    from omegaconf import OmegaConf

    return OmegaConf.create(sections)


def test_missing_teacher_is_one_line():
    from crossopd.config import ConfigError
    from crossopd.integrations.verl.worker import settings_from

    with pytest.raises(ConfigError, match=r"^crossopd: no teacher: set \+crossopd.teacher.urls"):
        settings_from(_cfg(distillation={"enabled": False}))
    with pytest.raises(ConfigError, match="unknown key.*crossopd.teacher.url\\b"):
        settings_from(_cfg(crossopd={"teacher": {"url": "http://x"}}))
    with pytest.raises(ConfigError, match="crossopd.credit_rule: unknown credit rule"):
        settings_from(_cfg(crossopd={"credit_rule": "propotional",
                                     "teacher": {"urls": ["http://x"]}}))


def test_multi_turn_trajectory_is_refused_in_one_line():
    """A response with tool tokens inside it (mask 0) is never scored as one response."""
    import asyncio

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.hub import load_hf_tokenizer
    from crossopd.integrations.verl.check import build_step
    from crossopd.integrations.verl.targets import TrajectoryError

    step = build_step(load_hf_tokenizer("smollm2"))
    out = AgentLoopOutput(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7],
                          response_mask=[1, 0, 0, 1], response_logprobs=[-1.0] * 4,
                          num_turns=4, metrics=AgentLoopMetrics())
    with pytest.raises(TrajectoryError, match="multi-turn trajectory \\(4 turns, 2 tool/user"):
        asyncio.run(step.run(out, {"raw_prompt": [{"role": "user", "content": "hi"}]}))


def test_teacher_pool_without_context_for_the_teacher_side_is_one_line():
    from crossopd.bridge import ChatFormat, TeacherContext
    from crossopd.config import ConfigError
    from crossopd.hub import load_hf_tokenizer
    from crossopd.integrations.verl.worker import pool_context_check, student_side
    from crossopd.sides import TeacherSide

    student = student_side(load_hf_tokenizer("smollm2"))
    t_tok = load_hf_tokenizer("gemma3-270m")
    fmt = ChatFormat.from_tokenizer(t_tok, plain_template="Question: {prompt}\nAnswer:",
                                    stop="\n\nQuestion:")
    teacher = TeacherSide("teacher", None, fmt, student.vocab,  # type: ignore[arg-type]
                          TeacherContext(system="Worked examples: " + "x " * 300))
    pool_context_check(teacher, student, 4096, 1024, 1024)  # room enough
    with pytest.raises(ConfigError, match="max_model_len 2049 cannot hold a full sample"):
        pool_context_check(teacher, student, 2049, 1024, 1024)


def test_loss_refuses_settings_that_would_change_it():
    from verl.workers.config import ActorConfig, DistillationConfig, DistillationLossConfig

    from crossopd.integrations.verl.loss import LossSettingsError, loss_config

    actor = ActorConfig(strategy="fsdp", ppo_mini_batch_size=2, rollout_n=1,
                        ppo_micro_batch_size_per_gpu=2, clip_ratio_c=10.0)
    for kwargs, msg in (({"use_policy_gradient": True}, "use_policy_gradient=False"),
                        ({"use_policy_gradient": False, "loss_max_clamp": 10.0},
                         "loss_max_clamp=null")):
        dist = DistillationConfig(distillation_loss=DistillationLossConfig(
            loss_mode="crossopd", **kwargs))
        with pytest.raises(LossSettingsError, match=msg):
            loss_config(actor, dist)
    ok = DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode="crossopd", use_policy_gradient=False, loss_max_clamp=None,
        clip_ratio_low=0.2, clip_ratio_high=0.28))
    cfg = loss_config(actor, ok)
    assert (cfg.clip_low, cfg.clip_high, cfg.dual_clip, cfg.adv_clamp) == (0.2, 0.28, 10.0, 10.0)


def test_private_api_of_the_worker_is_the_one_it_was_written_for():
    from crossopd.integrations.verl.worker import SIGNATURES, check_private_api

    check_private_api()
    assert len(SIGNATURES) == 3


def overrides(script: Path) -> list[str]:
    """The `key=value` arguments of a shipped launch script's `verl.trainer.main_ppo` call."""
    text = script.read_text()
    call = text[text.index("verl.trainer.main_ppo") + len("verl.trainer.main_ppo"):]
    return [t for t in shlex.split(call.replace("\\\n", " "), comments=True) if "=" in t]


@pytest.mark.parametrize("script", sorted((ROOT / "examples" / "verl").glob("*.sh")),
                         ids=lambda p: p.name)
def test_shipped_launches_compose_and_validate(script):
    """hydra composes verl's own ppo_trainer config with each script's overrides; the
    distillation, actor and rollout sections validate against verl's config classes and the
    crossopd section against crossopd's."""
    from hydra import compose, initialize_config_dir
    from verl.trainer.config import __file__ as config_init
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import ActorConfig, DistillationConfig

    from crossopd.integrations.verl.loss import loss_config
    from crossopd.integrations.verl.worker import settings_from

    with initialize_config_dir(config_dir=str(Path(config_init).parent), version_base=None):
        cfg = compose(config_name="ppo_trainer", overrides=overrides(script))
    assert cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class == \
        "crossopd.integrations.verl.worker.CrossOPDAgentLoopManager"
    dist = omega_conf_to_dataclass(cfg.distillation)
    assert isinstance(dist, DistillationConfig) and dist.enabled
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # its _target_: FSDPActorConfig
    assert isinstance(actor, ActorConfig)
    lc = loss_config(actor, dist)
    assert (lc.clip_low, lc.clip_high, lc.dual_clip) == (0.2, 0.28, 10.0)
    assert cfg.actor_rollout_ref.rollout.calculate_log_probs and cfg.data.return_raw_chat
    settings = settings_from(cfg)
    assert settings.credit_rule == "proportional"


def test_the_environment_has_what_verls_trainers_import():
    """`make verl-env` installs verl's v1 trainer imports (TransferQueue) and its agent loop's."""
    import importlib

    for name in ("verl.trainer.ppo.v1.trainer_base", "verl.experimental.agent_loop.agent_loop",
                 "verl.trainer.main_ppo"):
        importlib.import_module(name)


def test_two_teachers_routed_by_the_samples_data_source():
    """`+crossopd.teachers.<name>`: each sample goes to the teacher its data_source names, and
    the batch metrics have each teacher's counts; an unknown name is one line."""
    import asyncio

    import numpy as np
    import torch
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.hub import load_hf_tokenizer
    from crossopd.integrations.verl.check import PLAIN
    from crossopd.integrations.verl.worker import opd_metrics, teacher_step

    s_tok = load_hf_tokenizer("smollm2")
    config = OmegaConf.create({"crossopd": {"teachers": {
        "gemma": {"model": "gemma3-270m", **PLAIN}, "smol": {"model": "smollm2"}}}})
    step = teacher_step(config, s_tok)
    messages = [{"role": "user", "content": "Nina has 9 pears. How many pears?"}]
    response = s_tok("Nina has 9 pears.", add_special_tokens=False)["input_ids"]
    prompt = step.student.fmt.prompt_ids(messages)
    stats = []
    for source in ("gemma", "smol", "gemma"):
        out = AgentLoopOutput(prompt_ids=prompt, response_ids=list(response),
                              response_mask=[1] * len(response),
                              response_logprobs=[-1.0] * len(response), num_turns=2,
                              metrics=AgentLoopMetrics())
        asyncio.run(step.run(out, {"raw_prompt": messages, "data_source": np.array(source)}))
        assert out.extra_fields["crossopd_stats"]["teacher"] == source
        assert torch.isfinite(out.extra_fields["teacher_logprobs"]).all()
        stats.append(out.extra_fields["crossopd_stats"])
    m = opd_metrics(stats)
    assert m["opd/teachers/gemma/sequences"] == 2 and m["opd/teachers/smol/sequences"] == 1
    assert m["opd/teachers/smol/one_to_one_share"] == 1.0 and m["opd/sequences"] == 3
    with pytest.raises(ValueError, match="data_source is 'phi', which names no teacher; "
                                         "crossopd.teachers: gemma, smol"):
        asyncio.run(step.run(out, {"raw_prompt": messages, "data_source": "phi"}))
