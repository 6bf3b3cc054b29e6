"""The options of the named pieces of a training config (student, every loss, every balancer, a
teacher spec a student names), checked when the config is read, before any cache or data is opened.

Each option dict is bound against the signature of the registered class
(:meth:`distill.core.registry.Registry.check_options`), so a misspelt or missing option is one
:class:`~distill.core.errors.ConfigError` naming the full key::

    stages[1].losses[2].cfg.temprature: unknown option of loss 'contrastive_distill'; known: queue_size, ...

Losses and balancers are cheap to build without data (a loss from placeholder dimensions, a balancer
from its stage's loss names), so they are also built once here, with the global RNG state restored
afterwards: their own value checks (a temperature <= 0, weights for a term the stage lacks) fail
here too, with the key of the entry. Students are not built (a pruned student loads its teacher);
their ``check_options`` classmethods check what can be checked without building (a ViT preset and
its widths, the teacher spec's backend).
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from distill.core.errors import ConfigError, UnknownNameError
from distill.core.registry import BALANCERS, LOSSES, STUDENTS, create_balancer, create_loss, load_plugins
from distill.losses.base import Dims

#: Loss options the Distiller sets itself (refused in a config instead of silently overridden).
DISTILLER_OWNED = {"gather": "the Distiller hands every loss the batch already gathered over the ranks"}

#: Dimensions a loss is built from when its options are checked (the real ones need the cache).
PLACEHOLDER_DIMS = Dims(8, 8, 8, 8, 8, 8)


def check_config_options(cfg: dict[str, Any]) -> None:
    """Check the options of the student, every loss and balancer of ``cfg`` (a normalised config
    dict, see :func:`distill.pipeline.train.config.validate`); plugins are imported first."""
    plugins = cfg.get("plugins")
    if not isinstance(plugins, list) or not all(isinstance(p, str) for p in plugins):
        raise ConfigError(f"plugins must be a list of module names, got {plugins!r}")
    load_plugins(plugins)
    student = cfg["student"]
    _named(STUDENTS, "student.name", student["name"])
    STUDENTS.check_options(student["name"], {k: v for k, v in student.items() if k != "name"}, "student.")
    check_stage_options(cfg["losses"], cfg["balancer"], "losses", "balancer")
    warm = cfg["train"].get("warmup_stage")
    if warm:
        check_loss_options(warm["losses"], "train.warmup_stage.losses")
    for i, stage in enumerate(cfg.get("stages") or []):
        check_stage_options(stage["losses"], stage["balancer"], f"stages[{i}].losses", f"stages[{i}].balancer")


def check_stage_options(losses: list[dict[str, Any]], balancer: dict[str, Any], losses_key: str,
                        balancer_key: str) -> None:
    """The losses ``[{name, cfg}]`` at ``losses_key`` and the ``{name, cfg}`` balancer over them."""
    check_loss_options(losses, losses_key)
    name, cfg = balancer["name"], balancer.get("cfg") or {}
    _named(BALANCERS, f"{balancer_key}.name", name)
    BALANCERS.check_options(name, cfg, f"{balancer_key}.cfg.")
    # balancers name their options "balancer.cfg.<key>"; this one sits at balancer_key
    _built(lambda: create_balancer(name, [item["name"] for item in losses], **cfg), f"{balancer_key}.cfg",
           "balancer.cfg.")


def check_loss_options(losses: list[dict[str, Any]], key: str) -> None:
    for j, item in enumerate(losses):
        name, cfg = item["name"], item.get("cfg") or {}
        where = f"{key}[{j}]"
        _named(LOSSES, f"{where}.name", name)
        if not isinstance(cfg, dict):
            raise ConfigError(f"{where}.cfg must be a mapping of options of loss {name!r}, got {cfg!r}")
        for option, why in DISTILLER_OWNED.items():
            if option in cfg:
                raise ConfigError(f"{where}.cfg.{option}: not an option in training: {why}")
        LOSSES.check_options(name, cfg, f"{where}.cfg.")
        _built(lambda: create_loss(name, PLACEHOLDER_DIMS, **cfg), f"{where}.cfg")


def _named(registry: Any, key: str, name: Any) -> None:
    if not isinstance(name, str):
        raise ConfigError(f"{key} must be a string, got {name!r}")
    if name not in registry:
        raise UnknownNameError(f"{key}: unknown {registry.kind} {name!r}; known: {', '.join(registry.names())}")


def _built(build: Callable[[], Any], key: str, own_prefix: str | None = None) -> None:
    """Build once (global RNG state kept) so the class's own value checks run; an error becomes a
    ConfigError at ``key`` (a message starting with ``own_prefix`` is re-rooted there)."""
    try:
        with torch.random.fork_rng(devices=[]):
            build()
    except (ValueError, TypeError) as e:  # ConfigError is a ValueError
        msg = str(e)
        if own_prefix and msg.startswith(own_prefix):
            raise ConfigError(f"{key}.{msg[len(own_prefix):]}") from e
        raise ConfigError(f"{key}: {msg}") from e
