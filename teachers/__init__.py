"""Frozen teacher adapters, one backend per file, each class registered with
``@TEACHERS.register(backend)`` (declared in :mod:`distill.core.registry`) and built from a spec
``<backend>:<rest>`` with ``create_teacher("openclip:ViT-B-32:laion2b_s34b_b79k")``; the backend
class parses ``<rest>`` in its ``from_spec``. Importing this package registers the built-in backends."""
from __future__ import annotations

from distill.core.registry import TEACHERS, create_teacher
from teachers.base import Teacher, TextBatch
from teachers import openclip, hf, lit, mllm, ensemble  # noqa: F401  (registration side effects)

__all__ = ["TEACHERS", "Teacher", "TextBatch", "create_teacher"]
