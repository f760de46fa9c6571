"""The shipped verl launches (``examples/verl/*.sh``) as hydra overrides: read from the script,
changed key by key (hydra refuses a key given twice), composed into verl's own ``ppo_trainer``
config and validated by verl's own ``validate_config``, as ``python -m verl.trainer.main_ppo``
does before it starts Ray."""

from __future__ import annotations

import shlex
from pathlib import Path
from typing import Any

ENTRY = "verl.trainer.main_ppo"


def script_overrides(script: Path) -> list[str]:
    """The ``key=value`` arguments of a launch script's ``verl.trainer.main_ppo`` call."""
    text = Path(script).read_text()
    if ENTRY not in text:
        raise ValueError(f"{script}: no `python -m {ENTRY}` call")
    call = text[text.index(ENTRY) + len(ENTRY):]
    return [t for t in shlex.split(call.replace("\\\n", " "), comments=True) if "=" in t]


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def merge(base: list[str], changes: dict[str, Any]) -> list[str]:
    """``base`` with each key of ``changes`` set to its value: replaced in place where ``base``
    sets it (keeping its ``+``), appended otherwise (``+`` when the key starts with ``+``)."""
    todo = {k.lstrip("+"): (k, v) for k, v in changes.items()}
    out = []
    for item in base:
        key = _key(item)
        if key in todo:
            _, value = todo.pop(key)
            out.append(f"{item.split('=', 1)[0]}={render(value)}")
        else:
            out.append(item)
    out += [f"{raw}={render(value)}" for raw, value in todo.values()]
    return out


def render(value: Any) -> str:
    """A hydra override value: lists as ``[a,b]``, None as ``null``, booleans as hydra's."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(render(v) for v in value) + "]"
    return str(value)


def compose(overrides: list[str]) -> Any:
    """verl's ``ppo_trainer`` config with ``overrides``, as hydra composes it for
    ``main_ppo``."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir
    from verl.trainer.config import __file__ as config_init

    with initialize_config_dir(config_dir=str(Path(config_init).parent), version_base=None):
        return hydra_compose(config_name="ppo_trainer", overrides=overrides)


def validate(config: Any) -> None:
    """verl's own check, the first thing ``main_ppo.main`` does."""
    from verl.trainer.ppo.utils import need_critic, need_reference_policy
    from verl.utils.config import validate_config

    validate_config(config=config, use_reference_policy=need_reference_policy(config),
                    use_critic=need_critic(config))
