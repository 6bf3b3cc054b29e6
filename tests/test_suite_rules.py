"""The test suite's own rules: test modules share code through ``tests/helpers/`` and the fixtures of
``tests/conftest.py``, never by importing each other; a test that starts a subprocess is marked
``slow`` (the guard in ``tests/conftest.py`` fails it otherwise)."""
from __future__ import annotations

import ast
import re
import subprocess
from pathlib import Path

TESTS = Path(__file__).resolve().parent


def _imported_modules(path: Path) -> set[str]:
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            found.add("." * node.level + node.module)
    return found


def test_no_test_module_imports_another_test_module_or_the_conftest():
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        bad = {m for m in _imported_modules(path) if re.match(r"(tests\.|\.)(test_\w+|conftest)$", m)}
        text = path.read_text(encoding="utf-8")
        bad |= set(re.findall(r"""["'](tests\.test_\w+)["']""", text))  # --plugin tests.test_x
        if bad:
            offenders[str(path.relative_to(TESTS))] = sorted(bad)
    assert not offenders, offenders


INNER_TESTS = '''
import multiprocessing
import subprocess

import pytest


def _start():
    try:
        subprocess.Popen(["/nonexistent/program-for-the-guard-test"])
    except OSError:
        pass


@pytest.fixture(scope="module")
def started_by_a_fixture():
    _start()


def test_unmarked():
    _start()


@pytest.mark.slow
def test_marked():
    _start()


def test_fixture_of_unmarked(started_by_a_fixture):
    pass


def test_run_and_check_output_are_seen():
    for call in (subprocess.run, subprocess.check_output):
        try:
            call(["/nonexistent/program-for-the-guard-test"])
        except OSError:
            pass


def test_multiprocessing_worker_is_not_a_subprocess():
    proc = multiprocessing.get_context("fork").Process(target=int)
    proc.start()
    proc.join()
    assert proc.exitcode == 0


def test_nothing_started():
    pass
'''


def test_guard_fails_unmarked_tests_that_start_subprocesses(pytester, subprocess_log):
    pytester.makeconftest((TESTS / "conftest.py").read_text(encoding="utf-8"))
    pytester.makeini("[pytest]\nmarkers =\n    slow: slow\n")
    pytester.makepyfile(test_inner=INNER_TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider", "-q")
    result.assert_outcomes(passed=6, errors=3)
    errors = {line.split(" - ")[0] for line in result.outlines if line.startswith("ERROR ")}
    assert errors == {f"ERROR test_inner.py::{name}" for name in
                      ("test_unmarked", "test_fixture_of_unmarked", "test_run_and_check_output_are_seen")}
    result.stdout.fnmatch_lines(["*starts a subprocess: mark it @pytest.mark.slow (started 1: "
                                 "/nonexistent/program-for-the-guard-test)*"])
    # the guard of this session saw the inner run's starts too (they were the inner tests', not this one's)
    assert "/nonexistent/program-for-the-guard-test" in subprocess_log.started
    subprocess_log.started.clear()
    assert hasattr(subprocess.Popen.__init__, "__wrapped__")  # the inner session restored this session's guard


#: the one plugin module registered for the whole session (the toy teachers every test may use, and
#: ``--plugin tests.helpers.toy_teachers`` of the subprocess tests)
SESSION_PLUGINS = {"helpers/toy_teachers.py"}


def test_plugins_are_registered_for_one_test_and_private_registry_state_is_not_read():
    """A test-only registry entry is added with ``tests.helpers.registry.registered`` (or in a
    fixture) and removed afterwards: no module-level ``X.register(...)`` call outside the session
    plugin, and no test reads a registry's private ``_items``."""
    offenders = {}
    for path in sorted(TESTS.rglob("*.py")):
        rel = str(path.relative_to(TESTS))
        text = path.read_text(encoding="utf-8")
        bad = ["_items"] if re.search(r"\._items\b", text) and path.name != "test_suite_rules.py" else []
        for node in ast.parse(text).body:  # module level only
            call = node.value if isinstance(node, ast.Expr) else None
            while isinstance(call, ast.Call):
                if isinstance(call.func, ast.Attribute) and call.func.attr == "register" and rel not in SESSION_PLUGINS:
                    bad.append(f"line {node.lineno}: module-level register")
                call = call.func if isinstance(call.func, ast.Call) else None
        if bad:
            offenders[rel] = bad
    assert not offenders, offenders
