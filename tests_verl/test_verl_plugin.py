"""crossopd's verl plugin with verl 0.9.1's real classes, on CPU (run in .venv-verl: `make
test` does): registration through the entry point, the worker's teacher step and both losses
against the native step library, one-line errors, and the shipped launches composed by hydra and
validated by verl's own `validate_config` and by crossopd's launch check. verl's whole trainer
runs in test_verl_smoke.py."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).parents[1]
SCRIPTS = sorted((ROOT / "examples" / "verl").glob("*.sh"))


def test_entry_point_registers_crossopd_on_import_verl():
    """A fresh process: `import verl` alone must load the plugin (verl logs load errors only at
    debug level, so the registries are what tell)."""
    code = ("import verl; from crossopd.integrations.verl.check import plugin_loaded; "
            "from verl.trainer.distillation.losses import get_distillation_loss_settings as s; "
            "print(plugin_loaded(), s('crossopd').use_estimator)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=300)
    assert out.stdout.split()[-2:] == ["True", "True"], out.stderr[-2000:]


@pytest.mark.parametrize("data", [None, "examples/verl/multiturn_chat.jsonl"])
def test_worker_and_losses_match_the_native_step(data, tiny, capsys):
    """The worker's teacher step in both modes gives the native step's targets, advantages and
    signal mask; verl's distillation loss with loss_mode=crossopd and verl's PPO loss on the
    crossopd estimator's advantages are crossopd's policy loss: on the bundled prompts and on
    multi-turn chat prompts."""
    from crossopd.integrations.verl.check import main

    # the tiny pair (real SmolLM2 and Gemma 3 tokenizers): docs/scale.md has the bundled one's
    args = ["--limit", "6", "--json", "--student", tiny["student"], "--teacher",
            tiny["teacher"]] + (["--data", str(ROOT / data)] if data else [])
    code = main(args)
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ok"], r
    assert r["plugin_loaded"] and r["mask_equal"] and r["sequences"] == 6
    assert r["max_abs_diff_targets"] <= 1e-6 and r["max_abs_diff_advantages"] <= 1e-6
    assert r["max_abs_diff_loss"] <= 1e-9 and r["max_abs_diff_policy_loss"] <= 1e-6
    assert r["signal_tokens"] > 0


def test_worker_scores_tool_trajectories_as_the_native_step(tiny, tool_teacher, capsys):
    """Complete tool-calling trajectories (a file of chat messages with assistant, tool and
    user turns) handed to the worker as crossopd's tool agent loop hands them over: its
    targets, mask and counts are the native step library's on the same trajectories, and
    verl's losses on them are crossopd's."""
    from crossopd.integrations.verl.check import main

    code = main(["--data", str(ROOT / "examples" / "trajectories.jsonl"), "--student",
                 tiny["student"], "--teacher", tool_teacher, "--json"])
    r = json.loads(capsys.readouterr().out)
    assert code == 0 and r["ok"], r
    assert r["sequences"] == 3 and r["assistant_turns"] == 6
    assert r["env_tokens"] > 0 and r["format_tokens"] > 0 and r["signal_tokens"] > 0
    assert r["mask_equal"] and r["max_abs_diff_targets"] <= 1e-6
    assert r["max_abs_diff_stats"] <= 1e-9 and r["max_abs_diff_loss"] <= 1e-9


def test_the_verl_environment_tokenizes_the_bundled_gemma_in_words():
    """transformers 5.10 (verl's pin) converts Gemma 3's GGUF tokenizer without its merges (one
    token per character, no BOS): crossopd must use a sound conversion instead."""
    from crossopd.models.hub import load_hf_tokenizer

    tok = load_hf_tokenizer("gemma3-270m")
    assert tok.tokenize("The quick brown fox") == ["The", "▁quick", "▁brown", "▁fox"]
    assert tok("hi")["input_ids"][0] == tok.bos_token_id


def _cfg(**sections):
    from omegaconf import OmegaConf

    return OmegaConf.create(sections)


def test_missing_teacher_is_one_line():
    from crossopd.integrations.verl.settings import settings_from
    from crossopd.run.config import ConfigError

    with pytest.raises(ConfigError, match=r"^crossopd: no teacher: set \+crossopd.teacher.urls"):
        settings_from(_cfg(distillation={"enabled": False}))
    with pytest.raises(ConfigError, match="unknown key.*crossopd.teacher.url\\b"):
        settings_from(_cfg(crossopd={"teacher": {"url": "http://x"}}))
    with pytest.raises(ConfigError, match="crossopd.credit_rule: unknown credit rule"):
        settings_from(_cfg(crossopd={"credit_rule": "propotional",
                                     "teacher": {"urls": ["http://x"]}}))


def test_multi_turn_trajectory_is_refused_in_one_line(tiny):
    """A response with tool tokens inside it (mask 0) is never scored as one response."""
    import asyncio

    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.integrations.verl.check import build_step
    from crossopd.integrations.verl.targets import TrajectoryError
    from crossopd.models.hub import load_hf_tokenizer

    step = build_step(load_hf_tokenizer("smollm2"), tiny["teacher"])
    out = AgentLoopOutput(prompt_ids=[1, 2, 3], response_ids=[4, 5, 6, 7],
                          response_mask=[1, 0, 0, 1], response_logprobs=[-1.0] * 4,
                          num_turns=4, metrics=AgentLoopMetrics())
    with pytest.raises(TrajectoryError, match="multi-turn trajectory \\(4 turns, 2 tool/user"):
        asyncio.run(step.run(out, {"raw_prompt": [{"role": "user", "content": "hi"}]}))


def test_teacher_pool_without_context_for_the_teacher_side_is_one_line():
    from crossopd.integrations.verl.teacher_step import pool_context_check, student_side
    from crossopd.models.hub import load_hf_tokenizer
    from crossopd.run.config import ConfigError
    from crossopd.step.bridge import ChatFormat, TeacherContext
    from crossopd.step.sides import TeacherSide

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


def _micro_batch(mask_rows, batch_num_tokens):
    """A padded micro-batch of two 3-token responses after a 2-token prompt, as verl's engine
    hands it to a distillation loss."""
    from tensordict import TensorDict
    from verl.utils.tensordict_utils import assign_non_tensor

    mask = torch.tensor(mask_rows, dtype=torch.bool)
    data = TensorDict({"prompts": torch.ones(2, 2, dtype=torch.long),
                       "responses": torch.ones(2, 3, dtype=torch.long),
                       "attention_mask": torch.ones(2, 5, dtype=torch.long),
                       "response_mask": mask, "old_log_probs": torch.full((2, 3), -1.0),
                       "teacher_logprobs": torch.full((10, 1), -0.5)}, batch_size=[])
    assign_non_tensor(data, dp_size=1, batch_num_tokens=batch_num_tokens, global_batch_size=2)
    return data


@pytest.mark.parametrize("tokens", [0, 3], ids=["no-signal-in-the-mini-batch",
                                                "signal-elsewhere"])
def test_a_micro_batch_without_signal_trains_nothing_and_does_not_crash(tokens):
    """Every sequence of a micro-batch overflowed (mask all zero): verl's loss-range metric took
    `.min()` of nothing and crashed. Now the loss is exactly 0 (no gradient), as the native
    engine's token mean over max(tokens, 1) gives, also when the whole mini-batch has none."""
    from verl.trainer.distillation.losses import distillation_loss
    from verl.workers.config import DistillationConfig, DistillationLossConfig

    from crossopd.integrations.verl.check import actor_config

    dist = DistillationConfig(distillation_loss=DistillationLossConfig(
        loss_mode="crossopd", use_policy_gradient=False, loss_max_clamp=None))
    logps = torch.full((10,), -1.0, requires_grad=True)
    loss, metrics = distillation_loss(actor_config(2), dist, {"log_probs": logps},
                                      _micro_batch([[0, 0, 0], [0, 0, 0]], tokens))
    assert float(loss.detach()) == 0.0 and not torch.isnan(loss)
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(10))
    assert [float(v) for v in metrics["distillation/loss_max"].values] == [0.0]


def test_the_policy_loss_of_a_mini_batch_without_signal_is_zero():
    from crossopd.integrations.verl.check import actor_config
    from crossopd.integrations.verl.loss import crossopd_policy_loss

    cfg = actor_config(2)
    cfg.global_batch_info.update(dp_size=1, batch_num_tokens=0, global_batch_size=2)
    logps = torch.full((2, 3), -1.0, requires_grad=True)
    loss, _ = crossopd_policy_loss(torch.full((2, 3), -1.2), logps, torch.ones(2, 3),
                                   torch.zeros(2, 3, dtype=torch.bool), config=cfg)
    assert float(loss.detach()) == 0.0
    loss.backward()
    assert torch.equal(logps.grad, torch.zeros(2, 3))


def test_private_api_of_the_worker_is_the_one_it_was_written_for(monkeypatch):
    """Every verl method the worker and the tool agent loop extend has the signature they were
    written for; one that changed is refused in one line."""
    from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

    from crossopd.integrations.verl import worker

    worker.check_private_api()
    assert (ToolAgentLoop, "_handle_pending_state") in worker.SIGNATURES
    monkeypatch.setitem(worker.SIGNATURES, (ToolAgentLoop, "run"), ("sampling_params",))
    with pytest.raises(ImportError, match="ToolAgentLoop.run takes \\(sampling_params, "
                                          "priority, kwargs\\), not \\(sampling_params\\)"):
        worker.check_private_api()


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_shipped_launches_pass_verls_validate_config_and_crossopds_check(script):
    """What `python -m verl.trainer.main_ppo` does before it starts Ray: hydra composes verl's
    own ppo_trainer config with the script's overrides and verl's `validate_config` accepts it
    (the launches as first shipped failed here: no log_prob_micro_batch_size_per_gpu). Then
    crossopd's launch check, which the agent-loop manager runs first, accepts it."""
    from verl.utils.config import omega_conf_to_dataclass
    from verl.workers.config import ActorConfig

    from crossopd.integrations.verl.launch import compose, script_overrides, validate
    from crossopd.integrations.verl.settings import check_launch

    cfg = compose(script_overrides(script))
    validate(cfg)
    settings = check_launch(cfg)
    assert cfg.actor_rollout_ref.rollout.agent.agent_loop_manager_class == \
        "crossopd.integrations.verl.worker.CrossOPDAgentLoopManager"
    actor = omega_conf_to_dataclass(cfg.actor_rollout_ref.actor)  # its _target_: FSDPActorConfig
    assert isinstance(actor, ActorConfig) and actor.clip_ratio_c == 10.0
    if settings.mode == "pool":
        from verl.workers.config import DistillationConfig

        from crossopd.integrations.verl.loss import loss_config

        dist = omega_conf_to_dataclass(cfg.distillation)
        assert isinstance(dist, DistillationConfig) and dist.enabled
        lc = loss_config(actor, dist)
        assert (lc.clip_low, lc.clip_high, lc.dual_clip) == (0.2, 0.28, 10.0)
    else:  # crossopd's own teacher: no teacher pool, whose 0 nodes verl refuses
        assert not cfg.distillation.enabled and cfg.algorithm.adv_estimator == "crossopd"
        assert (actor.clip_ratio_low, actor.clip_ratio_high) == (0.2, 0.28)
    assert settings.credit_rule == "proportional"


@pytest.mark.parametrize("mode", ["http", "pool", "builtin"])
def test_the_smoke_runs_settings_pass_validate_config(mode, tmp_path):
    """The scaled-down launches the smoke command runs, on the CPU and on a GPU, are verl-valid
    too (and crossopd-valid)."""
    from crossopd.integrations.verl.launch import compose, validate
    from crossopd.integrations.verl.settings import check_launch
    from crossopd.integrations.verl.smoke import EXAMPLES, PLAIN, SCRIPTS, Launch, overrides

    for device, rollout in (("cpu", "hf"), ("cuda", "vllm")):
        launch = Launch(mode, "/s", "/t", PLAIN, (tmp_path / "a.parquet", tmp_path / "b.parquet"),
                        tmp_path, url="http://127.0.0.1:1/v1", device=device)
        cfg = compose(overrides(EXAMPLES / SCRIPTS[mode], launch))
        validate(cfg)
        assert cfg.trainer.total_training_steps == 2 and cfg.trainer.device == device
        assert cfg.actor_rollout_ref.rollout.name == rollout
        if mode != "builtin":
            check_launch(cfg)
            assert cfg.crossopd.teacher.plain_template == PLAIN["plain_template"]


def _launch(changes, drop=()):
    from crossopd.integrations.verl.launch import compose, merge, script_overrides

    base = [o for o in script_overrides(ROOT / "examples/verl/one_gpu_vllm_teacher.sh")
            if not o.lstrip("+").startswith(drop)]
    return compose(merge(base, changes))


@pytest.mark.parametrize("changes, drop, message", [
    ({"trainer.use_v1": False}, (), "runs on verl's v1 trainer \\(trainer.use_v1=True"),
    ({"distillation.enabled": True}, (), "set distillation.enabled=False"),
    ({"algorithm.adv_estimator": "grpo"}, (), "set algorithm.adv_estimator=crossopd"),
    ({"trainer.v1.sampler.custom_sampler.path": None}, (),
     "set trainer.v1.sampler.custom_sampler.path=pkg://crossopd.integrations.verl.sampler"),
    ({"+crossopd.teacher.model": "gemma3-270m"}, ("crossopd.teacher.urls",),
     "would load the teacher in each of the 8 agent-loop workers.*serve it"),
    ({"actor_rollout_ref.actor.use_kl_loss": True}, (), "use_kl_loss=False"),
])
def test_a_launch_crossopd_cannot_run_is_refused_in_one_line(changes, drop, message):
    """The legacy trainer, verl's teacher pool beside crossopd's own teacher, a missing
    estimator or sampler, an in-process teacher loaded once per agent-loop worker (8 by
    default), a KL term on top of OPD's: each is one line naming the key."""
    from crossopd.integrations.verl.settings import check_launch
    from crossopd.run.config import ConfigError

    with pytest.raises(ConfigError, match=message):
        check_launch(_launch(changes, drop))


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
    from omegaconf import OmegaConf
    from verl.experimental.agent_loop.agent_loop import AgentLoopMetrics, AgentLoopOutput

    from crossopd.integrations.verl.check import PLAIN
    from crossopd.integrations.verl.teacher_step import opd_metrics, teacher_step
    from crossopd.models.hub import load_hf_tokenizer

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
        adv = asyncio.run(step.run(out, {"raw_prompt": messages, "data_source": np.array(source)}))
        assert out.extra_fields["crossopd_stats"]["teacher"] == source
        assert adv.shape == (len(response),) and torch.isfinite(adv).all()
        stats.append(out.extra_fields["crossopd_stats"])
    m = opd_metrics(stats)
    assert m["opd/teachers/gemma/sequences"] == 2 and m["opd/teachers/smol/sequences"] == 1
    assert m["opd/teachers/smol/one_to_one_share"] == 1.0 and m["opd/sequences"] == 3
    with pytest.raises(ValueError, match="data_source is 'phi', which names no teacher; "
                                         "crossopd.teachers: gemma, smol"):
        asyncio.run(step.run(out, {"raw_prompt": messages, "data_source": "phi"}))


def test_a_batch_without_signal_or_with_a_failed_rollout_stops_the_run():
    from crossopd.integrations.verl.sampler import check_batch

    ok = {"opd/sequences": 4, "opd/overflowed_sequences": 1, "opd/signal_tokens": 10}
    check_batch(ok, failed=0, global_steps=3)
    with pytest.raises(ValueError, match="step 3: none of the 4 sequences got a teacher signal "
                                         "\\(4 overflowed"):
        check_batch({**ok, "opd/overflowed_sequences": 4, "opd/signal_tokens": 0}, 0, 3)
    with pytest.raises(RuntimeError, match="step 3: 1 rollout group\\(s\\) failed in the agent "
                                           "loop"):
        check_batch(ok, failed=1, global_steps=3)


def test_verls_default_reward_refuses_a_data_source_it_does_not_know():
    """Why the worker never asks verl's reward function for OPD samples (the smoke runs use
    such a data source and train)."""
    from verl.utils.reward_score import default_compute_score

    with pytest.raises(NotImplementedError):
        default_compute_score("crossopd_smoke", "Nina has 9 pears.", "9")
