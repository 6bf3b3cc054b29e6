"""The layering of the code base, checked on every import statement (function-level ones too).

    api            distill (distill/__init__.py: the public names, imported lazily on first use)
    entry points   distill.cache_teacher, distill.train_student, distill.evaluate, distill.quickstart,
                   distill.export, distill.train_lit (each only runs a command of the pipeline)
    pipeline       distill.pipeline.*          (cache writing, training, evaluation, export, LiT
                                                training, quickstart, the mmdistill command)
    library        teachers.*, students.*, distill.losses.*, distill.balance.*, distill.distiller
    core           distill.core.*              (imports nothing above it)

Arrows only point down; within the library, teachers, students and the distillation objectives do
not import each other (a student built on a teacher gets it from the core registry by name); no
module imports the api; and no two modules import each other, directly or around a circle.
"""
from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"distill.cache_teacher", "distill.train_student", "distill.evaluate", "distill.quickstart",
                "distill.export", "distill.train_lit"}
#: the modules that hold a command's ``main(argv)`` (run by an entry point or by ``mmdistill``)
COMMANDS = {"distill.pipeline.cache.main", "distill.pipeline.train.main", "distill.pipeline.evaluate",
            "distill.pipeline.export.main", "distill.pipeline.lit.train", "distill.pipeline.quickstart",
            "distill.pipeline.commands"}
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
    if module == "distill":
        return "api"
    if module in ENTRY_POINTS:
        return "entry"
    if module.startswith("distill.pipeline"):
        return "pipeline"
    if module.startswith("distill.core"):
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
    "api": set(),  # its names are imported lazily (importlib), never by an import statement
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


def _edges() -> dict[str, set[str]]:
    """module -> the modules of ours it imports (a ``from pkg.mod import attr`` counts as ``pkg.mod``)."""
    modules = _modules()
    out = {}
    for name, path in modules.items():
        targets = set()
        for m in _imports(path):
            while m not in modules and "." in m:
                m = m.rsplit(".", 1)[0]
            if m in modules and m != name:
                targets.add(m)
        out[name] = targets
    return out


def test_no_import_circles():
    """No module reaches itself through the imports of others (a package importing its own
    submodules, which import siblings, is no circle: the edges name modules, not their parents)."""
    edges = _edges()
    state: dict[str, int] = {}
    circles = []

    def visit(node: str, path: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(edges[node]):
            if state.get(nxt) == 1:
                circles.append(path[path.index(nxt):] + [nxt])
            elif nxt not in state:
                visit(nxt, path + [nxt])
        state[node] = 2

    for module in sorted(edges):
        if module not in state:
            visit(module, [module])
    assert not circles, "import circles: " + "; ".join(" -> ".join(c) for c in circles)


@pytest.mark.parametrize("module", sorted(COMMANDS))
def test_command_modules_sit_above_the_library(module):
    """A command module is imported only by entry points and the pipeline (the ``mmdistill``
    dispatcher names them by string); the library and the core never reach one."""
    edges = _edges()
    assert module in edges, f"{module} does not exist"
    importers = sorted(m for m, targets in edges.items() if module in targets)
    assert all(_group(m) in ("entry", "pipeline") for m in importers), f"{module} is imported by {importers}"


def test_every_entry_point_runs_a_command_that_mmdistill_also_runs():
    from distill.pipeline.commands import COMMANDS as MMDISTILL

    edges = _edges()
    dispatched = {module for module, _ in MMDISTILL.values()}
    for entry in sorted(ENTRY_POINTS):
        ran = edges[entry] - {"distill.pipeline.cli"}
        assert len(ran) == 1 and ran <= COMMANDS, (entry, ran)
        if entry != "distill.quickstart":
            assert ran <= dispatched, f"mmdistill has no subcommand for {entry}"


def test_the_api_module_imports_nothing_eagerly():
    """``import distill`` stays cheap: distill/__init__.py imports only the standard library; its
    public names are imported on first use (PEP 562 ``__getattr__``)."""
    tree = ast.parse((ROOT / "distill" / "__init__.py").read_text(encoding="utf-8"))
    imported = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    imported |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert imported <= {"__future__", "importlib", "typing"}, imported
