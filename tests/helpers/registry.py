"""Registering a test-only plugin for one test: :func:`registered` adds an entry to a registry and
removes it afterwards, so no test leaves its plugins in the global registries (and no test reads
a registry's private state)."""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Iterator


@contextmanager
def registered(registry: Any, name: str, entry: Any) -> Iterator[Any]:
    """``registry.register(name)(entry)`` for the duration of the ``with`` block."""
    registry.register(name)(entry)
    try:
        yield entry
    finally:
        registry.unregister(name)
