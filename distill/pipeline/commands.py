"""``mmdistill``: one console script for every command (``setup.cfg`` entry point :func:`cli`).

    mmdistill cache  ...   python -m distill.cache_teacher  (teacher outputs -> a cache)
    mmdistill train  ...   python -m distill.train_student  (a student from a cache)
    mmdistill eval   ...   python -m distill.evaluate       (Recall@K, RSUM)
    mmdistill export ...   python -m distill.export         (open_clip, ONNX, HF, safetensors)
    mmdistill lit    ...   python -m distill.train_lit      (a LiT teacher: probe or fine-tune)
    mmdistill list [teachers|students|losses|balancers|formats|presets] [--filter PATTERN]

Each subcommand runs the command's ``main(argv)`` with the remaining arguments through
:func:`distill.pipeline.cli.run_cli` (one ``error:`` line and exit status 2 for bad input).
"""
from __future__ import annotations

import importlib
import sys
from typing import Callable, NoReturn, Sequence

from distill.core.errors import ConfigError
from distill.pipeline.cli import EXIT_ERROR, ArgumentParser, run_cli

#: subcommand -> (module with ``main(argv)``, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "cache": ("distill.pipeline.cache.main", "run a frozen teacher once and write its outputs to a cache"),
    "train": ("distill.pipeline.train.main", "train a student against a teacher cache"),
    "eval": ("distill.pipeline.evaluate", "zero-shot retrieval evaluation (Recall@1/5/10, RSUM)"),
    "export": ("distill.pipeline.export.main", "export a trained student (open_clip, ONNX, HF, safetensors)"),
    "lit": ("distill.pipeline.lit.train", "train a LiT teacher's projections (probe) or fine-tune its towers"),
    "list": ("distill.pipeline.commands", "list the registered teachers, students, losses, ... and presets"),
}
KINDS = ("teachers", "students", "losses", "balancers", "formats", "presets")


def lister(kind: str) -> Callable[[str | None], list[str]]:
    """``list_<kind>`` of the public API."""
    if kind == "presets":
        from distill.pipeline.train.config import presets

        return presets
    from distill.core import registry

    return getattr(registry, f"list_{kind}")


def list_main(argv: Sequence[str] | None = None) -> int:
    """``mmdistill list [KIND ...] [--filter PATTERN]``: one ``kind: names`` line per kind."""
    p = ArgumentParser(prog="mmdistill list", description=COMMANDS["list"][1])
    p.add_argument("kinds", nargs="*", metavar="KIND", help=f"any of {', '.join(KINDS)} (default: all)")
    p.add_argument("--filter", help="fnmatch pattern, e.g. '*clip*'")
    args = p.parse_args(argv)
    for kind in args.kinds:
        if kind not in KINDS:
            raise ConfigError(f"mmdistill list {kind}: unknown kind; kinds: {', '.join(KINDS)}")
    for kind in args.kinds or KINDS:
        print(f"{kind}: {', '.join(lister(kind)(args.filter))}")
    return 0


def usage() -> str:
    width = max(map(len, COMMANDS))
    return "usage: mmdistill COMMAND [ARGS] (mmdistill COMMAND --help)\n\ncommands:\n" + "\n".join(
        f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items())


def run(argv: Sequence[str]) -> int:
    """Dispatch ``argv`` (``COMMAND [ARGS]``); returns the exit status."""
    argv = list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(usage())
        return 0 if argv else EXIT_ERROR
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}; commands: {', '.join(COMMANDS)}", file=sys.stderr)
        return EXIT_ERROR
    main = list_main if name == "list" else importlib.import_module(COMMANDS[name][0]).main
    return run_cli(main, rest)


def cli() -> NoReturn:
    """The ``mmdistill`` console script."""
    sys.exit(run(sys.argv[1:]))


if __name__ == "__main__":
    cli()
