"""The ``verl.plugins`` entry point: ``import verl`` imports this module (``pip install
'crossopd[verl]'`` declares it), which registers the ``crossopd`` distillation loss. The
agent-loop manager is named in the launch
(``+actor_rollout_ref.rollout.agent.agent_loop_manager_class=``
``crossopd.integrations.verl.worker.CrossOPDAgentLoopManager``)."""

from crossopd.integrations.verl.loss import register

register()
