"""The verl agent-loop manager and worker whose teacher step is crossopd's, on verl's default
(v1) trainer: every finished sample goes to TransferQueue, as verl's own TransferQueue worker
puts it, after crossopd's teacher step (``teacher_step``) has trimmed its response mask and
filled its signal (the per-token advantage as its token-level reward, or the targets in its
teacher fields for verl's teacher pool).

Launch: ``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=``
``crossopd.integrations.verl.worker.CrossOPDAgentLoopManager``, crossopd's sampler and a
``+crossopd`` section (``settings``; ``check_launch`` says what else). Two methods of verl's
workers and the replay buffer's ``sample`` are extended; ``check_private_api`` fails loudly when
their signatures change.
"""

from __future__ import annotations

import inspect
from typing import Any

import ray
from verl.experimental.agent_loop.agent_loop import AgentLoopWorker
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop
from verl.trainer.ppo.v1.agent_loop_tq import AgentLoopManagerTQ, AgentLoopWorkerTQ
from verl.trainer.ppo.v1.replay_buffer import ReplayBuffer

from crossopd.integrations.verl import tool_agent  # noqa: F401 - registers crossopd_tool_agent
from crossopd.integrations.verl.settings import check_launch
from crossopd.integrations.verl.targets import CONVERSATION, TrajectoryError
from crossopd.integrations.verl.teacher_step import teacher_step

SUPPORTED = "verl==0.9.1"
# verl declares its TransferQueue worker with @ray.remote; this is the class underneath
WorkerTQ = AgentLoopWorkerTQ.__ray_actor_class__
SIGNATURES: dict[tuple[type, str], tuple[str, ...]] = {
    (WorkerTQ, "_agent_loop_postprocess"): ("output", "validate", "kwargs"),
    (AgentLoopWorker, "_compute_teacher_logprobs"): ("output", "prompt_ids", "response_ids",
                                                     "validate", "sample_kwargs"),
    (ReplayBuffer, "sample"): ("global_steps", "partition_id", "batch_size"),
    (ToolAgentLoop, "run"): ("sampling_params", "priority", "kwargs"),
    (ToolAgentLoop, "_handle_pending_state"): ("agent_data", "sampling_params"),
}


def check_private_api() -> None:
    """Raise ``ImportError`` (one line) when a verl method crossopd extends changed."""
    import verl

    for (cls, name), expected in SIGNATURES.items():
        method = getattr(cls, name, None)
        # Ray's actor classes carry a tracing parameter of Ray's own
        params = tuple(p for p in inspect.signature(method).parameters
                       if p != "_ray_trace_ctx")[1:] if method else ()
        if params != expected:
            raise ImportError(f"verl {verl.__version__}: {cls.__name__}.{name} takes "
                              f"({', '.join(params)}), not ({', '.join(expected)}); crossopd's "
                              f"verl plugin needs {SUPPORTED}")


class CrossOPDAgentLoopWorker(WorkerTQ):
    """verl's TransferQueue agent-loop worker whose teacher step is crossopd's (validation
    samples get none, as in verl's own)."""

    def __init__(self, config: Any, llm_client: Any, teacher_client: Any = None,
                 reward_loop_worker_handles: Any = None) -> None:
        check_private_api()
        super().__init__(config, llm_client, teacher_client, reward_loop_worker_handles)
        self.opd = teacher_step(config, self.tokenizer,
                                pool=getattr(self, "teacher_server_manager", None))

    async def _agent_loop_postprocess(self, output: Any, validate: bool, **kwargs: Any) -> None:
        outputs = output if isinstance(output, list) else [output]
        if outputs:
            final = outputs[-1]
            if validate:  # no teacher step: the conversation is not stored with the sample
                final.extra_fields.pop(CONVERSATION, None)
            else:
                if len(outputs) > 1:
                    raise TrajectoryError(f"crossopd: an agent loop with {len(outputs)} outputs "
                                          "per sample cannot be scored as one response")
                advantage = await self.opd.run(final, kwargs)
                if advantage is not None:  # verl's store takes the sample's fields from kwargs
                    kwargs = {**kwargs, "rm_scores": advantage}
            if not (validate and self.opd.settings.task_reward):
                # OPD needs no task reward: verl's reward function is not asked (it would raise
                # on a data_source it does not know)
                final.reward_score = 0.0
        await super()._agent_loop_postprocess(output, validate, **kwargs)

    async def _compute_teacher_logprobs(self, output: Any, prompt_ids: list[int],
                                        response_ids: list[int], validate: bool,
                                        sample_kwargs: dict | None = None) -> None:
        """Done: crossopd's step ran in ``_agent_loop_postprocess``, on the student's ids."""


class CrossOPDAgentLoopManager(AgentLoopManagerTQ):
    """verl's TransferQueue agent-loop manager running ``CrossOPDAgentLoopWorker``s; the launch
    is checked first (one line per missing setting)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        check_private_api()
        check_launch(kwargs["config"] if "config" in kwargs else args[0])
        super().__init__(*args, **kwargs)
        self.agent_loop_workers_class = ray.remote(CrossOPDAgentLoopWorker)


__all__ = ["CrossOPDAgentLoopManager", "CrossOPDAgentLoopWorker", "check_private_api"]
