"""The layering of the code base, checked on every import statement (function-level ones too).

    entry points   distill.cache_teacher, distill.train_student, distill.evaluate, distill.quickstart,
                   students.export, teachers.train_lit (each only runs a command of the pipeline)
    pipeline       distill.pipeline.*          (cache writing, training, evaluation, export, quickstart)
    library        teachers.*, students.*, distill.losses.*, distill.balance.*, distill.distiller
    core           distill.core.*              (imports nothing above it)

Arrows only point down; within the library, teachers, students and the distillation objectives do
not import each other (a student built on a teacher gets it from the core registry by name).
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"distill.cache_teacher", "distill.train_student", "distill.evaluate", "distill.quickstart",
                "students.export", "teachers.train_lit"}
OURS = ("distill", "teachers", "students")


def _modules() -> dict[str, Path]:
    out = {}
    for pkg in OURS:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def _imports(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module)
            found.update(f"{node.module}.{a.name}" for a in node.names)  # "from distill import x"
    return {m for m in found if m.split(".")[0] in OURS}


def _group(module: str) -> str:
    if module in ENTRY_POINTS:
        return "entry"
    if module.startswith("distill.pipeline"):
        return "pipeline"
    if module.startswith("distill.core") or module == "distill":
        return "core"
    if module.startswith(("distill.losses", "distill.balance", "distill.distiller")):
        return "objectives"
    return module.split(".")[0]  # teachers / students


ALLOWED = {
    "core": {"core"},
    "teachers": {"core", "teachers"},
    "students": {"core", "students"},
    "objectives": {"core", "objectives"},
    "pipeline": {"core", "teachers", "students", "objectives", "pipeline"},
    "entry": {"pipeline"},
}


def _target_group(name: str, modules: dict[str, Path]) -> str:
    while name not in modules and "." in name:  # "from pkg.mod import attr"
        name = name.rsplit(".", 1)[0]
    return _group(name)


@pytest.mark.parametrize("module", sorted(_modules()))
def test_imports_point_down(module):
    modules = _modules()
    group = _group(module)
    bad = sorted(m for m in _imports(modules[module]) if _target_group(m, modules) not in ALLOWED[group])
    assert not bad, f"{module} ({group}) imports {bad}"


def test_entry_points_only_run_a_command():
    for name in ENTRY_POINTS:
        path = _modules()[name]
        assert len(path.read_text().splitlines()) <= 8, f"{path} should only run its pipeline command"
