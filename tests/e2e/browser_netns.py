"""Chromium in a network namespace of its own, reaching the appliance through a relay.

Chromium aborts every request in flight (``net::ERR_NETWORK_CHANGED``) when any
interface of its network namespace gains or loses an address, and an appliance that
runs guests makes bridges, taps and veths (each with an IPv6 link-local address) all
the time. So the browser gets a namespace with only loopback, where ``127.0.0.1:<port>``
is relayed over a unix socket (the filesystem crosses namespaces) to the API's port on
the host. Same URL, same cookies, no interface changes seen.

``python -m tests.e2e.browser_netns LISTEN CONNECT`` runs one relay; each end is
``tcp:HOST:PORT`` or ``unix:PATH``."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from tests.e2e.browser import CHROMIUM

ROOT = Path(__file__).resolve().parents[2]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        with suppress(OSError):
            writer.close()


async def _open(end: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    kind, _, where = end.partition(":")
    if kind == "unix":
        return await asyncio.open_unix_connection(where)
    host, _, port = where.rpartition(":")
    return await asyncio.open_connection(host, int(port))


async def relay(listen: str, connect: str) -> None:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await _open(connect)
        except OSError:
            writer.close()
            return
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))

    kind, _, where = listen.partition(":")
    if kind == "unix":
        server = await asyncio.start_unix_server(serve, where)
    else:
        host, _, port = where.rpartition(":")
        server = await asyncio.start_server(serve, host, int(port))
    async with server:
        await server.serve_forever()


def _ip(*args: str) -> None:
    r = subprocess.run(["ip", *args], capture_output=True, text=True)
    if r.returncode:
        raise RuntimeError(f"ip {' '.join(args)} failed: {r.stderr.strip()}")


def _wait_listening(check: subprocess.Popen[bytes], test: list[str], what: str) -> None:
    deadline = time.monotonic() + 10
    while subprocess.run(test, capture_output=True).returncode:
        if check.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the {what} relay did not start")
        time.sleep(0.05)


@contextmanager
def isolated_chromium(port: int) -> Iterator[str]:
    """Yields a Chromium launcher (for Playwright's ``executable_path``) that runs the
    browser in a fresh network namespace where 127.0.0.1:``port`` is the host's."""
    name = f"cairn-e2e-{os.getpid()}"
    root = Path(tempfile.mkdtemp(prefix="cairn-e2e-netns-"))
    sock = root / "api.sock"
    relays: list[subprocess.Popen[bytes]] = []
    py = [sys.executable, "-m", "tests.e2e.browser_netns"]
    try:
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)  # a crashed run's leftover
        _ip("netns", "add", name)
        _ip("-n", name, "link", "set", "lo", "up")
        relays.append(subprocess.Popen([*py, f"unix:{sock}", f"tcp:127.0.0.1:{port}"], cwd=ROOT))
        _wait_listening(relays[-1], ["test", "-S", str(sock)], "host")
        relays.append(subprocess.Popen(["ip", "netns", "exec", name, *py, f"tcp:127.0.0.1:{port}", f"unix:{sock}"],
                                       cwd=ROOT))
        probe = ["ip", "netns", "exec", name, sys.executable, "-c",
                 f"import socket; socket.create_connection(('127.0.0.1', {port}), 1).close()"]
        _wait_listening(relays[-1], probe, "namespace")
        launcher = root / "chromium"
        launcher.write_text(f'#!/bin/sh\nexec ip netns exec {name} {CHROMIUM} "$@"\n')
        launcher.chmod(0o755)
        yield str(launcher)
    finally:
        for proc in relays:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    asyncio.run(relay(sys.argv[1], sys.argv[2]))
