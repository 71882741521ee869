"""Handover of a dedup volume between two nodes' storage daemons on one Ceph pool: RBD's
cooperative exclusive lock (storage/README.md, "Handover"). A connection that needs a
volume another writer holds posts a lock request beside its head; the holder lets the
volume go (checkpointed) once its own connections to it are idle and keeps them open;
their next request takes it back the same way. A dead holder is taken over as before,
and a dead requester's request does not make the holder give anything up."""

from __future__ import annotations

import contextlib
import queue
import re
import shutil
import subprocess
import threading
import time
import uuid
from collections.abc import Callable

import pytest

from storage import cluster
from storage.backends import open_backend
from storage.backends.rados_cluster import CephCluster
from tests.storage.conftest import Daemon
from tests.storage.nbd_client import NbdClient, NbdClientError

pytestmark = pytest.mark.functional
MiB = 1 << 20
BLOCK = 4096
SIZE = 16 * MiB
SLOTS = 1024  # a writer's records go round the first 4 MiB


class QemuIo:
    """An interactive ``qemu-io`` on an export: QEMU's own NBD client, one connection
    kept open across commands (as a VM's disk). One command at a time (qemu-io takes one
    line per wake-up of its input), each a read or a write."""

    DONE = re.compile(r"(wrote|read) \d+/\d+ bytes|failed|rror")

    def __init__(self, uri: str) -> None:
        if shutil.which("qemu-io") is None:
            pytest.fail("qemu-io is not installed (see tools/packages.txt)")
        self.proc = subprocess.Popen(["stdbuf", "-oL", "qemu-io", "-f", "raw", uri], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)
        self.lines.put("")

    def run(self, command: str, timeout: float = 90) -> str:
        """Run a read or write command; its result line (``wrote ...``, ``read ...`` or
        the error)."""
        assert self.proc.stdin is not None
        self.proc.stdin.write(command + "\n")
        self.proc.stdin.flush()
        while True:
            line = self.lines.get(timeout=timeout)
            assert line, "qemu-io ended"
            if self.DONE.search(line):
                if "failed" not in line and "rror" not in line:
                    self.lines.get(timeout=timeout)  # its statistics line
                return line

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _nodes(storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> tuple[str, Daemon, Daemon]:
    url = ceph.backend_url(f"h-{uuid.uuid4().hex[:10]}")
    a, b = storage_daemons("n1"), storage_daemons("n2")
    for d in (a, b):
        d.client.call("attach", name="p", backend=url)
    a.client.call("create", pool="p", volume="v", size=SIZE)
    return url, a, b


def _record(tag: str, n: int) -> bytes:
    return f"{tag} {n}\n".encode().ljust(BLOCK, b".")


def _owner(d: Daemon) -> str | None:
    got = d.client.call("owner", pool="p", volume="v")
    return None if got is None else str(got["node"])


def _request(url: str) -> bytes | None:
    backend = open_backend(url)
    try:
        return backend.get_pointer(cluster.LOCK_REQUESTS + "v")
    finally:
        backend.close()


class _Writer(threading.Thread):
    """Writes numbered records round a 4 MiB range as fast as its node acknowledges them
    (one in flight, like a busy guest); ``acked`` maps offset -> the last acknowledged."""

    def __init__(self, client: NbdClient, tag: str) -> None:
        super().__init__(daemon=True)
        self.client, self.tag = client, tag
        self.acked: dict[int, bytes] = {}
        self.count = 0
        self.stop = threading.Event()
        self.error: BaseException | None = None

    def run(self) -> None:
        try:
            while not self.stop.is_set():
                off = (self.count % SLOTS) * BLOCK
                data = _record(self.tag, self.count)
                self.client.write(off, data)
                self.acked[off] = data
                self.count += 1
        except (NbdClientError, OSError) as exc:
            self.error = exc


def _writing(d: Daemon, writes: int) -> tuple[NbdClient, _Writer]:
    """A client of ``d`` writing continuously, once it got ``writes`` acknowledged."""
    src = NbdClient(d.socket("p"), "v")
    writer = _Writer(src, "src")
    writer.start()
    while writer.count < writes:
        assert writer.is_alive(), writer.error
        time.sleep(0.01)
    return src, writer


def _migrating(storage_daemons: Callable[[str], Daemon], ceph: CephCluster,
               writes: int) -> tuple[str, Daemon, Daemon, NbdClient, _Writer, NbdClient]:
    """Node 1's client writing continuously (``writes`` acknowledged), node 2's client
    connected to the same volume, idle: a live migration before its switchover."""
    url, a, b = _nodes(storage_daemons, ceph)
    src, writer = _writing(a, writes)
    return url, a, b, src, writer, NbdClient(b.socket("p"), "v")


def _wait_for_request(url: str) -> None:
    deadline = time.monotonic() + 5
    while _request(url) is None:
        assert time.monotonic() < deadline, "no lock request posted"
        time.sleep(0.05)


def _check(client: NbdClient, expected: dict[int, bytes]) -> None:
    whole = client.read(0, 8 * MiB)
    lost = [off for off, data in expected.items() if whole[off : off + BLOCK] != data]
    assert not lost, f"{len(lost)} acknowledged writes lost, first at {lost[0]}: {whole[lost[0]:lost[0] + 32]!r}"


def test_the_lock_goes_back_and_forth_between_two_nodes_connections_staying_open(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    url, a, b = _nodes(storage_daemons, ceph)
    ca = NbdClient(a.socket("p"), "v")  # takes the free lock
    cb = NbdClient(b.socket("p"), "v")  # accepted, idle: asks for nothing yet
    expected: dict[int, bytes] = {}
    shared = 8 * MiB - BLOCK  # both write it in turn: each must read the other's last write
    last = bytes(BLOCK)
    waits = []
    for turn in range(6):
        client, node, tag = (ca, a, "A") if turn % 2 == 0 else (cb, b, "B")
        t0 = time.monotonic()
        assert client.read(shared, BLOCK) == last  # the other node's write, not a stale cache
        waits.append(time.monotonic() - t0)
        for i in range(40):
            off = ((turn * 40 + i) % SLOTS) * BLOCK
            expected[off] = _record(f"{tag}{turn}", i)
            client.write(off, expected[off])
        last = _record(f"shared {tag}", turn)
        client.write(shared, last)
        expected[shared] = last
        assert _owner(a) == node.node
        assert a.client.call("owned", pool="p") == (["v"] if node is a else [])
    print(f"\nhandover waits (first request on the other node): {', '.join(f'{w:.2f}' for w in waits)} s")
    assert max(waits[1:]) < 3.0, waits
    for client in (ca, cb):  # both connections stayed open; everything acknowledged is there
        _check(client, expected)
    ca.close()
    cb.close()
    assert _request(url) is None  # the requester removed its request once it held the lock
    assert b.client.call("check", pool="p") == []


def test_a_live_migrations_switchover_hands_the_volume_over_at_once_and_the_first_write_succeeds(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    """What libvirt does: the destination QEMU connects while the source still writes
    (its connection stays open until the migration ended); the source stops (paused for
    the switchover) and the destination writes at once."""
    _url, a, b, src, writer, dst = _migrating(storage_daemons, ceph, 50)  # the destination's disk: open, idle
    before = writer.count
    time.sleep(1.0)
    assert writer.count > before + 10 and writer.error is None  # the source writes on undisturbed
    assert _owner(b) == "n1"
    writer.stop.set()  # the switchover: the source is paused, its connection open
    writer.join(10)
    assert writer.error is None, writer.error
    t0 = time.monotonic()
    dst.write(5 * MiB, _record("dst", 0))  # the guest's first write on the destination
    took = time.monotonic() - t0
    print(f"\nhandover at the switchover: the destination's first write took {took:.2f} s")
    assert took < 3.0, took
    assert _owner(a) == "n2" and a.client.call("owned", pool="p") == []
    expected = {**writer.acked, 5 * MiB: _record("dst", 0)}
    _check(dst, expected)
    dst.close()
    src.close()  # libvirt ends the source QEMU


def test_a_holder_killed_while_a_request_waits_is_taken_over_with_every_acknowledged_write(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    url, a, b, src, writer, dst = _migrating(storage_daemons, ceph, 50)
    result: dict[str, object] = {}

    def first_write() -> None:
        try:
            dst.write(5 * MiB, _record("dst", 0))
        except (NbdClientError, OSError) as exc:
            result["error"] = exc

    waiter = threading.Thread(target=first_write)
    waiter.start()
    _wait_for_request(url)
    time.sleep(0.5)  # the holder's client is never idle: no handover
    assert waiter.is_alive() and writer.error is None
    a.kill()  # kill -9 of the holder while the request waits
    t_kill = time.monotonic()
    writer.join(10)
    waiter.join(30)
    assert "error" not in result, result
    print(f"\ntakeover of a killed holder by the waiting request: {time.monotonic() - t_kill:.2f} s after the kill")
    assert _owner(b) == "n2"
    acked = dict(writer.acked)
    _check(dst, {**acked, 5 * MiB: _record("dst", 0)})
    assert _request(url) is None
    dst.close()
    src.close()


def test_a_dead_requesters_request_is_dropped_and_the_holder_keeps_its_volume(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    url, a, b, src, writer, dst = _migrating(storage_daemons, ceph, 20)

    def ask() -> None:
        with contextlib.suppress(NbdClientError, OSError):  # its node is killed below
            dst.write(0, _record("dst", 0))

    threading.Thread(target=ask, daemon=True).start()  # waits for the lock
    _wait_for_request(url)
    b.kill()  # the requester dies before it got the volume
    writer.stop.set()  # the holder's client goes idle: nobody alive asked for the volume
    writer.join(10)
    deadline = time.monotonic() + 5
    while _request(url) is not None:
        assert time.monotonic() < deadline, "the dead requester's request was not dropped"
        time.sleep(0.1)
    t0 = time.monotonic()
    src.write(BLOCK, _record("again", 0))
    assert time.monotonic() - t0 < 1.0
    time.sleep(1.0)  # idle again: no request left to give the volume up for
    assert _owner(a) == "n1" and a.client.call("owned", pool="p") == ["v"]
    _check(src, {**writer.acked, BLOCK: _record("again", 0)})
    src.close()


def test_qemu_clients_hand_the_volume_over_at_the_switchover_and_back(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    """The same with QEMU's NBD client on both sides; then the migration fails and the
    source, resumed, writes again: it takes the volume back."""
    _url, a, b = _nodes(storage_daemons, ceph)
    src = QemuIo(a.client.call("export", pool="p", volume="v")["unix"])
    dst: QemuIo | None = None
    try:
        for i in range(20):
            assert "wrote" in src.run(f"write -P {i + 1} {i * 64}k 64k")
        dst = QemuIo(b.client.call("export", pool="p", volume="v")["unix"])  # opened, idle
        t0 = time.monotonic()
        for i in range(20, 40):  # the source writes on, undisturbed
            assert "wrote" in src.run(f"write -P {i + 1} {i * 64}k 64k")
        assert time.monotonic() - t0 < 10 and _owner(a) == "n1"
        assert "wrote" in src.run("write -f -P 41 2560k 4k")  # FUA: durable, as the source's flush at the switchover
        t0 = time.monotonic()
        out = dst.run("write -P 0x77 4M 64k")
        took = time.monotonic() - t0
        print(f"\nqemu-io: the destination's first write after the switchover took {took:.2f} s")
        assert "wrote" in out and took < 3.0, out
        assert _owner(a) == "n2"
        assert "read 4096/4096" in dst.run("read -P 41 2560k 4k")
        for i in range(40):
            out = dst.run(f"read -P {i + 1} {i * 64}k 64k")
            assert "read 65536/65536" in out and "failed" not in out, out
        t0 = time.monotonic()
        out = src.run("read -P 0x77 4M 64k")  # the migration failed: the source resumes
        assert "read 65536/65536" in out and "failed" not in out, out
        assert "wrote" in src.run("write -P 0x78 4M 4k")
        print(f"qemu-io: the source took the volume back in {time.monotonic() - t0:.2f} s")
        assert _owner(a) == "n1"
    finally:
        src.close()
        if dst is not None:
            dst.close()


def test_a_requester_killed_once_it_holds_the_volume_is_taken_over_by_the_former_holder(
        storage_daemons: Callable[[str], Daemon], ceph: CephCluster) -> None:
    url, a, b, src, writer, dst = _migrating(storage_daemons, ceph, 30)
    writer.stop.set()
    writer.join(10)
    expected = dict(writer.acked)
    for i in range(30):  # the handover, then acknowledged writes on the new holder
        expected[6 * MiB + i * BLOCK] = _record("dst", i)
        dst.write(6 * MiB + i * BLOCK, expected[6 * MiB + i * BLOCK])
    b.kill()  # kill -9 of the new holder: its writes are journaled, not checkpointed
    t0 = time.monotonic()
    src.write(7 * MiB, _record("back", 0))  # the old holder's connection asks again: a takeover
    print(f"\nthe former holder took a killed requester's volume back in {time.monotonic() - t0:.2f} s")
    expected[7 * MiB] = _record("back", 0)
    assert _owner(a) == "n1"
    _check(src, expected)
    assert _request(url) is None
    src.close()
    assert a.client.call("check", pool="p") == []
