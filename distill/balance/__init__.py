"""Balancer registry: ``build_balancer("dynamic", names=[...], **cfg)``; ``dynamic`` (default), ``dsmd``,
``fixed``, ``uncertainty``, ``gradnorm``."""
from __future__ import annotations

from typing import Any, Sequence

from distill.balance.base import Balancer
from distill.registry import Registry

BALANCERS: Registry[Balancer] = Registry("balancer")


def build_balancer(name: str, names: Sequence[str], **cfg: Any) -> Balancer:
    return BALANCERS.build(name, list(names), **cfg)


from distill.balance import dsmd, dynamic, fixed, uncertainty, gradnorm  # noqa: E402,F401

__all__ = ["BALANCERS", "Balancer", "build_balancer"]
