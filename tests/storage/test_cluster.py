"""Several nodes writing one Ceph pool: each node is a ``cairn-storaged`` process with
its own RADOS client (what the lab cluster runs per node namespace). One owner per
volume, handover, takeover after kill -9, fencing a half-alive node, dedup across
nodes, garbage collection and scrub while two nodes write."""

from __future__ import annotations

import os
import random
import signal
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from storage.backends.rados_cluster import CephCluster
from storage.errors import OwnedElsewhere
from tests.storage.conftest import Daemon, run_tool
from tests.storage.nbd_client import NbdClient, NbdClientError
from tests.storage.test_crash import Model, _writer

pytestmark = pytest.mark.functional
MiB = 1 << 20
BLOCK = 65536


def _nodes(storage_daemons: Callable[[str], Daemon], ceph: CephCluster, *names: str) -> tuple[str, list[Daemon]]:
    url = ceph.backend_url(f"c-{uuid.uuid4().hex[:10]}")
    nodes = [storage_daemons(n) for n in names]
    for d in nodes:
        d.client.call("attach", name="p", backend=url)
    return url, nodes


def test_one_owner_a_conflict_naming_it_and_a_handover_to_a_waiting_connection(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    _url, (n1, n2) = _nodes(storage_daemons, ceph, "n1", "n2")
    n1.client.call("create", pool="p", volume="v", size=16 * MiB)
    n1.client.call("take", pool="p", volume="v")
    with pytest.raises(OwnedElsewhere, match="owned by node 'n1'"):
        n2.client.call("take", pool="p", volume="v")
    owner = n2.client.call("owner", pool="p", volume="v")
    me = n1.client.call("pools")[0]
    assert owner["node"] == "n1" and owner["addr"] == me["client"] and owner["alive"] == "alive"
    src = NbdClient(n1.socket("p"), "v")
    data = os.urandom(2 * MiB)
    src.write(0, data)
    src.flush()
    # Node 2's connection (a live migration's destination) is accepted and waits for the lock.
    got: dict[str, bytes] = {}
    dst = NbdClient(n2.socket("p"), "v")
    reader = threading.Thread(target=lambda: got.update(data=dst.read(0, 3 * MiB)))
    reader.start()
    time.sleep(1.0)
    assert reader.is_alive() and not got
    more = os.urandom(MiB)
    src.write(2 * MiB, more)
    src.flush()
    src.close()  # the source's QEMU goes away...
    n1.client.call("release", pool="p", volume="v")  # ...and its node gives the lock back
    reader.join(20)
    assert got["data"] == data + more
    assert n1.client.call("owner", pool="p", volume="v")["node"] == "n2"
    assert n2.client.call("owned", pool="p") == ["v"] and n1.client.call("owned", pool="p") == []
    dst.close()


def test_takeover_after_kill_9_mid_write_keeps_every_flushed_block(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    _url, nodes = _nodes(storage_daemons, ceph, "n1", "n2")
    nodes[0].client.call("create", pool="p", volume="v", size=4 * MiB)
    rng = random.Random(7)
    model = Model()
    for round_ in range(4):
        owner, other = nodes[round_ % 2], nodes[(round_ + 1) % 2]
        client = NbdClient(owner.socket("p"), "v")
        model.verify_and_adopt(client.read(0, 4 * MiB))
        stop = threading.Event()
        t = threading.Thread(target=_writer, args=(client, rng, model, stop))
        before = model.writes
        t.start()
        while model.writes < before + 20:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.1))
        owner.kill()  # kill -9 mid-write
        t.join(30)
        stop.set()
        client.close()
        t0 = time.monotonic()
        other.client.call("take", pool="p", volume="v")  # its owner's process is gone: fence, break, replay
        took = time.monotonic() - t0
        survivor = NbdClient(other.socket("p"), "v")
        model.verify_and_adopt(survivor.read(0, 4 * MiB))
        survivor.close()
        assert other.client.call("owner", pool="p", volume="v")["node"] == other.node
        assert took < 10, took
        other.client.call("release", pool="p", volume="v")
        owner.start()
        owner.client.call("attach", name="p", backend=nodes[0].client.call("pools")[0]["backend"]
                          if nodes[0].proc else other.client.call("pools")[0]["backend"])
    assert model.flushes >= 4
    assert nodes[0].client.call("check", pool="p") == []


def test_a_half_alive_owner_is_fenced_and_its_late_writes_are_refused_by_ceph(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    _url, (n1, n2) = _nodes(storage_daemons, ceph, "n1", "n2")
    n1.client.call("create", pool="p", volume="v", size=8 * MiB)
    client = NbdClient(n1.socket("p"), "v")
    flushed = os.urandom(MiB)
    client.write(0, flushed)
    client.flush()
    n1.signal(signal.SIGSTOP)  # node 1 hangs: alive, not answering
    late: dict[str, object] = {}

    def write_late() -> None:
        try:
            client.write(0, b"\xee" * BLOCK)
            client.flush()
            late["result"] = "acknowledged"
        except (NbdClientError, OSError) as exc:
            late["result"] = f"refused: {exc}"

    t = threading.Thread(target=write_late)
    t.start()
    time.sleep(0.3)
    with pytest.raises(OwnedElsewhere, match="n1"):
        n2.client.call("take", pool="p", volume="v")  # its process lives: only a fence frees it
    report = n2.client.call("fence", node="n1")["p"]  # what the HA manager calls
    assert report["volumes"] == ["v"] and report["blocklisted"]
    n2.client.call("take", pool="p", volume="v")
    reader = NbdClient(n2.socket("p"), "v")
    assert reader.read(0, MiB) == flushed
    n1.signal(signal.SIGCONT)  # node 1 wakes up and tries to land its write
    t.join(30)
    assert str(late.get("result", "")).startswith("refused"), late
    time.sleep(1.0)
    assert reader.read(0, MiB) == flushed  # not silently merged
    reader.close()
    client.close()
    deadline = time.monotonic() + 20
    while [p["client"] for p in n1.client.call("pools")] in ([], report["blocklisted"]):
        assert time.monotonic() < deadline, "node 1 did not come back with a new RADOS client"
        time.sleep(0.5)
    with pytest.raises(OwnedElsewhere, match="n2"):
        n1.client.call("take", pool="p", volume="v")


def _write_dataset(d: Daemon, volume: str, src: Path) -> None:
    uri = d.client.call("export", pool="p", volume=volume)["unix"]
    run_tool("qemu-img", "convert", "-n", "-f", "raw", "-O", "raw", str(src), uri)


def test_the_same_data_from_three_nodes_is_stored_once_after_a_collection(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster, tmp_path: Path) -> None:
    src = tmp_path / "dataset.bin"
    src.write_bytes(os.urandom(32 * MiB))
    _u1, (solo,) = _nodes(storage_daemons, ceph, "solo")
    solo.client.call("create", pool="p", volume="d", size=32 * MiB)
    _write_dataset(solo, "d", src)
    solo.client.call("seal", pool="p")
    one = solo.client.call("stats", pool="p")["backend_bytes"]
    _u3, nodes = _nodes(storage_daemons, ceph, "n1", "n2", "n3")
    for i, d in enumerate(nodes):
        d.client.call("create", pool="p", volume=f"d{i}", size=32 * MiB)
    threads = [threading.Thread(target=_write_dataset, args=(d, f"d{i}", src)) for i, d in enumerate(nodes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for d in nodes:
        d.client.call("seal", pool="p")
    written = nodes[0].client.call("stats", pool="p")["backend_bytes"]
    report = nodes[1].client.call("gc", pool="p", grace_seconds=0, ack_timeout=30)
    three = nodes[0].client.call("stats", pool="p")["backend_bytes"]
    print(f"\nstored bytes: one node {one}, three nodes at once {written} ({written / one:.2f}x), "
          f"after a collection {three} ({three / one:.3f}x); {report}")
    assert report["waiting_for"] == [] and report["deleted_segments"] >= 1
    assert three <= 1.1 * one, (one, written, three)
    for i, d in enumerate(nodes):
        out = tmp_path / f"out{i}.bin"
        run_tool("nbdcopy", d.client.call("export", pool="p", volume=f"d{i}")["unix"], str(out))
        assert out.read_bytes() == src.read_bytes()


def _take_when_released(d: Daemon, volume: str, timeout: float = 10.0) -> None:
    """Take a volume whose owner lets go once its client disconnected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            d.client.call("take", pool="p", volume=volume)
            return
        except OwnedElsewhere:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.05)


class _Writer(threading.Thread):
    """Writes blocks (fresh ones and blocks of a deleted volume) to its node's volume,
    flushing, until stopped; ``expected`` is what the volume must hold."""

    def __init__(self, d: Daemon, volume: str, size: int, dead: list[bytes], seed: int) -> None:
        super().__init__()
        self.client = NbdClient(d.socket("p"), volume)
        self.expected = bytearray(self.client.read(0, size))
        self.size, self.dead, self.rng = size, dead, random.Random(seed)
        self.stop = threading.Event()
        self.writes = 0
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                off = self.rng.randrange(0, self.size // BLOCK) * BLOCK
                data = self.rng.choice(self.dead) if self.rng.random() < 0.5 else self.rng.randbytes(BLOCK)
                self.client.write(off, data)
                self.expected[off : off + BLOCK] = data
                self.writes += 1
                if self.writes % 8 == 0:
                    self.client.flush()
            self.client.flush()
        except BaseException as exc:
            self.error = exc


def test_gc_and_scrub_while_two_nodes_write_lose_nothing(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    _url, (n1, n2) = _nodes(storage_daemons, ceph, "n1", "n2")
    dead = [os.urandom(BLOCK) for _ in range(96)]
    n1.client.call("create", pool="p", volume="old", size=8 * MiB)
    c = NbdClient(n1.socket("p"), "old")
    c.write(0, b"".join(dead))
    c.flush()
    c.close()
    n1.client.call("delete", pool="p", volume="old")
    n1.client.call("seal", pool="p")
    n1.client.call("create", pool="p", volume="a", size=8 * MiB)
    n2.client.call("create", pool="p", volume="b", size=8 * MiB)
    writers = [_Writer(n1, "a", 8 * MiB, dead, 1), _Writer(n2, "b", 8 * MiB, dead, 2)]
    for w in writers:
        w.start()
    reports = []
    for _ in range(2):
        time.sleep(0.5)
        reports.append(n1.client.call("gc", pool="p", grace_seconds=0, ack_timeout=30))
    scrubbed = n2.client.call("scrub", pool="p")
    for w in writers:
        w.stop.set()
    for w in writers:
        w.join(30)
        assert w.error is None, w.error
        assert w.writes > 50
    assert any(r["deleted_segments"] for r in reports), reports
    assert all(r["waiting_for"] == [] for r in reports), reports
    assert scrubbed["bad"] == [] and scrubbed["chunks_checked"] > 0
    for w, d, vol in ((writers[0], n2, "a"), (writers[1], n1, "b")):
        w.client.close()
        # Read back through the *other* node: the volume moves, its journal replays.
        _take_when_released(d, vol)
        r = NbdClient(d.socket("p"), vol)
        assert r.read(0, 8 * MiB) == bytes(w.expected)
        r.close()
    assert n1.client.call("check", pool="p") == []
