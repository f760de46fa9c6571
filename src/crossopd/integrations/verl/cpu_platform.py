"""A CPU platform for verl (``VERL_PLATFORM=cpu``): verl's own trainer, workers and FSDP engine
on a machine without an accelerator, for the laptop smoke test of a launch.

verl reaches the device only through its platform registry (``verl.plugin.platform``), so a CPU
"chip" is one registered ``PlatformBase``: torch device ``cpu``, collectives over gloo, and one
Ray ``GPU`` slot per worker process. Ray hands out ``GPU`` slots on a machine without GPUs when
``ray.init(num_gpus=N)`` declares them (``ray_kwargs.ray_init.num_gpus``), and verl's resource
pools count ``GPU`` slots, so every pool, placement group and worker group is verl's own.

One part of verl cannot run as written: ``initialize_global_process_group_ray`` (verl 0.9.1,
``utils/distributed.py`` line 89) asks torch for the backend ``"cpu:gloo,<device>:<backend>"``,
which for a CPU device names ``cpu`` twice and torch refuses it ("Duplicate device type cpu").
verl calls it only ``if not torch.distributed.is_initialized()``. The platform therefore joins the
worker's gloo group itself when verl's ``Worker`` selects the device (``Worker.__init__`` calls
``set_device`` when ``RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES`` is set, which this platform
asks Ray for), from the ``RANK``/``WORLD_SIZE``/``MASTER_ADDR``/``MASTER_PORT`` verl set for that
worker: the same group verl would build, over the one backend a CPU has.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from types import ModuleType
from typing import Any

import torch
from verl.plugin.platform import PlatformBase, PlatformRegistry

PLATFORM_NAME = "cpu"
NOSET_ENV = "RAY_EXPERIMENTAL_NOSET_CUDA_VISIBLE_DEVICES"


def join_process_group() -> None:
    """The verl worker's gloo process group, from the variables verl's worker group set."""
    import torch.distributed as dist

    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    if dist.is_initialized() or not all(k in os.environ for k in needed):
        return
    dist.init_process_group(backend="gloo", rank=int(os.environ["RANK"]),
                            world_size=int(os.environ["WORLD_SIZE"]))


class CPUDevice:
    """What verl calls on ``torch.<device>`` (``get_torch_device()``), for the CPU: there is one
    device, nothing to synchronise and no cache to free; seeds and RNG state are torch's."""

    Stream = torch.cpu.Stream
    Event = torch.cpu.Event

    def __getattr__(self, name: str) -> Any:
        return getattr(torch.cpu, name)

    @staticmethod
    def is_available() -> bool:
        return True

    @staticmethod
    def device_count() -> int:
        return 1

    @staticmethod
    def current_device() -> str:
        return "cpu"

    @staticmethod
    def set_device(index: Any) -> None:
        join_process_group()

    @staticmethod
    def get_device_name(index: Any = None) -> str:
        return "cpu"

    @staticmethod
    def synchronize(index: Any = None) -> None:
        return None

    @staticmethod
    def empty_cache() -> None:
        return None

    @staticmethod
    def ipc_collect() -> None:
        return None

    @staticmethod
    def set_per_process_memory_fraction(fraction: float, index: Any = None) -> None:
        return None

    @staticmethod
    def memory_allocated(index: Any = None) -> int:
        return 0

    memory_reserved = max_memory_allocated = max_memory_reserved = memory_allocated

    @staticmethod
    def reset_peak_memory_stats(index: Any = None) -> None:
        return None

    @staticmethod
    def mem_get_info(index: Any = None) -> tuple[int, int]:
        import psutil

        vm = psutil.virtual_memory()
        return vm.available, vm.total

    @staticmethod
    def manual_seed(seed: int) -> None:
        torch.manual_seed(seed)

    manual_seed_all = manual_seed

    @staticmethod
    def get_rng_state(device: Any = None) -> torch.Tensor:
        return torch.get_rng_state()

    @staticmethod
    def set_rng_state(state: torch.Tensor, device: Any = None) -> None:
        torch.set_rng_state(state)


class CPUPlatform(PlatformBase):
    """verl's platform interface on the CPU (see the module docstring)."""

    _device = CPUDevice()

    @property
    def device_name(self) -> str:
        return "cpu"

    @property
    def vendor_name(self) -> str:
        return "cpu"

    @property
    def device_module(self) -> ModuleType:
        return self._device  # type: ignore[return-value]

    def is_available(self) -> bool:
        return True

    def is_platform_available(self, use_smi_check: bool = False) -> bool:
        # chosen by VERL_PLATFORM=cpu only, never by auto-detection
        return False

    def current_device(self) -> str:  # type: ignore[override]
        # verl passes it where torch takes a device ("cuda" takes an index; the CPU its name)
        return "cpu"

    def device_count(self) -> int:
        return 1

    def set_device(self, device_index: int) -> None:
        join_process_group()

    def synchronize(self, device_index: int | None = None) -> None:
        return None

    def manual_seed(self, seed: int) -> None:
        torch.manual_seed(seed)

    def manual_seed_all(self, seed: int) -> None:
        torch.manual_seed(seed)

    def set_allocator_settings(self, settings: str) -> None:
        return None

    def empty_cache(self) -> None:
        return None

    def get_device_capability(self, device_index: int = 0) -> tuple[int | None, int | None]:
        return None, None

    def communication_backend_name(self) -> str:
        return "gloo"

    def visible_devices_envvar(self) -> str:
        return "CUDA_VISIBLE_DEVICES"

    @contextmanager
    def nvtx_range(self, msg: str):
        yield

    def profiler_start(self) -> None:
        return None

    def profiler_stop(self) -> None:
        return None

    def ray_resource_name(self) -> str:
        return "GPU"

    def ray_resource_options(self, num_gpus: float) -> dict[str, Any]:
        return {"num_gpus": num_gpus}

    def ray_noset_envvars(self) -> list[str]:
        return [NOSET_ENV]

    def is_ipc_supported(self) -> bool:
        return False

    def cudart(self) -> Any:
        return None


def register() -> None:
    """``VERL_PLATFORM=cpu`` selects this platform (in every process that imports verl). verl's
    FSDP engines are registered for the devices they were tested on; on this platform they run
    as they are (they reach the device through the platform), so they are registered for
    ``cpu`` too, in verl's engine registry. That import is heavy: only when the platform is
    chosen."""
    if PlatformRegistry.get(PLATFORM_NAME) is None:
        PlatformRegistry.register(platform=PLATFORM_NAME)(CPUPlatform)
    if os.environ.get("VERL_PLATFORM", "").strip().lower() != PLATFORM_NAME:
        return
    from verl.workers.engine import EngineRegistry
    from verl.workers.engine.fsdp.transformer_impl import (
        FSDPEngineWithLMHead,
        FSDPEngineWithValueHead,
    )

    for model_type, engine in (("language_model", FSDPEngineWithLMHead),
                               ("value_model", FSDPEngineWithValueHead)):
        if "cpu" not in EngineRegistry._engines.get(model_type, {}).get("fsdp", {}):
            EngineRegistry.register(model_type=model_type, backend=["fsdp", "fsdp2"],
                                    device="cpu")(engine)


def ray_env() -> dict[str, str]:
    """The environment every Ray process of a CPU run needs (``ray_init.runtime_env.env_vars``)."""
    return {"VERL_PLATFORM": PLATFORM_NAME, NOSET_ENV: "1"}
