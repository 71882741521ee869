"""The node's watchdog, Linux's ``/dev/watchdog`` interface: opening it arms it, every
write feeds it, writing ``V`` before closing disarms it ("magic close"); if it is not fed
within its timeout the machine resets. Closing without ``V`` (a crash of the process
that held it) leaves it armed: the node resets.

On hardware the device is a hardware watchdog or softdog. A lab node has neither (this
kernel has no softdog): its device is a FIFO that the lab daemon, outside the node, reads
and emulates the same contract with, killing the node's whole cgroup when it fires. The
agent's code is the same for both."""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import struct
from pathlib import Path

log = logging.getLogger("cairn.watchdog")
WDIOC_SETTIMEOUT = 0xC0045706  # _IOWR('W', 6, int)


class WatchdogUnavailable(Exception):
    """The device cannot be opened (none, or nobody emulates it)."""


class Watchdog:
    def __init__(self, device: Path, timeout: int) -> None:
        self.device = device
        self.timeout = timeout
        self.fd: int | None = None

    @property
    def armed(self) -> bool:
        return self.fd is not None

    def arm(self) -> None:
        """Open the device (it starts counting) and set its timeout where the driver allows."""
        if self.fd is not None:
            return
        try:
            self.fd = os.open(self.device, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:
            detail = "nobody emulates it" if exc.errno == errno.ENXIO else exc.strerror
            raise WatchdogUnavailable(f"watchdog {self.device}: {detail}") from exc
        try:
            fcntl.ioctl(self.fd, WDIOC_SETTIMEOUT, struct.pack("i", self.timeout))
        except OSError:
            pass  # a FIFO (lab node): the emulator's timeout is set by the lab
        self.feed()
        log.warning("watchdog armed", extra={"device": str(self.device), "timeout": self.timeout})

    def feed(self) -> None:
        if self.fd is not None:
            try:
                os.write(self.fd, b"\0")
            except BlockingIOError:
                pass  # the emulator has unread bytes: it was fed recently enough

    def disarm(self) -> None:
        """Magic close: the watchdog stops counting."""
        if self.fd is None:
            return
        try:
            os.write(self.fd, b"V")
        finally:
            os.close(self.fd)
            self.fd = None
        log.warning("watchdog disarmed", extra={"device": str(self.device)})
