"""Student dual encoders, one file each, registered with ``@STUDENTS.register(name)`` (declared in
:mod:`distill.core.registry`) and built with ``create_student("vit", **cfg)``. Importing this
package registers the built-in students."""
from __future__ import annotations

from distill.core.registry import STUDENTS, create_student
from students.base import Student
from students import vit_dual, pruned, mwa, pmf  # noqa: F401  (registration side effects)
from students.io import load_student, save_student

__all__ = ["STUDENTS", "Student", "create_student", "load_student", "save_student"]
