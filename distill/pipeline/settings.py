"""Value rules of settings and flags: one :class:`Setting` per value (its kind, its condition, the
text of the error and the flag that sets it), checked with one-line :class:`ConfigError` messages
``"<key> (<flag>) must be <need>, got <value>"``.

Used by the training config (:mod:`distill.pipeline.train.config`, whose dataclass fields carry
their rule) and by the numeric flags of ``cache_teacher`` and ``evaluate`` (:func:`check_args`).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable

from distill.core.errors import ConfigError


def is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_num(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def looks_like_float(s: str) -> bool:
    """True for a numeric string (``"1e-3"``), not for ``nan``/``inf`` spelled out."""
    try:
        float(s)
    except ValueError:
        return False
    return s.strip().lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


@dataclass(frozen=True)
class Setting:
    """One value rule: ``key`` (dotted), ``ok(value)`` after coercion, the ``need`` text of the error
    message, ``kind`` (``"int"``, ``"float"``, ``"bool"``, ``"choice"`` or any other name: no type
    check), the CLI ``flag`` that sets it (named in the error), and whether ``None`` is allowed."""

    key: str
    kind: str
    ok: Callable[[Any], bool]
    need: str
    flag: str | None = None
    nullable: bool = False


def coerce_value(value: Any, kind: str) -> Any:
    """``value`` as ``kind`` (a numeric string such as YAML's ``1e-3`` becomes a float, an integral
    float an int); returns ``value`` unchanged when it does not convert (the rule then fails)."""
    if kind in ("float", "int") and isinstance(value, str) and looks_like_float(value):
        value = float(value)
    if kind == "int" and isinstance(value, float) and value.is_integer():
        value = int(value)
    return value


def check_value(name: str, value: Any, kind: str, ok: Callable[[Any], bool], need: str) -> Any:
    """The coerced ``value`` if it is a ``kind`` satisfying ``ok``; else :class:`ConfigError`
    ``"<name> must be <need>, got <value>"``."""
    value = coerce_value(value, kind)
    typed = {"int": is_int, "float": is_num, "bool": lambda v: isinstance(v, bool)}.get(kind, lambda v: True)
    try:
        good = typed(value) and bool(ok(value))
    except TypeError:
        good = False
    if not good:
        raise ConfigError(f"{name} must be {need}, got {value!r}")
    return value


def check_settings(cfg: dict[str, Any], rules: Iterable[Setting], by_flag: bool = False) -> None:
    """Check (and coerce in place) every setting of ``rules`` present in ``cfg``; errors name
    ``key (flag)``, or only the flag with ``by_flag``."""
    for rule in rules:
        *parents, leaf = rule.key.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if leaf not in node or (rule.nullable and node[leaf] is None):
            continue
        name = (rule.flag if by_flag else f"{rule.key} ({rule.flag})") if rule.flag else rule.key
        node[leaf] = check_value(name, node[leaf], rule.kind, rule.ok, rule.need)


def check_args(args: Any, rules: Iterable[Setting]) -> None:
    """:func:`check_settings` for an ``argparse.Namespace`` (rule keys are attribute names)."""
    check_settings(vars(args), rules, by_flag=True)


def check_out_folder(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a :class:`Path` when it is a folder or can be created as one; a :class:`ConfigError`
    naming ``flag`` when it, or a folder above it, is an existing file (checked before any work)."""
    p = Path(path)
    blocker = _file_at_or_above(p)
    if blocker is not None:
        where = "is an existing file" if blocker == p else f"lies inside {blocker}, an existing file"
        raise ConfigError(f"{flag} {path} {where}, not a folder; pass a folder path")
    return p


def _file_at_or_above(p: Path) -> Path | None:
    """The first of ``p`` and its parents that exists, when it is not a folder (else None)."""
    for q in (p, *p.parents):
        if q.is_dir():
            return None
        if q.exists() or q.is_symlink():
            return q
    return None


def check_out_file(path: str | Path, flag: str = "--out") -> Path:
    """``path`` as a :class:`Path` when a file can be written there: not a folder, no existing file
    above it, its nearest existing folder writable; else a :class:`ConfigError` naming ``flag``
    (checked before the work whose result it will hold)."""
    p = Path(path)
    if p.is_dir():
        raise ConfigError(f"{flag} {path} is a folder; pass a file path")
    blocker = _file_at_or_above(p.parent)
    if blocker is not None:
        raise ConfigError(f"{flag} {path} lies inside {blocker}, an existing file; pass a path in a folder")
    existing = next((q for q in p.parents if q.is_dir()), Path("."))
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"{flag} {path}: {existing} is not writable")
    return p
