"""Student dual encoders, registered by name. ``build_student("vit", **cfg)``."""
from __future__ import annotations

from typing import Any

from distill.registry import Registry
from students.base import Student

STUDENTS: Registry[Student] = Registry("student")


def build_student(name: str, **cfg: Any) -> Student:
    """Build a student by registry name; ``cfg`` is what ``Student.config()`` returned (minus name)."""
    return STUDENTS.build(name, **cfg)


from students import vit_dual, pruned  # noqa: E402,F401  (registration side effects)
from students import tuned  # noqa: E402,F401  (registers pmf, mwa)
from students.io import load_student, save_student  # noqa: E402

__all__ = ["STUDENTS", "Student", "build_student", "load_student", "save_student"]
