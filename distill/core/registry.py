"""Every registry of the project, declared in this leaf module, and the ``create_*`` factories.

One idiom for every pluggable concept (a teacher backend, a student, a loss, a balancer, a dataset
format): the class is registered directly with a decorator in the one file that defines it,

    @LOSSES.register("cosine")
    class CosineLoss(DistillLoss): ...

and built by name with a ``create_*`` factory (``create_loss("cosine", dims, **cfg)``).

An entry's options (the ``cfg`` of a loss or balancer, a student's keyword arguments) are the
parameters of its signature after the positional arguments its factory passes (a loss's ``dims``, a
balancer's ``names``); :meth:`Registry.check_options` binds a dict of options against them, so a
misspelt or missing option is one :class:`ConfigError` naming the key, before anything is built. An
entry whose signature takes ``**kwargs`` lists the names it accepts in ``extra_options`` (or checks
them itself); an entry may add value checks that build nothing heavy in a ``check_options(options)``
classmethod (a student's preset, a teacher spec it names).

The registries live here, in the core, so that a layer can build an object of another layer by
name without importing it (a pruned student builds its teacher with :func:`create_teacher`). Each
registry names the package that fills it (``provider``); that package is imported the first time a
name is looked up, the way ``--plugin`` modules are: an import by name at run time, not a module
dependency. Plugins register into the same registries (see :func:`load_plugins`).
"""
from __future__ import annotations

import importlib
import inspect
from fnmatch import fnmatchcase
from typing import Any, Callable, Generic, Iterable, Mapping, Sequence, TypeVar

from distill.core.errors import ConfigError, UnknownNameError

T = TypeVar("T")


class Registry(Generic[T]):
    """Name -> class (or factory function). ``register(name)`` is a decorator."""

    def __init__(self, kind: str, provider: str | None = None, fixed: Sequence[str] = ()) -> None:
        self.kind = kind
        self.provider = provider
        #: the positional arguments the ``create_*`` factory passes before the options
        self.fixed = tuple(fixed)
        self._items: dict[str, Callable[..., T]] = {}

    def register(self, name: str) -> Callable[[Callable[..., T]], Callable[..., T]]:
        def deco(entry: Callable[..., T]) -> Callable[..., T]:
            if name in self._items and self._items[name] is not entry:
                raise ConfigError(f"{self.kind} {name!r} is already registered")
            self._items[name] = entry
            return entry

        return deco

    def unregister(self, name: str) -> None:
        """Remove ``name`` (a plugin's entry, e.g. at the end of a test); unknown names are ignored."""
        self._items.pop(name, None)

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

    def names(self, pattern: str | None = None) -> list[str]:
        """Sorted registered names; ``pattern`` keeps those matching an fnmatch pattern (``"*clip*"``)."""
        self._load()
        return sorted(n for n in self._items if pattern is None or fnmatchcase(n, pattern))

    def options(self, name: str) -> tuple[list[str], list[str], bool]:
        """``(known, required, open)`` options of ``name``: the parameters of its signature that
        can be given by keyword after the :attr:`fixed` ones (plus its ``extra_options``), those
        without a default, and whether it takes further ``**kwargs`` it checks itself."""
        entry = self.get(name)
        params = list(inspect.signature(entry).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        skip = len(self.fixed)
        while skip and params and params[0].kind in positional:
            params.pop(0)
            skip -= 1
        known, required, open_ = [], [], False
        for p in params:
            if p.kind == inspect.Parameter.VAR_KEYWORD:
                extra = getattr(entry, "extra_options", None)
                open_ = extra is None
                known += [n for n in (extra or ()) if n not in known]
            elif p.kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY):
                known.append(p.name)
                if p.default is inspect.Parameter.empty:
                    required.append(p.name)
        return known, required, open_

    def check_options(self, name: str, options: Mapping[str, Any], where: str = "") -> None:
        """Bind ``options`` to the signature of ``name`` (and run its ``check_options`` classmethod):
        a :class:`ConfigError` naming ``<where><key>`` (``where`` e.g. ``"stages[1].losses[2].cfg."``)
        for an unknown or missing option, before anything is built."""
        if not isinstance(options, Mapping):
            raise ConfigError(f"{where.rstrip('.') or 'options'} of {self.kind} {name!r} must be a mapping of "
                              f"options, got {options!r}")
        known, required, open_ = self.options(name)
        for key in options:
            if key not in known and not open_:
                raise ConfigError(f"{where}{key}: unknown option of {self.kind} {name!r}; "
                                  f"known: {', '.join(known) or '(none)'}")
        for key in required:
            if key not in options:
                raise ConfigError(f"{where}{key}: required option of {self.kind} {name!r} is not given")
        hook = getattr(self.get(name), "check_options", None)
        if hook is not None:  # its messages start with the option's key
            try:
                hook(dict(options))
            except ConfigError as e:
                if not where:
                    raise
                raise type(e)(f"{where}{e}") from e

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._items


#: Teacher backends: ``create_teacher("openclip:ViT-B-32:laion2b_s34b_b79k")``. A backend class
#: implements ``from_spec(rest)`` for the part of the spec after ``<backend>:``.
TEACHERS: Registry[Any] = Registry("teacher", provider="teachers")
#: Students: ``create_student("vit", preset="vit-ti16-128")``.
STUDENTS: Registry[Any] = Registry("student", provider="students")
#: Distillation losses: ``create_loss("cosine", dims, **cfg)``.
LOSSES: Registry[Any] = Registry("loss", provider="distill.losses", fixed=("dims",))
#: Loss balancers: ``create_balancer("dynamic", names, **cfg)``.
BALANCERS: Registry[Any] = Registry("balancer", provider="distill.balance", fixed=("names",))
#: Dataset formats (reader classes): ``create_reader(path, format="csv")``; see :mod:`distill.core.data.factory`.
DATASET_FORMATS: Registry[Any] = Registry("dataset format", provider="distill.core.data.formats")


def _teacher_backend(spec: Any) -> tuple[Any, str]:
    backend, sep, rest = spec.partition(":") if isinstance(spec, str) else ("", "", "")
    if not sep:
        raise ConfigError(f"teacher spec {spec!r} must look like '<backend>:<args>', backends: {TEACHERS.names()}")
    return TEACHERS.get(backend), rest


def check_teacher_spec(spec: Any) -> None:
    """Check a teacher spec without building the teacher: the backend is registered and its
    ``check_spec(rest)`` classmethod, where it has one, accepts the rest (raises :class:`ConfigError`)."""
    backend, rest = _teacher_backend(spec)
    hook = getattr(backend, "check_spec", None)
    if hook is not None:
        hook(rest)


def create_teacher(spec: str, device: Any = "cpu") -> Any:
    """Build a frozen teacher from ``<backend>:<args>`` and move it to ``device``."""
    backend, rest = _teacher_backend(spec)
    teacher = backend.from_spec(rest)
    teacher.spec = spec
    return teacher.to(device).freeze()


def create_student(name: str, **cfg: Any) -> Any:
    """Build a student by name; ``cfg`` is what ``Student.config()`` returned (minus ``name``).
    Options are checked first (:meth:`Registry.check_options`)."""
    STUDENTS.check_options(name, cfg)
    return STUDENTS.create(name, **cfg)


def create_loss(name: str, dims: Any, **cfg: Any) -> Any:
    """Build a distillation loss by name for the given :class:`distill.losses.base.Dims` (options
    checked first)."""
    LOSSES.check_options(name, cfg)
    return LOSSES.create(name, dims, **cfg)


def create_balancer(name: str, names: Sequence[str], **cfg: Any) -> Any:
    """Build a loss balancer by name over the loss terms ``names`` (options checked first)."""
    BALANCERS.check_options(name, cfg)
    return BALANCERS.create(name, list(names), **cfg)


def list_teachers(pattern: str | None = None) -> list[str]:
    """Sorted teacher backends (``pattern``: an fnmatch filter, e.g. ``"*clip*"``)."""
    return TEACHERS.names(pattern)


def list_students(pattern: str | None = None) -> list[str]:
    """Sorted student names (``pattern``: an fnmatch filter)."""
    return STUDENTS.names(pattern)


def list_losses(pattern: str | None = None) -> list[str]:
    """Sorted loss names (``pattern``: an fnmatch filter)."""
    return LOSSES.names(pattern)


def list_balancers(pattern: str | None = None) -> list[str]:
    """Sorted balancer names (``pattern``: an fnmatch filter)."""
    return BALANCERS.names(pattern)


def list_formats(pattern: str | None = None) -> list[str]:
    """Sorted dataset format names (``pattern``: an fnmatch filter)."""
    return DATASET_FORMATS.names(pattern)


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
