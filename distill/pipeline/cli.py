"""One top-level error handler for every command-line entry point.

``cli_main(main)`` in a module's ``__main__`` block (``sys.exit(run_cli(main))``): the project's typed errors
(every :class:`~distill.core.errors.DistillError`: ``ConfigError``, the ``CacheError`` family,
``BadSampleError``, ``CheckpointError``, ``ExportError``, ...), missing/unreadable files and bad
arguments print ONE line ``error: ...`` on stderr and exit 2; Ctrl-C prints one line
``interrupted; <what to do>`` (the command module's ``INTERRUPTED_HINT``) and exits 130; ``--debug``
anywhere on the command line shows the full traceback instead. Any other exception is a bug: one
``internal error:`` line says so and its traceback follows. A command's
``main(argv)`` returns its exit code and raises typed errors; the work itself is a library function
returning a typed result (``evaluate(...) -> EvalResult``, ``export_student(...) -> ExportResult``,
``train(config) -> TrainResult``, ``run_cache(settings, job) -> CacheResult``,
``train_lit(...) -> LiTResult``).

:class:`ArgumentParser` (a drop-in ``argparse.ArgumentParser``) reports a bad flag as one
``error: argument --x: ...`` line (exit 2) instead of the usage block, and lists ``--debug``.
"""
from __future__ import annotations

import argparse
import sys
import traceback
from typing import Any, Callable, NoReturn, Sequence

from distill.core.registry import load_plugins
from distill.core.errors import ConfigError, DistillError

#: Exit status of every reported (expected) error: bad input, bad arguments, bad files.
EXIT_ERROR = 2
#: Exit status after Ctrl-C (128 + SIGINT, as a shell reports it).
EXIT_INTERRUPTED = 130

#: Errors that are the user's input, not a bug: reported as one line. The project's typed hierarchy
#: and missing/unreadable files; anything else (a plain ``ValueError`` included) is a bug and keeps its
#: traceback.
USER_ERRORS: tuple[type[BaseException], ...] = (DistillError, FileNotFoundError, PermissionError,
                                                 IsADirectoryError, NotADirectoryError)

NO_GPU = "CUDA requested but no GPU is available"


PLUGIN_HELP = ("module to import first (repeatable); it registers teachers, students, losses, balancers or "
               "dataset formats")


class ArgumentParser(argparse.ArgumentParser):
    """``argparse.ArgumentParser`` whose errors are one line (``error: argument --x: ...``, exit 2),
    which accepts ``--debug`` (read by :func:`run_cli`) and ``--plugin MODULE`` (repeatable): every
    command's plugins are imported here, once, as soon as the flags are parsed
    (:func:`distill.core.registry.load_plugins`), before any name is looked up."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        if not args and "prog" not in kwargs and spec is not None:
            kwargs["prog"] = f"python -m {spec.name}"
        super().__init__(*args, **kwargs)
        self.add_argument("--debug", action="store_true", help="show the full traceback of an error")
        self.add_argument("--plugin", action="append", default=[], metavar="MODULE", help=PLUGIN_HELP)

    def parse_known_args(self, args: Sequence[str] | None = None, namespace: Any = None) -> tuple[argparse.Namespace, list[str]]:
        ns, rest = super().parse_known_args(args, namespace)
        load_plugins(getattr(ns, "plugin", None) or [])
        return ns, rest

    def error(self, message: str) -> NoReturn:
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def flag_value(argv: Sequence[str], flag: str) -> str | None:
    """The value of ``flag`` in ``argv`` (``--flag v`` or ``--flag=v``; the last one wins)."""
    value = None
    for i, a in enumerate(argv):
        if a == flag and i + 1 < len(argv):
            value = argv[i + 1]
        elif a.startswith(flag + "="):
            value = a[len(flag) + 1:]
    return value


def check_device(device: str | None, flag: str = "--device") -> None:
    """Raise :class:`ConfigError` ("CUDA requested but no GPU is available") for a CUDA device without a GPU."""
    if device and device.strip().lower().startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise ConfigError(f"{flag} {device}: {NO_GPU}")


def error_line(e: BaseException) -> str:
    """``error: <message>`` in one line (the first line of the exception's message)."""
    msg = e.args[0] if len(e.args) == 1 and isinstance(e.args[0], str) else str(e)
    msg = (msg.strip().splitlines() or [type(e).__name__])[0]
    if isinstance(e, OSError) and e.filename is not None and str(e.filename) not in msg:
        msg = f"{e.filename}: {e.strerror or msg}"
    return msg if msg.startswith("error:") else f"error: {msg}"


def _close_progress_bars() -> None:
    """Close open tqdm bars so that the error line starts on a line of its own."""
    tqdm = sys.modules.get("tqdm")
    for bar in list(getattr(getattr(tqdm, "tqdm", None), "_instances", None) or []):
        bar.close()


def _report(e: BaseException, debug: bool) -> int:
    _close_progress_bars()
    if debug:
        traceback.print_exc()
    print(error_line(e), file=sys.stderr, flush=True)
    return EXIT_ERROR


def interrupted_line(main: Callable[..., Any], argv: Sequence[str]) -> str:
    """``interrupted`` plus what to do next: the ``INTERRUPTED_HINT`` of ``main``'s module, a string
    or a function of ``argv`` (train_student: ``resume with --resume auto``)."""
    hint = getattr(sys.modules.get(getattr(main, "__module__", "") or ""), "INTERRUPTED_HINT", None)
    if callable(hint):
        try:
            hint = hint(list(argv))
        except Exception:  # noqa: BLE001 - the hint must never hide the interrupt
            hint = None
    return f"interrupted; {hint}" if hint else "interrupted"


def run_cli(main: Callable[[list[str]], int], argv: Sequence[str] | None = None) -> int:
    """Run the command ``main(argv)`` (which returns its exit code): that code, or 2 with one
    ``error: ...`` line for user errors, the traceback too with ``--debug``; Ctrl-C prints one
    :func:`interrupted_line` and returns 130."""
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    try:
        check_device(flag_value(argv, "--device"))
        code = main(argv)
    except SystemExit as e:  # argparse: --help (0) or a bad flag (2, its line already printed)
        return int(e.code or 0) if not isinstance(e.code, str) else _report(e, debug)
    except USER_ERRORS as e:
        return _report(e, debug)
    except KeyboardInterrupt:
        _close_progress_bars()
        if debug:
            traceback.print_exc()
        print(interrupted_line(main, argv), file=sys.stderr, flush=True)
        return EXIT_INTERRUPTED
    except Exception as e:  # not a user error: a bug; the traceback follows
        _close_progress_bars()
        print(f"internal error: {type(e).__name__} is a bug in mmdistill or a plugin, not a problem with the "
              "input; the traceback follows", file=sys.stderr, flush=True)
        raise
    if not isinstance(code, int) or isinstance(code, bool):
        raise TypeError(f"{getattr(main, '__module__', '?')}.main returned {code!r}, not an exit code")
    return code


def cli_main(main: Callable[[list[str]], Any]) -> NoReturn:
    """``if __name__ == "__main__": cli_main(main)``: :func:`run_cli` on ``sys.argv`` and exit."""
    sys.exit(run_cli(main))
