"""Shared fixtures, the toy teachers for every test, and the guard that a test starting a subprocess
is marked ``slow`` (helpers shared by the test modules are in ``tests/helpers/``).

Fixtures: ``tiny_tsv`` (a tiny TSV dataset), ``flickr8k`` (the shared Flickr8k folder, or skip),
``toy_teacher`` (``toy:0``), ``tiny`` (tsv + toy-teacher cache with 2 views, per module),
``tiny_openclip`` (spec of a tiny random-init open_clip teacher, per module), ``bench_teacher_spec``
(the benchmarks' 1-layer open_clip teacher, per module) and ``subprocess_log`` (the guard's log).
"""
from __future__ import annotations

import json
import platform
from pathlib import Path

import pytest
import torch

import tests.helpers.toy_teachers  # noqa: F401  (registers toy, slowtoy, widetoy and prunetoy)
from tests.helpers.benchmarks import TINY_TEACHER
from tests.helpers.caches import build_cache
from tests.helpers.data import make_tiny_dataset
from tests.helpers.paths import FLICKR8K
from tests.helpers.procs import SubprocessLog
from tests.helpers.teachers import TINY_OPENCLIP

pytest_plugins = ["pytester"]
torch.set_num_threads(1)


@pytest.fixture
def tiny_tsv(tmp_path: Path) -> Path:
    return make_tiny_dataset(tmp_path / "data")


@pytest.fixture
def flickr8k() -> Path:
    if not (FLICKR8K / "captions.tsv").is_file():
        pytest.skip(f"Flickr8k not found at {FLICKR8K}")
    return FLICKR8K


@pytest.fixture
def toy_teacher():
    from teachers import create_teacher

    return create_teacher("toy:0")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(tsv, cache dir) shared by the tests of a module: 12 images x 2 captions, 2 cached views."""
    root = tmp_path_factory.mktemp("train")
    tsv = make_tiny_dataset(root / "data")
    return tsv, build_cache(tsv, root / "cache", views=2)


@pytest.fixture(scope="module")
def tiny_openclip(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``openclip:<config.json>`` of ``TINY_OPENCLIP`` (random init)."""
    path = tmp_path_factory.mktemp("teacher") / "tinyclip.json"
    path.write_text(json.dumps(TINY_OPENCLIP))
    return f"openclip:{path}"


@pytest.fixture(scope="module")
def bench_teacher_spec(tmp_path_factory: pytest.TempPathFactory) -> str:
    """``openclip:<config.json>`` of the benchmarks' ``TINY_TEACHER`` (random init)."""
    path = tmp_path_factory.mktemp("bench_teacher") / "benchtiny.json"
    path.write_text(json.dumps(TINY_TEACHER))
    return f"openclip:{path}"


# -------------------------------------------------------------- tests starting subprocesses are slow
_SUBPROCESSES = SubprocessLog()


def pytest_configure(config: pytest.Config) -> None:
    # the stdlib runs `uname -p` once per process for this: asked here, library code asking later
    # (the benchmarks' environment record) starts no subprocess inside a test
    platform.processor()
    _SUBPROCESSES.install()


def pytest_unconfigure(config: pytest.Config) -> None:
    _SUBPROCESSES.uninstall()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    _SUBPROCESSES.started.clear()  # before the test's fixtures, module-scoped ones included, are set up


@pytest.fixture
def subprocess_log() -> SubprocessLog:
    """The log of the subprocesses the running test has started (setup included)."""
    return _SUBPROCESSES


@pytest.fixture(autouse=True)
def _subprocesses_need_the_slow_mark(request: pytest.FixtureRequest):
    """Fail a test that is not marked ``slow`` but started a subprocess (``.ci/run`` runs the fast set
    first: it must stay fast)."""
    yield
    if _SUBPROCESSES.started and request.node.get_closest_marker("slow") is None:
        pytest.fail(_SUBPROCESSES.report(), pytrace=False)
