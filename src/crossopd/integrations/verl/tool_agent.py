"""crossopd's tool agent loop for verl, ``agent_name: crossopd_tool_agent``: verl's own tool
agent loop (its tool config or function tools, its tool parser, its turn limits), which also
hands the worker the conversation it kept after the prompt and the tool schemas the prompt was
rendered with. The teacher step needs both to render the trajectory in the teacher's own
format; verl's loop keeps them only while it runs.

Launch: ``actor_rollout_ref.rollout.multi_turn.enable=True``,
``actor_rollout_ref.rollout.agent.default_agent_loop=crossopd_tool_agent`` and verl's tool keys
(``multi_turn.function_tool_path`` or ``tool_config_path``, ``max_assistant_turns``). Importing
this module registers the loop; the worker module imports it in every agent-loop process."""

from __future__ import annotations

from typing import Any

from verl.experimental.agent_loop.agent_loop import register
from verl.experimental.agent_loop.tool_agent_loop import ToolAgentLoop

from crossopd.integrations.verl.settings import TOOL_AGENT
from crossopd.integrations.verl.targets import CONVERSATION


@register(TOOL_AGENT)
class CrossOPDToolAgentLoop(ToolAgentLoop):
    """verl's ``ToolAgentLoop`` with the conversation in ``extra_fields[CONVERSATION]``: the
    messages after the prompt (assistant turns as verl's parser read them, tool results) and
    the tool schemas. verl builds one loop per sample, so the sample's state is kept on it."""

    async def _handle_pending_state(self, agent_data: Any, sampling_params: dict[str, Any]
                                    ) -> Any:
        self.agent_data = agent_data
        return await super()._handle_pending_state(agent_data, sampling_params)

    async def run(self, sampling_params: dict[str, Any], priority: int = 0, **kwargs: Any
                  ) -> Any:
        output = await super().run(sampling_params, priority, **kwargs)
        data = self.agent_data
        schemas = getattr(data, "_active_tool_schemas", self.tool_schemas)
        output.extra_fields[CONVERSATION] = {
            "messages": [dict(m) for m in data.messages[len(list(kwargs["raw_prompt"])):]],
            "tools": list(schemas) or None}
        return output
