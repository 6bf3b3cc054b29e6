"""Process helpers: a free TCP port for torchrun, a pid no process has, and ``SubprocessLog``, which
records the subprocesses a test starts (``tests/conftest.py`` fails a test that starts one without the
``slow`` mark)."""
from __future__ import annotations

import functools
import os
import socket
import subprocess
from pathlib import Path
from typing import Any

SLOW_HINT = "starts a subprocess: mark it @pytest.mark.slow"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unused_pid() -> int:
    """A pid no process has right now (counting down from the kernel's maximum)."""
    pid = int(Path("/proc/sys/kernel/pid_max").read_text()) - 1
    while True:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            pass
        pid -= 1


def describe(args: Any, limit: int = 120) -> str:
    """A ``Popen`` argument (a string or a list) as one short line."""
    text = args if isinstance(args, (str, bytes)) else " ".join(map(str, args))
    text = text.decode(errors="replace") if isinstance(text, bytes) else text
    return text if len(text) <= limit else text[: limit - 3] + "..."


class SubprocessLog:
    """The commands of the subprocesses started while installed, in ``started``.

    It wraps ``subprocess.Popen.__init__``, which ``subprocess.run``/``call``/``check_output``,
    ``os.popen`` and torchrun launches all go through (a start is recorded even when the program then
    cannot be executed). ``multiprocessing`` (DataLoader workers included) starts its processes
    without ``Popen``: those are not recorded. Installs nest: ``uninstall`` restores whatever
    ``install`` replaced.
    """

    def __init__(self) -> None:
        self.started: list[str] = []
        self._replaced = None

    def install(self) -> None:
        if self._replaced is not None:
            return
        real = self._replaced = subprocess.Popen.__init__
        started = self.started

        @functools.wraps(real)
        def init(popen, args, *rest, **kwargs):
            started.append(describe(args))
            real(popen, args, *rest, **kwargs)

        subprocess.Popen.__init__ = init

    def uninstall(self) -> None:
        if self._replaced is not None:
            subprocess.Popen.__init__ = self._replaced
            self._replaced = None

    def report(self) -> str:
        """The failure message of an unmarked test that started ``started``."""
        more = "; ..." if len(self.started) > 3 else ""
        return f"{SLOW_HINT} (started {len(self.started)}: {'; '.join(self.started[:3])}{more})"
