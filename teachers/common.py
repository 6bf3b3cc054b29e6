"""Helpers shared by the teacher backends: forward-hook capture, layer checks, pooling, seeding,
tokenization."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator, Sequence

import torch
from torch import Tensor, nn

from distill.core.errors import ConfigError


class OutputCapture(contextlib.AbstractContextManager):
    """Forward hooks that record the output of named modules while the context is open.

    Tuple outputs keep their first element (the hidden states of transformer blocks).
    """

    def __init__(self, modules: dict[str, nn.Module]) -> None:
        self.modules = modules
        self.outputs: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> "OutputCapture":
        for name, module in self.modules.items():
            self._handles.append(module.register_forward_hook(self._hook(name)))
        return self

    def _hook(self, name: str):
        def record(_module: nn.Module, _inputs: tuple, output) -> None:
            self.outputs[name] = output[0] if isinstance(output, (tuple, list)) else output

        return record

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()


def check_layers(layers: Sequence[int], num_layers: int, tower: str) -> list[int]:
    """Validate intermediate layer indices (0-based block indices) against a tower's depth."""
    out = [int(i) for i in layers]
    bad = [i for i in out if not 0 <= i < num_layers]
    if bad:
        raise ConfigError(f"{tower} layers {bad} out of range: the {tower} tower has {num_layers} blocks (0..{num_layers - 1})")
    return out


def check_prune_depth(k: int, num_layers: int, tower: str) -> int:
    """Validate a pruning depth ``1 <= k <= num_layers``."""
    if not 1 <= int(k) <= num_layers:
        raise ConfigError(f"cannot keep {k} {tower} blocks: the teacher's {tower} tower has {num_layers} (use 1..{num_layers})")
    return int(k)


def require_dir(path: str | Path, backend: str, hint: str = "") -> Path:
    """``path`` as a Path, raising a FileNotFoundError that names the backend when it is no folder."""
    p = Path(path).expanduser()
    if not p.is_dir():
        raise FileNotFoundError(f"{backend}: model folder not found: {p}{'; ' + hint if hint else ''}")
    return p



@contextlib.contextmanager
def seeded(seed: int = 0) -> Iterator[None]:
    """Run a block (e.g. a random initialisation) with a fixed CPU RNG, restoring the global state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield
