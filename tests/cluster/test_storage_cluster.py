"""Storage across the lab's nodes (issue 13, item 7): every node's storage daemon writes
the shared Ceph pool straight from RADOS; identical data from several nodes is stored
once and GC and scrub run while nodes write; a volume whose storage daemon died mid-write
is taken over from another node, every flushed write intact; a VM's volume follows its
live migration and is taken over from its partitioned node, every flush intact, the cut-off
node's late writes refused; a VM boots from an ``rbd`` root volume on another node than the
one that uploaded it, and snapshots."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from appliance.lab import ops
from tests.cluster.test_ha import counter_records, victim_for
from tests.lab_cluster import LabCluster, wait_for

pytestmark = [pytest.mark.functional, pytest.mark.slow]
NODES = ("n1", "n2", "n3")
MiB = 1 << 20


def storaged_calls(lab: LabCluster, at: str, *calls: dict[str, Any], lenient: bool = False) -> list[Any]:
    """Calls to ``node``'s own storage daemon (what its agent and the HA manager do), in
    order, from one process inside the node (``lenient``: errors are results)."""
    call = "(lambda r: _try(r))" if lenient else "(lambda r: c.call(**r))"
    code = ("import json, sys; from appliance.settings import get_settings; from storage.control import "
            "StorageClient; c = StorageClient(get_settings().storage_socket, timeout=300)\n"
            "def _try(r):\n    try:\n        return c.call(**r)\n    except Exception as e:\n        return repr(e)\n"
            f"print(json.dumps([{call}(req) for req in json.loads(sys.argv[1])]))")
    r = lab.run(at, [sys.executable, "-c", code, json.dumps(calls)], timeout=330)
    assert r.returncode == 0, f"{calls} on {at}: {r.stderr[-2000:]}"
    out: list[Any] = json.loads(r.stdout)
    return out


def storaged(lab: LabCluster, at: str, op: str, **args: Any) -> Any:
    return storaged_calls(lab, at, {"op": op, **args})[0]


def qemu_io(lab: LabCluster, node: str, uri: str, *commands: str) -> str:
    """qemu-io inside ``node`` on a volume's export (its own storage daemon serves it)."""
    argv = ["qemu-io", "-f", "raw"]
    for c in commands:
        argv += ["-c", c]
    r = lab.run(node, [*argv, uri], timeout=300)
    assert r.returncode == 0 and "failed" not in r.stdout + r.stderr, f"qemu-io on {node}: {r.stdout} {r.stderr}"
    return r.stdout


def ceph_pool_ready(lab: LabCluster) -> None:
    wait_for("the cluster's ceph pool Ready",
             lambda: lab.cairn("n1", "pool", "get", "ceph")["status"].get("phase") == "Ready", 300)


def owner(lab: LabCluster, via: str, volume: str) -> str | None:
    got: str | None = lab.cairn(via, "volume", "get", volume)["status"].get("owner")
    return got


def serial_text(lab: LabCluster, node: str, domain: str) -> str:
    log = lab.lab.node(node).data_dir / "instances" / domain / "serial.log"
    return log.read_text(errors="replace") if log.exists() else ""


def acknowledged(text: str) -> list[tuple[str, int]]:
    """The counter guest's ``CTR <boot> <n>`` lines: printed only after record n's
    ``dd conv=fsync`` returned (the flush reached the storage daemon and was acknowledged)."""
    out = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 3 and parts[0] == "CTR" and parts[2].isdigit():
            out.append((parts[1], int(parts[2])))
    return out


class Clock:
    """Where a long lab test spends its time (printed with -s)."""

    def __init__(self) -> None:
        self.t0 = self.last = time.monotonic()

    def __call__(self, what: str) -> None:
        now = time.monotonic()
        print(f"[{now - self.t0:6.1f} s, +{now - self.last:5.1f}] {what}", flush=True)
        self.last = now


def delete_volume(lab: LabCluster, via: str, name: str) -> None:
    wait_for(f"volume {name} deleted", lambda: lab.cairn_rc(via, "volume", "delete", name).returncode == 0
             or "no volume" in lab.cairn_rc(via, "volume", "get", name).stderr, 120, every=2)


# --- dedup across nodes, GC and scrub while two nodes write ---------------------------------

def test_the_same_data_from_three_nodes_is_stored_once_and_gc_and_scrub_lose_nothing_while_two_nodes_write(
        lab_cluster: LabCluster, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Straight through the storage daemons (no control plane): volumes of this test only."""
    lab = lab_cluster
    ceph_pool_ready(lab)
    tag = f"t{os.getpid()}"
    solo_data, shared_data = (Path(f"/tmp/cairn-dedup-{tag}-{k}.bin") for k in ("a", "b"))  # /tmp: the host's
    for f in (solo_data, shared_data):
        f.write_bytes(os.urandom(8 * MiB))
    solo, *copies, g1, g2 = names = [f"{tag}-{v}" for v in ("solo", "d1", "d2", "d3", "g1", "g2")]
    seal, stats = {"op": "seal", "pool": "ceph"}, {"op": "stats", "pool": "ceph"}
    gc_now = {"op": "gc", "pool": "ceph", "grace_seconds": 0, "ack_timeout": 30}

    def seal_and_stats(*then: dict[str, Any]) -> int:
        """Every node seals its segments (so GC may merge them); n2 then calls ``then``."""
        for n in ("n1", "n3"):
            storaged(lab, n, "seal", pool="ceph")
        return int(storaged_calls(lab, "n2", seal, *then, stats)[-1]["backend_bytes"])

    try:
        made = storaged_calls(lab, "n1", *[{"op": "create", "pool": "ceph", "volume": v, "size": 16 * MiB}
                                           for v in names], *[{"op": "export", "pool": "ceph", "volume": v}
                                                              for v in names])
        uri = {v: e["unix"] for v, e in zip(names, made[len(names):], strict=True)}
        base = seal_and_stats(gc_now)  # what earlier tests left is collected first
        qemu_io(lab, "n1", uri[solo], f"write -s {solo_data} 0 8M")
        one = seal_and_stats() - base
        at_once = [lab.popen(n, ["qemu-io", "-f", "raw", "-c", f"write -s {shared_data} 0 8M", uri[v]])
                   for n, v in zip(NODES, copies, strict=True)]
        for w in at_once:
            out, _ = w.communicate(timeout=300)
            assert w.returncode == 0 and "wrote 8388608/8388608" in out, out
        written = seal_and_stats() - base - one
        gc, after = storaged_calls(lab, "n2", gc_now, stats)
        three = int(after["backend_bytes"]) - base - one
        print(f"\n8 MiB on the lab's pool: from one node {one} bytes; another 8 MiB from three nodes at once "
              f"{written} ({written / one:.2f}x), after a collection {three} ({three / one:.3f}x)")
        assert gc["waiting_for"] == [], gc
        assert three <= 1.1 * one, (one, written, three)

        # GC (deleting what the volumes above held) and scrub from n3 while n1 and n2 write
        # that same data again (deduplicating against chunks GC is condemning) and more.
        storaged_calls(lab, "n1", *[{"op": "delete", "pool": "ceph", "volume": v} for v in (solo, *copies)])
        stop = tmp_path_factory.mktemp("gcw") / "stop"
        script = ('i=0; while [ ! -e {stop} ]; do qemu-io -f raw -c "write -s {data} 0 8M" '
                  '-c "write -P $((i % 200 + 20)) 8M 1M" "{uri}" >/dev/null || exit 1; i=$((i + 1)); done; echo $i')
        writers = {v: lab.popen(n, ["sh", "-c", script.format(stop=stop, data=shared_data, uri=uri[v])])
                   for v, n in ((g1, "n1"), (g2, "n2"))}
        try:
            *reports, scrubbed = storaged_calls(lab, "n3", gc_now, gc_now, {"op": "scrub", "pool": "ceph"})
        finally:
            stop.touch()
            for w in writers.values():
                with contextlib.suppress(subprocess.TimeoutExpired):
                    w.wait(120)
        passes = {}
        for v, w in writers.items():
            out, _ = w.communicate(timeout=60)
            assert w.returncode == 0, f"writer of {v} failed: {out}"
            passes[v] = int(out.split()[-1])
        print(f"GC during writes: {reports}; scrub {scrubbed}; writer passes {passes}")
        assert all(r["waiting_for"] == [] for r in reports), reports
        assert any(r["deleted_segments"] for r in reports), reports
        assert scrubbed["bad"] == [] and scrubbed["chunks_checked"] > 0
        assert all(n >= 2 for n in passes.values()), f"the writers did not write during the collection: {passes}"
        for v, n in passes.items():  # read back through the third node
            qemu_io(lab, "n3", uri[v], f"read -P {(n - 1) % 200 + 20} 8M 1M")
            out = f"/tmp/cairn-gcread-{v}.raw"
            try:
                r = lab.run("n3", ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri[v], out], timeout=300)
                assert r.returncode == 0, r.stderr
                with open(out, "rb") as f:
                    assert f.read(8 * MiB) == shared_data.read_bytes(), f"{v} lost data written during GC"
            finally:
                Path(out).unlink(missing_ok=True)
        assert storaged(lab, "n3", "check", pool="ceph") == []
    finally:
        for f in (solo_data, shared_data):
            f.unlink(missing_ok=True)
        storaged_calls(lab, "n1", *[{"op": "delete", "pool": "ceph", "volume": v} for v in names], lenient=True)


# --- one owner; handover with a live migration; a partitioned owner fenced ------------------

def read_head(lab: LabCluster, node: str, uri: str) -> bytes:
    """The first MiB of a volume's export, read through ``node``'s storage daemon (no
    control plane: it may be failing over while a node rejoins)."""
    out = f"/tmp/cairn-head-{os.getpid()}.raw"
    try:
        r = lab.run(node, ["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, out], timeout=300)
        assert r.returncode == 0, r.stderr
        with open(out, "rb") as f:
            return f.read(MiB)
    finally:
        Path(out).unlink(missing_ok=True)


def on_disk(raw: bytes, n: int) -> str:
    return raw[64 * n:64 * n + 64].rstrip(b"\0\n ").decode(errors="replace")


def test_a_vm_volume_follows_its_live_migration_and_is_taken_over_from_a_partitioned_owner_every_flush_intact(
        lab_cluster: LabCluster) -> None:
    """A counter guest on node A writes its volume (each record flushed, every tenth
    acknowledged on its serial console); live-migrated to B it writes on, the lock
    following it; B is cut off, fenced and its volume taken over by C: every record B's
    guest saw flushed is there, and what B's guest writes once B is back is refused."""
    lab, lap = lab_cluster, Clock()
    ceph_pool_ready(lab)
    victim, survivor = victim_for(lab)
    start = next(n for n in NODES if n not in (victim, survivor))
    vol = lab.cairn(survivor, "volume", "create", "xv", "--size", "64MiB", "--pool", "ceph", timeout=300)
    uri, vid = vol["status"]["export"], vol["id"]
    lab.cairn(survivor, "image", "import-test-guest", timeout=600)
    try:
        # written through two nodes' daemons and read through the third: one pool in RADOS
        qemu_io(lab, start, uri, "write -P 0x42 8M 2M")
        qemu_io(lab, survivor, uri, "write -P 0x43 10M 2M", "read -P 0x42 8M 2M")
        qemu_io(lab, victim, uri, "read -P 0x42 8M 2M", "read -P 0x43 10M 2M")
        lap("volume written and read on three nodes")
        vm = lab.cairn(survivor, "vm", "create", "xvm", "--image", "tiny-guest", "--memory", "128MiB",
                       "--volume", "xv", "--on", start, "--kernel-args", "cairn.counter=vda", timeout=600)
        assert vm["status"]["node"] == start
        dom = vm["status"]["domain"]
        wait_for("the guest counting on its volume", lambda: acknowledged(serial_text(lab, start, dom)), 120)
        wait_for(f"{start} to own the volume its VM writes", lambda: owner(lab, victim, "xv") == start, 60)
        second = lab.cairn_rc(victim, "vm", "create", "xvm2", "--image", "tiny-guest", "--memory", "128MiB",
                              "--volume", "xv", "--on", victim)
        assert second.returncode != 0 and f"owned by node '{start}'" in second.stdout + second.stderr, second
        lap("owner seen, second attach refused")

        before = max(n for _, n in acknowledged(serial_text(lab, start, dom)))
        t0 = time.monotonic()
        lab.cairn(survivor, "vm", "migrate", "xvm", "--to", victim, timeout=600)
        migrated = time.monotonic() - t0
        assert lab.cairn(survivor, "vm", "get", "xvm")["status"]["node"] == victim
        wait_for(f"the lock to follow the VM to {victim}", lambda: owner(lab, survivor, "xv") == victim, 90)
        seen = storaged(lab, survivor, "owner", pool="ceph", volume=vid)
        assert seen["node"] == victim and seen["alive"] == "alive", seen
        wait_for("the guest writing again on its new node", lambda: max(
            [n for _, n in acknowledged(serial_text(lab, victim, dom))] or [0]) >= before + 20, 90)
        # libvirt activates the destination's disk before the source QEMU exits: the
        # destination's daemon asks for the lock and the source's lets go at the
        # switchover, its connection idle (storage/README.md, Handover): no write fails.
        failed = [ln for ln in serial_text(lab, victim, dom).splitlines() if ln.startswith("CTR-WRITE-FAIL")]
        lap(f"migrated in {migrated:.1f} s (CLI round trip included), the lock followed, writing again "
            f"(from record {before}); writes failed: {failed}")
        assert not failed, f"the guest's writes failed after the live migration: {failed}"

        ops.partition(victim, lab.dir)  # the owner is cut off, its guest writing on
        acked = acknowledged(serial_text(lab, start, dom) + serial_text(lab, victim, dom))
        t0 = time.monotonic()
        fenced = storaged(lab, survivor, "fence", node=victim)["ceph"]  # what the HA manager does first
        assert vid in fenced["volumes"] and fenced["blocklisted"], fenced
        t1 = time.monotonic()
        storaged(lab, survivor, "take", pool="ceph", volume=vid)  # lock break + journal replay
        t2 = time.monotonic()
        qemu_io(lab, survivor, uri, "read -P 0x42 8M 2M", "read -P 0x43 10M 2M")
        print(f"\ntakeover of a partitioned owner's volume: fence {t1 - t0:.2f} s, take (lock break + replay) "
              f"{t2 - t1:.2f} s, first read {time.monotonic() - t2:.2f} s (CLI round trips included)")
        assert storaged(lab, start, "owner", pool="ceph", volume=vid)["node"] == survivor
        taken = read_head(lab, survivor, uri)
        boots = {boot for boot, _ in acked}
        assert len(boots) == 1, f"one guest, live-migrated, wrote every record: {boots}"
        lost = [n for boot, n in acked if on_disk(taken, n) != f"CTR {boot} {n}"]
        assert not lost, f"flushed records lost in the takeover: {lost}"
        assert len(counter_records(taken)) >= before  # no hole before the migration
        lap(f"fenced and taken over: all {acked[-1][1]} flushed records there")

        ops.heal(lab.dir)  # the cut-off node is back: its guest's writes reach Ceph, which refuses them
        wait_for("the fenced owner's guest told its writes failed", lambda: serial_text(lab, victim, dom).count(
            "CTR-WRITE-FAIL") > len(failed), 120)
        assert read_head(lab, survivor, uri) == taken, "a late write of the fenced owner was merged"

        def stopped() -> bool:
            """Stop the VM (again): a stop whose CLI lost its answer in the database's
            failover after the partition may have stopped it already."""
            if lab.cairn(survivor, "vm", "get", "xvm")["status"].get("vm_state") == "stopped":
                return True
            lab.cairn_rc(survivor, "vm", "stop", "xvm", timeout=300)
            return False

        wait_for("the VM stopped", stopped, 300, every=5)  # a healed node under load can be slow
        lap("healed; late writes refused, nothing merged")
        storaged(lab, survivor, "release", pool="ceph", volume=vid)
    finally:
        ops.heal(lab.dir)
        lab.wait_healthy(timeout=300)
        for name in ("xvm", "xvm2"):
            lab.cairn_rc(survivor, "delete", "vm", name)
        delete_volume(lab, survivor, "xv")
        lap("cleaned up")


def test_a_storage_daemon_killed_mid_write_is_taken_over_from_another_node_every_flushed_write_intact(
        lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    ceph_pool_ready(lab)
    victim, survivor = "n3", "n1"  # only n3's storage daemon dies (its supervisor starts it again)
    name = f"t{os.getpid()}-k"
    (_, exp), = [storaged_calls(lab, victim, {"op": "create", "pool": "ceph", "volume": name, "size": 64 * MiB},
                                {"op": "export", "pool": "ceph", "volume": name})]
    uri = exp["unix"]
    cmds: list[str] = []
    for k in range(400):  # FUA writes: "wrote" means durable
        cmds += ["-c", f"write -f -P {k % 200 + 20} {k * 160 * 1024} {4096 if k % 2 else 65536}"]
    writer = lab.popen(victim, ["stdbuf", "-oL", "qemu-io", "-f", "raw", *cmds, uri], stderr=subprocess.STDOUT)
    try:
        assert writer.stdout is not None
        lines = []
        while sum(ln.startswith("wrote") for ln in lines) < 40:
            line = writer.stdout.readline()
            assert line, f"qemu-io ended: {lines[-5:]}"
            lines.append(line)
        state = json.loads((lab.lab.node(victim).data_dir / "run" / "supervisor.json").read_text())
        os.kill(int(state["programs"]["storage"]["pid"]), signal.SIGKILL)  # mid-write
        writer.kill()  # its client goes with it
        out, _ = writer.communicate(timeout=60)
        acked = [int(ln.split()[-1]) // (160 * 1024) for ln in lines + out.splitlines() if ln.startswith("wrote")]
        t0 = time.monotonic()
        fenced = storaged(lab, survivor, "fence", node=victim)["ceph"]
        assert name in fenced["volumes"], fenced
        storaged(lab, survivor, "take", pool="ceph", volume=name)
        t1 = time.monotonic()
        reads = [f"read -P {k % 200 + 20} {k * 160 * 1024} {4096 if k % 2 else 65536}" for k in acked]
        got = qemu_io(lab, survivor, uri, *reads)
        print(f"\ntakeover after kill -9 of {victim}'s storage daemon: fence + take {t1 - t0:.2f} s, "
              f"{len(acked)} flushed writes read back in {time.monotonic() - t1:.2f} s")
        assert got.count("read ") == len(acked) and "fail" not in got
        storaged(lab, survivor, "release", pool="ceph", volume=name)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
        storaged_calls(lab, survivor, {"op": "delete", "pool": "ceph", "volume": name}, lenient=True)


# --- rbd: a VM boots from an rbd root volume and snapshots ----------------------------------

def boot_sector(message: bytes) -> bytes:
    """A 512-byte MBR that prints ``message`` on COM1 and halts: what a BIOS boot reads
    first from the disk (here through QEMU's RBD driver)."""
    code = bytes.fromhex("31c0" "8ed8" "be167c" "baf803" "ac" "84c0" "7403" "ee" "ebf8" "fa" "f4" "ebfc")
    assert len(code) == 22  # the message follows at 0x7c00 + 22 (the "be167c" above)
    sector = code + message + b"\0"
    return sector + b"\0" * (510 - len(sector)) + b"\x55\xaa"


def test_a_vm_boots_from_an_rbd_root_volume_on_another_node_and_snapshots(lab_cluster: LabCluster) -> None:
    lab = lab_cluster
    ceph_pool_ready(lab)
    marker = f"CAIRN-RBD-BOOT-{os.getpid()}".encode()
    raw = Path(f"/tmp/cairn-rbdboot-{os.getpid()}.raw")
    raw.write_bytes(boot_sector(marker + b"\r\n") + os.urandom(2 * MiB))
    try:
        img = lab.cairn("n1", "image", "upload", str(raw), "rbdboot", "--pool", "ceph", "--class", "rbd",
                        timeout=300)
        assert img["status"]["phase"] == "Available"
        vm = lab.cairn("n1", "vm", "create", "rb", "--image", "rbdboot", "--memory", "64MiB", "--on", "n3",
                       timeout=600)
        assert vm["status"]["node"] == "n3" and vm["status"]["power_state"] == "running"
        dom = vm["status"]["domain"]
        root = lab.cairn("n2", "volume", "get", "rb-root")
        assert root["status"]["class"] == "rbd" and root["status"]["export"].startswith("rbd:")
        wait_for("the boot sector's message on the serial console",
                 lambda: marker.decode() in serial_text(lab, "n3", dom), 60)
        wait_for("status.owner of the rbd root", lambda: owner(lab, "n2", "rb-root") == "n3", 60)
        lab.cairn("n2", "vm", "snapshot", "create", "rb", "s1", timeout=300)  # the VM pauses for it
        assert [s["name"] for s in lab.cairn("n3", "vm", "snapshot", "list", "rb")] == ["s1"]
        assert [s["name"] for s in lab.cairn("n1", "snapshot", "list", "rb-root")] == ["s1"]
        lab.cairn("n2", "vm", "snapshot", "delete", "rb", "s1", timeout=300)
    finally:
        raw.unlink(missing_ok=True)
        lab.cairn_rc("n1", "delete", "vm", "rb")
        lab.cairn_rc("n1", "delete", "image", "rbdboot")
