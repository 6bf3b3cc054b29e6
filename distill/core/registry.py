"""Every registry of the project, declared in this leaf module, and the ``create_*`` factories.

One idiom for every pluggable concept (a teacher backend, a student, a loss, a balancer, a dataset
format): the class is registered directly with a decorator in the one file that defines it,

    @LOSSES.register("cosine")
    class CosineLoss(DistillLoss): ...

and built by name with a ``create_*`` factory (``create_loss("cosine", dims, **cfg)``).

The registries live here, in the core, so that a layer can build an object of another layer by
name without importing it (a pruned student builds its teacher with :func:`create_teacher`). Each
registry names the package that fills it (``provider``); that package is imported the first time a
name is looked up, the way ``--plugin`` modules are: an import by name at run time, not a module
dependency. Plugins register into the same registries (see :func:`load_plugins`).
"""
from __future__ import annotations

import importlib
from typing import Any, Callable, Generic, Iterable, Sequence, TypeVar

from distill.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class (or factory function). ``register(name)`` is a decorator."""

    def __init__(self, kind: str, provider: str | None = None) -> None:
        self.kind = kind
        self.provider = provider
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(entry: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not entry:
                raise ValueError(f"{self.kind} {name!r} is already registered")
            self._items[name] = entry
            return entry

        return deco

    def _load(self) -> None:
        if self.provider is not None:
            importlib.import_module(self.provider)

    def get(self, name: str) -> Callable[..., T]:
        if name not in self._items:
            self._load()
        if name not in self._items:
            raise UnknownNameError(f"unknown {self.kind} {name!r}; known: {', '.join(self.names())}")
        return self._items[name]

    def create(self, name: str, *args: Any, **kwargs: Any) -> T:
        return self.get(name)(*args, **kwargs)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._items)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


#: Teacher backends: ``create_teacher("openclip:ViT-B-32:laion2b_s34b_b79k")``. A backend class
#: implements ``from_spec(rest)`` for the part of the spec after ``<backend>:``.
TEACHERS: Registry[Any] = Registry("teacher", provider="teachers")
#: Students: ``create_student("vit", preset="vit-ti16-128")``.
STUDENTS: Registry[Any] = Registry("student", provider="students")
#: Distillation losses: ``create_loss("cosine", dims, **cfg)``.
LOSSES: Registry[Any] = Registry("loss", provider="distill.losses")
#: Loss balancers: ``create_balancer("dynamic", names, **cfg)``.
BALANCERS: Registry[Any] = Registry("balancer", provider="distill.balance")
#: Dataset formats (reader classes): ``create_reader(path, format="csv")``; see :mod:`distill.core.data.factory`.
DATASET_FORMATS: Registry[Any] = Registry("dataset format", provider="distill.core.data.formats")


def create_teacher(spec: str, device: Any = "cpu") -> Any:
    """Build a frozen teacher from ``<backend>:<args>`` and move it to ``device``."""
    backend, sep, rest = spec.partition(":")
    if not sep:
        raise ConfigError(f"teacher spec {spec!r} must look like '<backend>:<args>', backends: {TEACHERS.names()}")
    teacher = TEACHERS.get(backend).from_spec(rest)
    teacher.spec = spec
    return teacher.to(device).freeze()


def create_student(name: str, **cfg: Any) -> Any:
    """Build a student by name; ``cfg`` is what ``Student.config()`` returned (minus ``name``)."""
    return STUDENTS.create(name, **cfg)


def create_loss(name: str, dims: Any, **cfg: Any) -> Any:
    """Build a distillation loss by name for the given :class:`distill.losses.base.Dims`."""
    return LOSSES.create(name, dims, **cfg)


def create_balancer(name: str, names: Sequence[str], **cfg: Any) -> Any:
    """Build a loss balancer by name over the loss terms ``names``."""
    return BALANCERS.create(name, list(names), **cfg)


_loaded_plugins: set[str] = set()


def load_plugins(modules: Iterable[str]) -> None:
    """Import every plugin module once (plugins register teachers, students, losses, balancers or
    dataset formats into the registries above). A missing plugin is a :class:`ConfigError`."""
    for module in modules:
        if module in _loaded_plugins:
            continue
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name and module.startswith(e.name):  # the plugin itself, not one of its imports
                raise ConfigError(f"--plugin {module}: no such module") from e
            raise
        _loaded_plugins.add(module)
