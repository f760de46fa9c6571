"""The ``verl.plugins`` entry point: ``import verl`` imports this module (``pip install
'crossopd[verl]'`` declares it) in every process, which registers crossopd with verl: the
``crossopd`` distillation loss, policy loss and advantage estimator (``loss``), the ``cpu``
platform (``cpu_platform``, chosen by ``VERL_PLATFORM=cpu``) and the ``hf`` rollout
(``cpu_rollout``). The agent-loop manager and the sampler are named in the launch
(docs/scale.md)."""

from crossopd.integrations.verl import cpu_platform, cpu_rollout, loss

loss.register()
cpu_platform.register()
cpu_rollout.register()
