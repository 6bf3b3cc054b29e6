"""Frozen teacher adapters. ``build_teacher("openclip:ViT-B-32:laion2b_s34b_b79k")`` etc.

A spec is ``<backend>:<rest>``; each backend module registers itself with ``TEACHERS`` and parses
``<rest>`` on its own. Adding a backend is one new file plus one import line below.
"""
from __future__ import annotations

from distill.registry import Registry
from teachers.base import Teacher, TextBatch

TEACHERS: Registry[Teacher] = Registry("teacher")


def build_teacher(spec: str, device: str = "cpu") -> Teacher:
    """Build a frozen teacher from ``<backend>:<args>`` and move it to ``device``."""
    backend, sep, rest = spec.partition(":")
    if not sep:
        raise ValueError(f"teacher spec {spec!r} must look like '<backend>:<args>', backends: {TEACHERS.names()}")
    teacher = TEACHERS.build(backend, rest)
    teacher.spec = spec
    return teacher.to(device).freeze()


from teachers import openclip, hf, lit, mllm, ensemble  # noqa: E402,F401  (registration side effects)

__all__ = ["TEACHERS", "Teacher", "TextBatch", "build_teacher"]
