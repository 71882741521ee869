"""kill -9 of cairn-nbd at random points during writes: every flushed write survives.

The model keeps, for every byte of the volume, the content it must have and whether it
is certain. A byte becomes uncertain as soon as a write covering it is *sent* (it may or
may not land if the daemon dies), and certain again once that write is made durable by
a FLUSH (or its own FUA) reply. After each crash the certain bytes must read back
exactly; the uncertain ones are adopted from what the restarted daemon serves.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.engine import open_pool
from storage.maintenance import check_consistency
from tests.storage.conftest import NbdDaemon
from tests.storage.nbd_client import NbdClient, NbdClientError

pytestmark = pytest.mark.functional
ITERATIONS = 50
SIZE = 4 << 20


class Model:
    """Expected bytes plus a certainty mask (0xff = must match)."""

    def __init__(self) -> None:
        self.expected = bytearray(SIZE)
        self.certain = bytearray(b"\xff" * SIZE)
        self.pending: list[tuple[int, bytes]] = []
        self.writes = self.flushes = 0

    def verify_and_adopt(self, actual: bytes) -> None:
        a, e, m = (int.from_bytes(x, "big") for x in (actual, self.expected, self.certain))
        if a & m != e & m:
            diff = next(i for i in range(SIZE) if self.certain[i] and actual[i] != self.expected[i])
            raise AssertionError(f"durable byte at offset {diff} lost or changed")
        self.expected = bytearray(actual)
        self.certain = bytearray(b"\xff" * SIZE)
        self.pending.clear()


def _writer(client: NbdClient, rng: random.Random, model: Model, stop: threading.Event) -> None:
    try:
        while not stop.is_set():
            n = rng.choice((512, 4096, 65536, 131072, rng.randrange(1, 200_000)))
            off = rng.randrange(0, SIZE - n)
            data = rng.randbytes(n)
            fua = rng.random() < 0.15
            model.certain[off : off + n] = bytes(n)  # before sending: it may land or not
            model.pending.append((off, data))
            client.write(off, data, fua=fua)
            model.writes += 1
            if fua:
                model.expected[off : off + n] = data
                model.certain[off : off + n] = b"\xff" * n
            if rng.random() < 0.25:
                client.flush()
                model.flushes += 1
                for o, d in model.pending:
                    model.expected[o : o + len(d)] = d
                    model.certain[o : o + len(d)] = b"\xff" * len(d)
                model.pending.clear()
    except (NbdClientError, OSError):
        return


def _crash_loop(nbd_daemons: Callable[..., NbdDaemon], backend: str, seed: int) -> None:
    rng = random.Random(seed)
    model = Model()
    daemon = nbd_daemons(backend=backend, create=[f"crash:{SIZE}"])
    interrupted = 0
    for it in range(ITERATIONS):
        if it:
            daemon.start()
        client = NbdClient(daemon.socket, "crash")
        model.verify_and_adopt(client.read(0, SIZE))
        stop = threading.Event()
        t = threading.Thread(target=_writer, args=(client, rng, model, stop))
        writes_before = model.writes
        t.start()
        deadline = time.monotonic() + 10
        while model.writes == writes_before and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(rng.uniform(0.0, 0.12))
        daemon.kill()  # kill -9 while the writer is mid-stream
        t.join(timeout=30)
        interrupted += t.is_alive() is False and model.writes > writes_before
        stop.set()
        client.close()
        pool = open_pool(backend, readonly=True)
        try:
            assert check_consistency(pool) == [], f"inconsistent after crash {it}"
        finally:
            pool.close()
    daemon.start()
    client = NbdClient(daemon.socket, "crash")
    model.verify_and_adopt(client.read(0, SIZE))
    client.close()
    assert model.flushes > ITERATIONS
    assert interrupted == ITERATIONS


def test_flushed_writes_survive_kill_9_on_local(nbd_daemons: Callable[..., NbdDaemon], tmp_path: Path) -> None:
    _crash_loop(nbd_daemons, f"local://{tmp_path / 'crashpool'}", seed=11)


def test_flushed_writes_survive_kill_9_on_rados(nbd_daemons: Callable[..., NbdDaemon], ceph: CephCluster) -> None:
    _crash_loop(nbd_daemons, ceph.backend_url("crash"), seed=12)
