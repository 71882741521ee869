"""Messages for the person (and the test harness) watching the machine's consoles.

Each line is written to the serial console and the screen, reopening the device every
time: a serial getty that starts meanwhile hangs up ttyS0 (vhangup), after which a
descriptor held open from before fails with EIO.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

CONSOLES = (Path("/dev/ttyS0"), Path("/dev/tty0"))  # serial and screen (/dev/console is one of them)


class Reporter:
    def __init__(self, prefix: str, consoles: Sequence[Path] = CONSOLES, log: Path | None = None,
                 echo: bool = True) -> None:
        self.prefix = prefix
        self.consoles = consoles
        self.log = log
        self.echo = echo

    def say(self, message: str) -> None:
        """One line, prefixed (``CAIRN-INSTALL: OK``), on every console and in the log."""
        line = f"{self.prefix}: {message}"
        self.raw(line)

    def raw(self, text: str) -> None:
        data = (text.rstrip("\n") + "\n").encode(errors="replace")
        for dev in self.consoles:
            try:
                fd = os.open(dev, os.O_WRONLY | os.O_NOCTTY | os.O_APPEND | os.O_CREAT, 0o644)
                try:
                    os.write(fd, data.replace(b"\n", b"\r\n") if dev.is_char_device() else data)
                finally:
                    os.close(fd)
            except OSError:
                continue  # no such console on this machine
        if self.log is not None:
            self.log.parent.mkdir(parents=True, exist_ok=True)
            with open(self.log, "ab") as f:
                f.write(data)
        if self.echo:
            sys.stderr.write(text.rstrip("\n") + "\n")
            sys.stderr.flush()
