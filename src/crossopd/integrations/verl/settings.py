"""The ``crossopd:`` section of a verl launch and the checks a launch must pass before crossopd's
agent-loop manager starts (one line each, naming the key to set).

Two ways the teacher's signal reaches verl's update (docs/scale.md, "verl"):

- ``advantage`` (crossopd's own teacher: ``+crossopd.teacher.urls`` / ``.model`` /
  ``+crossopd.teachers``): the worker turns the credit targets into crossopd's per-token
  advantage ``A = clamp(q - log p_rollout, +-adv_clamp)`` and hands it to verl as the token-level
  reward; the registered advantage estimator ``crossopd`` passes it through and the registered
  policy loss ``crossopd`` (PPO-clip with verl's clip keys, dual clip ``clip_ratio_c``, token
  mean) trains. verl's distillation switch stays off, so verl builds no teacher pool.
- ``pool`` (verl's teacher replicas serve the cross-family teacher,
  ``distillation.teacher_models``): the worker sends the teacher-side ids to verl's pool and
  writes the targets into ``teacher_logprobs``; the registered distillation loss ``crossopd``
  trains.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from crossopd.run.config import ConfigError, TeacherConfig, build_section
from crossopd.step.loss import LossConfig
from crossopd.step.settings import StepSettings

SAMPLER_PATH = "pkg://crossopd.integrations.verl.sampler"
SAMPLER_NAME = "CrossOPDReplayBuffer"
ESTIMATOR = "crossopd"
TOOL_AGENT = "crossopd_tool_agent"  # crossopd.integrations.verl.tool_agent


@dataclass
class VerlSettings:
    """The ``crossopd:`` section of a verl launch (``+crossopd.teacher.urls=[...]`` ...)."""

    # crossopd's teacher (urls: an HTTP pool, model: in process) or, with neither, the format
    # of the teacher verl's own pool serves (distillation.teacher_models)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    # several of crossopd's teachers by name; a sample goes to the one its `teacher_key` field
    # names (verl's own routing field, as distillation.teacher_key)
    teachers: dict[str, TeacherConfig] = field(default_factory=dict)
    teacher_key: str = "data_source"
    credit_rule: str = "proportional"
    special_tokens: str = "penalize"  # penalize | mask (verl's rollout decides where turns end)
    special_penalty: float = 5.0
    unparsed_calls: str = "score"  # score | mask: a tool call that does not parse
    adv_clamp: float = 10.0
    max_batch_tokens: int = 8192
    # validation samples are scored by verl's reward function (training samples never are:
    # their signal is the teacher's); off, every sample's task reward is 0
    task_reward: bool = False
    # every training sample's ids, rollout log-probs, teacher log-probs, targets and counts, one
    # JSON line each (the smoke command recomputes them with the native step library)
    record_dir: str | None = None

    @property
    def own_teacher(self) -> bool:
        """crossopd's own teacher scores (mode ``advantage``), not verl's pool (``pool``)."""
        return bool(self.teachers or self.teacher.model or self.teacher.urls)

    @property
    def mode(self) -> str:
        return "advantage" if self.own_teacher else "pool"


def _section(config: Any, name: str) -> Any:
    return config.get(name) if hasattr(config, "get") else None


def settings_from(config: Any) -> VerlSettings:
    """``VerlSettings`` from a verl (OmegaConf) config; one-line errors name the key."""
    from omegaconf import OmegaConf

    raw = _section(config, "crossopd")
    data = OmegaConf.to_container(raw, resolve=True) if raw is not None else {}
    settings = build_section(VerlSettings, data or {}, "crossopd.")
    if settings.special_tokens not in ("penalize", "mask"):
        raise ConfigError(f"crossopd.special_tokens {settings.special_tokens!r}: penalize or mask")
    step_settings(config, settings)  # the credit rule resolves, or the launch stops here
    t = settings.teacher
    for name, each in settings.teachers.items():
        if bool(each.model) == bool(each.urls):
            raise ConfigError(f"crossopd.teachers.{name}: set model (in process) or urls (HTTP)")
    if settings.teachers:
        if t.model or t.urls:
            raise ConfigError("set crossopd.teacher or crossopd.teachers, not both")
        return settings
    if t.model and t.urls:
        raise ConfigError("crossopd.teacher: set model (in process) or urls (HTTP), not both")
    if not (t.model or t.urls) and pool_teacher(config) is None:
        raise ConfigError("crossopd: no teacher: set +crossopd.teacher.urls=[...] (crossopd's "
                          "HTTP teacher) or distillation.enabled=True with "
                          "distillation.teacher_models.teacher_model.model_path (verl's pool)")
    return settings


def step_settings(config: Any, settings: VerlSettings) -> StepSettings:
    """The step settings of a verl launch: the ``crossopd:`` section's, verl's rollout sampling
    (``actor_rollout_ref.rollout``) and its actor's clip, which verl's loss applies."""
    from omegaconf import OmegaConf

    def key(path: str, default: Any) -> Any:
        value = OmegaConf.select(config, f"actor_rollout_ref.{path}", default=default)
        return default if value is None else value

    return StepSettings.build(
        settings.credit_rule, where="crossopd.",
        loss=LossConfig(clip_low=key("actor.clip_ratio_low", 0.2),
                        clip_high=key("actor.clip_ratio_high", 0.2),
                        dual_clip=key("actor.clip_ratio_c", 3.0), adv_clamp=settings.adv_clamp),
        special_tokens=settings.special_tokens, special_penalty=settings.special_penalty,
        temperature=key("rollout.temperature", 1.0), top_p=key("rollout.top_p", 1.0),
        max_new_tokens=key("rollout.response_length", 512),
        samples_per_prompt=key("rollout.n", 1), max_batch_tokens=settings.max_batch_tokens,
        unparsed_calls=settings.unparsed_calls)


def pool_teacher(config: Any) -> Any:
    """verl's single teacher pool config, when distillation is on (None otherwise)."""
    dist = _section(config, "distillation")
    if not dist or not dist.get("enabled"):
        return None
    models = dist.get("teacher_models") or {}
    if len(models) != 1:
        raise ConfigError("crossopd on verl scores with one teacher pool; "
                          f"distillation.teacher_models has {', '.join(models) or 'none'}")
    return next(iter(models.values()))


def _need(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def check_launch(config: Any) -> VerlSettings:
    """Everything crossopd needs of a verl launch, before any worker starts."""
    settings = settings_from(config)
    trainer, rollout = config.trainer, config.actor_rollout_ref.rollout
    actor = config.actor_rollout_ref.actor
    _need(trainer.get("use_v1", True),
          "crossopd's verl plugin runs on verl's v1 trainer (trainer.use_v1=True, verl's "
          "default); verl deprecates the legacy trainer")
    _need(trainer.v1.trainer_mode == "sync",
          f"trainer.v1.trainer_mode={trainer.v1.trainer_mode}: crossopd runs verl's sync trainer "
          "(on-policy OPD: every rollout is scored once and trained on once)")
    sampler = trainer.v1.sampler.custom_sampler
    _need(sampler.get("path") == SAMPLER_PATH and sampler.get("name") == SAMPLER_NAME,
          f"set trainer.v1.sampler.custom_sampler.path={SAMPLER_PATH} and "
          f"trainer.v1.sampler.custom_sampler.name={SAMPLER_NAME}: crossopd's per-step counts "
          "(coverage, signal tokens, overflowed sequences) are reported there")
    _need(bool(rollout.calculate_log_probs),
          "set actor_rollout_ref.rollout.calculate_log_probs=True: credit is assigned on the "
          "rollout log-probs")
    _need(bool(config.data.get("return_raw_chat")),
          "set data.return_raw_chat=True: the teacher sees the messages in its own format")
    _need(not actor.use_kl_loss and not config.algorithm.use_kl_in_reward,
          "set actor_rollout_ref.actor.use_kl_loss=False and algorithm.use_kl_in_reward=False: "
          "OPD's reverse KL to the teacher is already the per-token signal")
    multi = rollout.get("multi_turn") or {}
    loop = rollout.agent.get("default_agent_loop")
    _need(not multi.get("enable") or loop in (TOOL_AGENT, "single_turn_agent"),
          f"actor_rollout_ref.rollout.agent.default_agent_loop={loop} with multi_turn.enable: "
          f"set it to {TOOL_AGENT} (verl's tool agent loop that hands crossopd the "
          "conversation, which the teacher's rendering of a trajectory needs)")
    dist = _section(config, "distillation")
    enabled = bool(dist and dist.get("enabled"))
    if settings.own_teacher:
        _need(not enabled, "crossopd's own teacher scores (crossopd.teacher / crossopd.teachers): "
              "set distillation.enabled=False (verl's teacher pool is the other mode)")
        _need(config.algorithm.adv_estimator == ESTIMATOR,
              f"set algorithm.adv_estimator={ESTIMATOR}: crossopd's per-token advantage reaches "
              "verl's PPO loss through it")
        policy = actor.get("policy_loss") or {}
        _need(policy.get("loss_mode") == ESTIMATOR,
              f"set actor_rollout_ref.actor.policy_loss.loss_mode={ESTIMATOR}: crossopd's PPO-clip "
              "with dual clip on that advantage")
        in_process = [n for n, t in (settings.teachers or {"teacher": settings.teacher}).items()
                      if t.model]
        workers = rollout.agent.num_workers
        _need(not in_process or workers == 1,
              f"crossopd.{'teachers.' + in_process[0] if settings.teachers else 'teacher'}.model "
              f"would load the teacher in each of the {workers} agent-loop workers, on the CPU "
              "(Ray gives GPUs only to actors that ask): serve it (vllm serve or crossopd "
              "serve-teacher) and set its urls, use verl's teacher pool, or set "
              "actor_rollout_ref.rollout.agent.num_workers=1")
    else:
        _need(enabled and dist.distillation_loss.loss_mode == "crossopd",
              "verl's teacher pool scores: set distillation.enabled=True and "
              "distillation.distillation_loss.loss_mode=crossopd")
        _need(not dist.distillation_loss.use_task_rewards,
              "set distillation.distillation_loss.use_task_rewards=False: the teacher's signal is "
              "the whole objective")
    return settings
