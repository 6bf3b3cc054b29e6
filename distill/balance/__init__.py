"""Loss balancers: one file per balancer, each class registered with ``@BALANCERS.register(name)``
(declared in :mod:`distill.core.registry`) and built with ``create_balancer(name, names, **cfg)``:
``dynamic`` (default), ``dsmd``, ``fixed``, ``uncertainty``, ``gradnorm``."""
from __future__ import annotations

from distill.balance.base import Balancer
from distill.core.registry import BALANCERS, create_balancer
from distill.balance import dsmd, dynamic, fixed, uncertainty, gradnorm  # noqa: F401  (registration side effects)

__all__ = ["BALANCERS", "Balancer", "create_balancer"]
